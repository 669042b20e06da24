"""The preflight on three fake hosts, for real: a kernel, its launcher agent, broken hosts.

orion (the client), antares and sirius are Linux namespaces of this machine, as
in ``test_multihost.py``; ``tests/multihost/preflight_driver.py`` breaks one host
at a time through the agent both mpiexec and the preflight use: sirius's ssh
refused, the data folder hidden on antares (a tmpfs over it in antares's mount
namespace), another casatasks on antares (its METADATA bind-mounted there only),
sirius hanging. Each must be named -- host and requirement -- in the table of
``%casa_cluster check`` and in the ONE error that refuses the launch (or the
``--vis`` cell), and an all-pass table must let the launch go on.

Needs root and skips without it; as root a missing tool is a failure (CI runs it).
"""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from kernels import wait_gone
from test_multihost import run_in_namespaces

from casa_kernel.preflight import REQUIREMENTS

DRIVER = Path(__file__).resolve().parent / "multihost" / "preflight_driver.py"
HOSTFILE = "orion slots=2\nantares slots=2\nsirius slots=1\n"
DRIVER_TIMEOUT = 200.0  # seconds; a run takes ~45 s on 2 busy cores

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux namespaces"),
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0,
        reason="needs root: network, UTS and mount namespaces fake the hosts",
    ),
]


def run_driver(workdir: Path) -> dict[str, Any]:
    """The preflight driver in fresh namespaces (nothing of its kernel left behind)."""
    args = ["--workdir", str(workdir), "--hostfile-text", HOSTFILE]
    return run_in_namespaces(DRIVER, args, DRIVER_TIMEOUT)


def table(step: dict[str, Any]) -> tuple[str, dict[str, dict[str, str]], list[str]]:
    """Title, {host: {requirement: mark}} and the failure notes of a check's text."""
    assert step["status"] == "ok", step["error"]
    title, head, *rest = step["result"].strip("'\"").splitlines()
    columns = head.split()
    assert columns[0] == "host" and columns[1:] == [r for r in REQUIREMENTS if r in columns]
    cells: dict[str, dict[str, str]] = {}
    notes = []
    for line in rest:
        words = line.split()
        if len(words) == len(columns) and set(words[1:]) <= {"ok", "FAIL", "-"}:
            cells[words[0]] = dict(zip(columns[1:], words[1:]))
        else:
            notes.append(line)
    return title, cells, notes


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_driver(tmp_path_factory.mktemp("preflight"))


@pytest.mark.timeout(2 * DRIVER_TIMEOUT)
def test_all_pass_table_then_the_launch_goes_on(report: dict[str, Any]) -> None:
    title, cells, notes = table(report["pass_check"])
    assert "2 hosts" in title and title.endswith("all pass"), title
    assert set(cells) == {"antares", "sirius"}  # orion is this machine: not probed
    for host, marks in cells.items():
        assert marks == {r: "ok" for r in REQUIREMENTS}, (host, marks)  # data too (--vis)
    assert notes == []
    html = report["pass_check"]["html"]
    assert "<table" in html and html.count(">ok</span>") == 2 * len(REQUIREMENTS)
    assert "FAIL" not in html
    # the launch that began with the kernel passed its own preflight and ran
    parallel = report["pass_parallel"]
    assert parallel["status"] == "ok", parallel["error"]
    hosts = [row[1] for row in ast.literal_eval(parallel["result"])]
    assert hosts == ["orion", "antares", "antares", "sirius"]


@pytest.mark.timeout(2 * DRIVER_TIMEOUT)
def test_a_host_whose_ssh_fails_is_named(report: dict[str, Any]) -> None:
    title, cells, notes = table(report["ssh_check"])
    assert "1 failed on sirius" in title, title
    assert cells["sirius"]["ssh"] == "FAIL"
    assert set(list(cells["sirius"].values())[1:]) == {"-"}  # not reached: not checked
    assert set(cells["antares"].values()) == {"ok"}
    assert len(notes) == 1, notes
    assert notes[0].startswith("sirius ssh: ssh: connect to host sirius port 22"), notes
    restart = report["ssh_restart"]
    assert restart["status"] == "error"
    error = restart["error"]
    assert "cannot be launched on sirius" in error and "1 problem" in error, error
    assert "sirius: ssh: ssh: connect to host sirius port 22: Connection refused" in error
    assert "do: check the launcher agent" in error  # the harness's agent is not ssh
    assert "antares" not in error.split("\n", 1)[1]


@pytest.mark.timeout(2 * DRIVER_TIMEOUT)
def test_a_host_without_the_data_path_is_named(report: dict[str, Any]) -> None:
    title, cells, notes = table(report["data_check"])
    assert "1 failed on antares" in title, title
    assert cells["antares"]["data"] == "FAIL"
    assert {r: m for r, m in cells["antares"].items() if r != "data"} == {
        r: "ok" for r in REQUIREMENTS if r != "data"
    }
    assert set(cells["sirius"].values()) == {"ok"}
    assert len(notes) == 1 and re.match(r"antares data: /\S+/data/obs\.mms not found", notes[0])
    # only the data is missing: the launch (which checks the working directory) goes on...
    assert report["data_start"]["status"] == "ok", report["data_start"]["error"]
    # ...and the first cell given that data is refused before any server sees it
    cell = report["data_parallel"]
    assert cell["status"] == "error" and cell["ename"] == "PreflightError"
    assert "cannot be launched on antares" in cell["error"]
    assert re.search(r"antares: data: /\S+/data/obs\.mms not found", cell["error"])
    assert "do: put the data on a file system antares mounts at the same path" in cell["error"]


@pytest.mark.timeout(2 * DRIVER_TIMEOUT)
def test_a_host_with_another_casatasks_is_named(report: dict[str, Any]) -> None:
    title, cells, notes = table(report["version_check"])
    assert "1 failed on antares" in title, title
    assert [r for r, m in cells["antares"].items() if m != "ok"] == ["casatasks"]
    assert set(cells["sirius"].values()) == {"ok"}
    from importlib.metadata import version

    mine = version("casatasks")
    assert notes[0].startswith(f"antares casatasks: 6.6.0.20 there, {mine} here"), notes
    restart = report["version_restart"]
    assert restart["status"] == "error"
    assert f"antares: casatasks: 6.6.0.20 there, {mine} here" in restart["error"]
    assert f"do: install casatasks=={mine}" in restart["error"]


@pytest.mark.timeout(2 * DRIVER_TIMEOUT)
def test_a_replacement_launch_is_checked_too(report: dict[str, Any]) -> None:
    """A server killed while antares has another casatasks: the new servers'
    launch (started on its own, between cells) is refused, and the next cell says why."""
    assert report["killed"]["host"] == "antares"
    cell = report["replace_parallel"]
    assert cell["status"] == "error"
    assert "cannot be launched on antares" in cell["error"], cell["error"]
    assert "antares: casatasks: 6.6.0.20 there" in cell["error"], cell["error"]


@pytest.mark.timeout(2 * DRIVER_TIMEOUT)
def test_a_host_without_the_shared_key_folder_is_named(report: dict[str, Any]) -> None:
    """Encrypted across hosts (the default) the servers read their connection key
    from CASA_KERNEL_KEY_DIR: a host that does not share it is ONE clear error
    before launch, not a server that never registers."""
    title, cells, notes = table(report["keys_check"])
    assert "1 failed on antares" in title, title
    assert [r for r, m in cells["antares"].items() if m != "ok"] == ["keys"]
    assert set(cells["sirius"].values()) == {"ok"}
    assert re.match(r"antares keys: /\S+/keys is another folder there", notes[0]), notes
    restart = report["keys_restart"]
    assert restart["status"] == "error", restart
    assert "cannot be launched on antares" in restart["error"]
    assert re.search(r"antares: keys: /\S+/keys is another folder there", restart["error"])
    assert "do: set CASA_KERNEL_KEY_DIR to a folder antares mounts" in restart["error"]
    assert "sirius" not in restart["error"].split("\n", 1)[1]


@pytest.mark.timeout(2 * DRIVER_TIMEOUT)
def test_a_hanging_host_gets_its_time_limit_and_no_more(report: dict[str, Any]) -> None:
    title, cells, notes = table(report["hang_check"])
    assert cells["sirius"]["ssh"] == "FAIL" and set(cells["antares"].values()) == {"ok"}
    assert notes[0].startswith("sirius ssh: no answer within 5 s"), notes
    # all hosts at once: antares answered meanwhile; generous liveness bound
    assert report["hang_check"]["seconds"] < 30


@pytest.mark.timeout(2 * DRIVER_TIMEOUT)
def test_nothing_left_behind(report: dict[str, Any]) -> None:
    assert report["left"] == []
    assert report["markers_left"] == []  # the marker files are removed after each check
    assert report["keys_left"] == []  # each cluster's key folder is removed at its stop
    assert wait_gone(report["kernel_pid"], timeout=5) == []
