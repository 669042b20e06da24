"""Several hosts, for real: one mpiexec, a real hostfile, ranks on two machines.

The two "machines", orion and antares, are Linux namespaces of this one: the
kernel runs in network, UTS and mount namespaces of its own (named orion, with a
private veth interface and ``/etc/hosts``), and OpenMPI's ssh launcher agent is
replaced by a script starting each remote daemon in a UTS namespace named after
its host (see ``tests/multihost/driver.py``).  Everything else is what a user on
a cluster runs: the kernel started by jupyter_client from a hostfile and N,
ipyparallel's controller listening on every interface and advertised by name,
one ``mpiexec --hostfile`` launching the servers over the "network", MPI traffic
between the hosts over TCP.

Needs root (namespaces, ``ip``, ``mount``) and skips without it; as root a
missing ``unshare``/``ip``/``mount`` is a failure, not a skip, so CI (root, with
iproute2 and util-linux installed) always runs it.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from kernels import cluster_processes, wait_gone

from casa_kernel.cluster.janitor import reap

DRIVER = Path(__file__).resolve().parent / "multihost" / "driver.py"
HOSTFILE = "orion slots=2\nantares slots=3\n"
DRIVER_TIMEOUT = 100.0  # seconds; a run takes ~10 s

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux namespaces"),
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0,
        reason="needs root: network, UTS and mount namespaces fake the hosts",
    ),
]


def require_tools() -> None:
    """Fail (not skip: this runs as root, as CI does) when a set-up tool is missing."""
    missing = [tool for tool in ("unshare", "ip", "mount", "sh") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: install iproute2 and util-linux "
            "(apt-get install -y iproute2 util-linux)"
        )


def run_in_namespaces(driver: Path, args: list[str], timeout: float) -> dict[str, Any]:
    """Run a fake-host driver in fresh namespaces; its JSON lines merged into one dict.

    Whatever happens, no process of the driven kernel is left behind: on a
    timeout or a crash the kernel and its cluster are killed here. (The
    drivers of tests/test_encryption.py and tests/test_preflight_multihost.py
    run through this too.)
    """
    require_tools()
    command = ["unshare", "--net", "--uts", "--mount", "--fork", sys.executable, str(driver)]
    proc = subprocess.Popen(
        command + args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        stdout, stderr = proc.communicate()
        stderr += f"\n(driver killed after {timeout:.0f} s)"
    report: dict[str, Any] = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            report.update(json.loads(line))
    pid = report.get("kernel_pid")
    if pid is not None and (proc.returncode != 0 or "left" not in report):
        # The kernel runs in a session of its own: killing the driver spared it.
        reap({pid, *(p.pid for p in cluster_processes(pid))}, grace=2.0)
    assert proc.returncode == 0, f"driver failed ({proc.returncode}):\n{stdout}\n{stderr}"
    return report


def run_driver(workdir: Path, nprocs: str | None) -> dict[str, Any]:
    """The multi-host driver for this hostfile and N."""
    args = ["--workdir", str(workdir), "--hostfile-text", HOSTFILE]
    if nprocs is not None:
        args += ["--nprocs", nprocs]
    return run_in_namespaces(DRIVER, args, DRIVER_TIMEOUT)


def status_rows(text: str) -> tuple[str, list[list[str]]]:
    """Title and (rank, host, pid, state, work, memory...) rows of ``%casa_cluster status``;
    CASA's cube client's row as ``["cube client", host, pid, state, ...]``, first."""
    lines = text.strip("'\"").splitlines()
    assert lines[1].split() == ["rank", "host", "pid", "state", "work", "memory"], text
    rows = [line.split() for line in lines[2:]]
    return lines[0], [
        ["cube client", *row[2:]] if row[:2] == ["cube", "client"] else row for row in rows
    ]


@pytest.mark.timeout(2 * DRIVER_TIMEOUT)
@pytest.mark.parametrize(
    ("nprocs", "expected"),
    [
        # N=4: the client takes an orion slot, then rank 0 on orion, 1-2 on antares
        ("4", [(0, "orion", 3), (1, "antares", 3), (2, "antares", 3)]),
        # no N: every slot, so 4 servers: 1 left on orion, 3 on antares
        (None, [(0, "orion", 6), (1, "antares", 6), (2, "antares", 6), (3, "antares", 6)]),
    ],
    ids=["N=4", "every-slot"],
)
def test_servers_on_two_hosts_share_one_mpi_world(
    tmp_path: Path, nprocs: str | None, expected: list[tuple[int, str, int]]
) -> None:
    """Ranks land on the hostfile's hosts, in order, and talk MPI across them."""
    started = time.monotonic()
    report = run_driver(tmp_path, nprocs)

    parallel = report["parallel"]
    assert parallel["status"] == "ok", parallel["traceback"] or parallel["error"]
    assert ast.literal_eval(parallel["result"]) == expected

    status = report["status"]
    assert status["status"] == "ok", status["traceback"] or status["error"]
    title, rows = status_rows(status["result"])
    # CASA's cube client holds the client's slot on the first host (world rank 0)
    assert rows[0][:2] == ["cube client", "orion"], rows
    rows = rows[1:]
    nservers = len(expected)
    assert "client on orion" in title, title
    assert f"{nservers} servers, N={nservers + 1}" in title, title
    assert [(int(r[0]), r[1]) for r in rows] == [(rank, host) for rank, host, _ in expected]
    assert all(r[3] == "idle" for r in rows), rows
    assert len({r[2] for r in rows}) == nservers  # one process per server

    # Controller, mpiexec, the daemons and the engines of both hosts existed...
    assert report["processes_while_running"] >= nservers + 2
    # ...and none is left after the kernel's shutdown, inside or outside the namespaces.
    assert report["left"] == []
    pid = report["kernel_pid"]
    assert wait_gone(pid, timeout=5) == []
    try:
        assert "casa_kernel" not in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        pass  # gone, as it should be
    assert time.monotonic() - started < 60
