"""The preflight's pure parts by tables, and its runner with a local agent (no namespaces).

The fake-host runs (ssh refused, data hidden, another casatasks, a hanging
host, in a real kernel) are in ``test_preflight_multihost.py``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from casa_kernel import preflight
from casa_kernel.config.settings import ClusterConfig
from casa_kernel.errors import CasaKernelError, ClusterError, PreflightError
from casa_kernel.preflight.agent import (
    NO_PYTHON,
    REACHED,
    Agent,
    agent_command,
    find_agent,
    remote_line,
)
from casa_kernel.preflight.judge import (
    REQUIREMENTS,
    Check,
    Context,
    Outcome,
    judge,
    parse_output,
)
from casa_kernel.preflight.probe import TAG, collect, decode_request, encode_request
from casa_kernel.preflight.report import Report
from casa_kernel.preflight.run import seed_env_paths

# ------------------------------------------------------------------ the agent


def which_of(*found: str):
    return lambda name: f"/usr/bin/{name}" if name in found else None


@pytest.mark.parametrize(
    ("environ", "mpi_args", "manager", "found", "expected"),
    [
        # PRRTE's default "ssh : rsh": the first on PATH
        ({}, [], None, ("ssh", "rsh"), Agent("ssh", ("ssh",))),
        ({}, [], None, ("rsh",), Agent("agent", ("rsh",))),
        ({}, [], None, (), Agent("missing", ("ssh",))),
        # the environment, as the harness sets it (an absolute path: not looked up)
        (
            {"PRTE_MCA_plm_ssh_agent": sys.executable},
            [],
            None,
            (),
            Agent("agent", (sys.executable,), "PRTE_MCA_plm_ssh_agent"),
        ),
        (
            {"PRTE_MCA_plm_ssh_agent": "/nonexistent/agent"},
            [],
            None,
            ("ssh",),
            Agent("missing", ("/nonexistent/agent",), "PRTE_MCA_plm_ssh_agent"),
        ),
        # OpenMPI 5 ignores the OMPI_MCA_ spelling of PRRTE's parameters
        ({"OMPI_MCA_plm_ssh_agent": "/opt/agent"}, [], None, ("ssh",), Agent("ssh", ("ssh",))),
        # mpiexec's own arguments win over the environment, with their args
        (
            {"PRTE_MCA_plm_ssh_agent": "/opt/agent", "PRTE_MCA_plm_ssh_args": "-p 2222"},
            ["--bind-to", "none", "--mca", "plm_rsh_agent", "ssh -x"],
            None,
            ("ssh",),
            Agent("ssh", ("ssh", "-x", "-p", "2222"), "mpiexec --mca plm_rsh_agent"),
        ),
        (
            {},
            ["-prtemca", "plm_ssh_agent", "rsh : ssh"],
            None,
            ("ssh",),
            Agent("ssh", ("ssh",), "mpiexec -prtemca plm_ssh_agent"),
        ),
        # inside a batch job the resource manager launches: no ssh
        ({"PRTE_MCA_plm_ssh_agent": "/opt/agent"}, [], "Slurm", ("ssh",), Agent("Slurm")),
        ({}, [], "PBS", (), Agent("PBS")),
    ],
)
def test_find_agent(environ, mpi_args, manager, found, expected) -> None:
    assert find_agent(environ, mpi_args, manager, which=which_of(*found)) == expected


@pytest.mark.parametrize(
    ("agent", "expected"),
    [
        (
            Agent("ssh", ("ssh", "-x")),
            ["ssh", "-x", "-o", "BatchMode=yes", "-o", "ConnectTimeout=7", "antares", "LINE"],
        ),
        (Agent("agent", ("/opt/agent", "-v")), ["/opt/agent", "-v", "antares", "LINE"]),
        (
            Agent("Slurm"),
            [
                "srun",
                "--overlap",
                "--nodes=1",
                "--ntasks=1",
                "--nodelist=antares",
                "--export=ALL",
                "--quiet",
                "/bin/sh",
                "-c",
                "LINE",
            ],
        ),
        (Agent("PBS"), ["pbsdsh", "-h", "antares", "/bin/sh", "-c", "LINE"]),
        (Agent("LSF"), ["blaunch", "antares", "/bin/sh", "-c", "LINE"]),
    ],
)
def test_agent_command(agent: Agent, expected: list[str]) -> None:
    assert agent_command(agent, "antares", "LINE", connect_timeout=7) == expected


def test_ssh_is_what_is_checked_only_outside_a_job() -> None:
    assert Agent("ssh", ("ssh",)).ssh_checked and Agent("agent", ("/a",)).ssh_checked
    assert not Agent("Slurm").ssh_checked
    assert Agent("Slurm").describe() == "the Slurm job's launcher"


# ------------------------------------------------------------------ the remote line, run


def run_line(line: str) -> subprocess.CompletedProcess[str]:
    """The remote line run the way ssh and the harness's agent run it: ``sh -c``."""
    return subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=60)


def test_remote_line_runs_the_probe_with_what_mpiexec_forwards(tmp_path: Path) -> None:
    folder = tmp_path / "work dir"  # a space: quoting survives the shell
    folder.mkdir()
    (folder / "m").write_text("marker 'x' $HOME")
    request = preflight.probe_request(
        {str(folder): str(folder / "m")}, [str(folder / "obs.ms")], {"PATH": ["/nonexistent-x"]}, ""
    )
    forwarded = {"CASASITECONFIG": "/tmp/it's here", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    done = run_line(remote_line(sys.executable, encode_request(request), forwarded))
    reached, no_python, facts = parse_output(done.stdout)
    assert done.returncode == 0, done.stderr
    assert reached and not no_python and facts is not None
    assert facts["folders"] == {str(folder): {"exists": True, "marker": "marker 'x' $HOME"}}
    assert facts["paths"] == {str(folder / "obs.ms"): False}
    assert facts["env"] == {"PATH": ["/nonexistent-x"]}
    assert facts["python"]["executable"] == sys.executable
    assert facts == collect(request)  # the same facts as in the kernel's own process


def test_remote_line_without_the_clients_python() -> None:
    done = run_line(remote_line("/nonexistent/bin/python", encode_request({}), {}))
    assert parse_output(done.stdout) == (True, True, None)


def test_probe_request_round_trip_is_shell_safe() -> None:
    request = {"folders": {"/a b/'c'": None}, "paths": ["$(reboot)"], "env": {}, "mpiexec": ""}
    word = encode_request(request)
    assert set(word) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
    assert decode_request(word) == request


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        ("", (False, False, None)),
        (f"{REACHED}\n", (True, False, None)),
        (f"{REACHED}\n{NO_PYTHON}\n", (True, True, None)),
        # a login banner before, a stray line after: the tagged line is found
        (f'Welcome!\n{REACHED}\n{TAG} {{"a": 1}}\nbye\n', (True, False, {"a": 1})),
        (f"{REACHED}\n{TAG} {{not json\n", (True, False, None)),
        # the tag alone proves the host was reached
        (f'{TAG} {{"a": 1}}\n', (True, False, {"a": 1})),
    ],
)
def test_parse_output(stdout: str, expected: tuple) -> None:
    assert parse_output(stdout) == expected


def test_seed_env_paths_keeps_what_exists_here() -> None:
    here = {"/venv/bin", "/usr/bin", "/venv/lib", "/site.py", "/opt/casa"}
    environ = {
        "PATH": "/venv/bin:/usr/bin:/usr/games:relative:/venv/bin",
        "LD_LIBRARY_PATH": "/venv/lib",
        "PYTHONPATH": "",
        "CASASITECONFIG": "/site.py",
        "CASAPATH": "/opt/casa linux local orion",
        "HOME": "/root",
    }
    assert seed_env_paths(environ, exists=here.__contains__) == {
        "PATH": ["/venv/bin", "/usr/bin"],  # /usr/games is not here either; relative skipped
        "LD_LIBRARY_PATH": ["/venv/lib"],
        "CASASITECONFIG": ["/site.py"],
        "CASAPATH": ["/opt/casa"],
    }


# ------------------------------------------------------------------ judging

FACTS: dict[str, Any] = {
    "host": "orion",
    "python": {"executable": "/venv/bin/python", "version": "3.11.2", "implementation": "cpython"},
    "versions": {
        "casa-kernel": "0.1.0",
        "casatasks": "6.7.0.31",
        "casatools": "6.7.0.31",
        "mpi4py": "4.1.2",
    },
    "mpiexec": {"path": "/venv/bin/mpiexec", "version": "mpiexec (Open MPI) 5.0.11", "problem": ""},
    "folders": {
        "/work": {"exists": True, "marker": "M1"},
        "/data": {"exists": True, "marker": "M2"},
        "/home/u/.local/state/casa-kernel/clusters": {"exists": True, "marker": "M3"},
    },
    "paths": {"/data/obs.ms": True},
    "env": {"PATH": [], "CASASITECONFIG": []},
}
SSH = Agent("ssh", ("ssh",))
CTX = Context(
    "orion",
    FACTS,
    SSH,
    "/venv/bin/python",
    "/work",
    ("/data/obs.ms",),
    {"/work": "M1", "/data": "M2", "/home/u/.local/state/casa-kernel/clusters": "M3"},
    20.0,
    "/home/u/.local/state/casa-kernel/clusters",
)


def answered(**changes: Any) -> Outcome:
    """A probe's outcome whose facts are the client's with ``changes`` (dotted keys)."""
    facts = copy.deepcopy(FACTS)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        target = facts
        for key in path:
            target = target[key if key in target else "/" + key]  # folders__work: "/work"
        target[last] = value
    return Outcome("antares", 0, f"{REACHED}\n{TAG} {json.dumps(facts)}\n")


def marks(checks: list[Check]) -> dict[str, bool | None]:
    assert all(c.host == "antares" for c in checks)
    return {c.requirement: c.ok for c in checks}


def failed(checks: list[Check]) -> list[tuple[str, str, str]]:
    return [(c.requirement, c.reason, c.fix) for c in checks if c.ok is False]


def test_judge_all_pass() -> None:
    checks = judge(answered(), CTX)
    assert marks(checks) == {r: True for r in REQUIREMENTS}
    reasons = {c.requirement: c.reason for c in checks}
    assert reasons["casatasks"] == "6.7.0.31" and reasons["openmpi"] == "5.0.11"
    assert reasons["workdir"] == "same folder (marker seen)"
    assert reasons["keys"] == "same folder (marker seen)"
    assert reasons["data"] == "1 path: same folder (marker seen)"
    assert reasons["env"] == "PATH, CASASITECONFIG"


def test_judge_without_vis_has_no_data_column() -> None:
    ctx = Context("orion", FACTS, SSH, "/venv/bin/python", "/work", (), {"/work": "M1"})
    # nor a keys column: no shared key folder (not encrypted across hosts)
    assert [c.requirement for c in judge(answered(), ctx)] == [
        r for r in REQUIREMENTS if r not in ("data", "keys")
    ]


def test_a_key_folder_that_is_another_folder_there_is_named() -> None:
    """Encrypted across hosts the servers read their key from the shared folder:
    a host whose home is not the client's fails, naming CASA_KERNEL_KEY_DIR."""
    outcome = answered(**{"folders__home/u/.local/state/casa-kernel/clusters__marker": None})
    [check] = [c for c in judge(outcome, CTX) if c.ok is False]
    assert check.requirement == "keys"
    assert check.reason == (
        "/home/u/.local/state/casa-kernel/clusters is another folder there (the marker file "
        "written here is not in it): not the same file system"
    )
    assert check.fix.startswith("set CASA_KERNEL_KEY_DIR to a folder antares mounts"), check.fix


@pytest.mark.parametrize(
    ("outcome", "requirement", "reason", "fix"),
    [
        (
            answered(versions__casatasks="6.6.0.20"),
            "casatasks",
            "6.6.0.20 there, 6.7.0.31 here",
            "install casatasks==6.7.0.31 for /venv/bin/python on antares",
        ),
        (
            answered(versions__casatools=None),
            "casatools",
            "not installed for /venv/bin/python there, 6.7.0.31 here",
            "install casatools==6.7.0.31",
        ),
        (answered(versions__mpi4py="3.1.6"), "mpi4py", "3.1.6 there, 4.1.2 here", "mpi4py==4.1.2"),
        (
            answered(**{"versions__casa-kernel": "0.0.9"}),
            "casa-kernel",
            "0.0.9 there, 0.1.0 here",
            "casa-kernel==0.1.0",
        ),
        (
            answered(python__version="3.11.9"),
            "python",
            "/venv/bin/python is cpython 3.11.9 there, cpython 3.11.2 here",
            "install Python 3.11.2 at /venv/bin/python on antares",
        ),
        (
            answered(mpiexec__version=None, mpiexec__problem="not found"),
            "openmpi",
            "/venv/bin/mpiexec: not found",
            "install the same MPI at /venv/bin/mpiexec on antares",
        ),
        (
            answered(mpiexec__version="mpiexec (Open MPI) 4.1.5"),
            "openmpi",
            "/venv/bin/mpiexec: 'mpiexec (Open MPI) 4.1.5' there, 'mpiexec (Open MPI) 5.0.11' here",
            "same MPI",
        ),
        (
            answered(env__PATH=["/venv/bin", "/opt/x"]),
            "env",
            "PATH: /venv/bin, /opt/x missing",
            "mirror the installation on antares (same paths), or remove those entries from PATH",
        ),
        (
            answered(folders__work__exists=False),
            "workdir",
            "/work not found",
            "start the notebook in a folder that antares mounts at the same path",
        ),
        (
            answered(folders__work__marker=None),
            "workdir",
            "/work is another folder there (the marker file written here is not in it): "
            "not the same file system",
            "shared file system",
        ),
        (
            answered(paths={"/data/obs.ms": False}),
            "data",
            "/data/obs.ms not found",
            "put the data on a file system antares mounts at the same path",
        ),
    ],
    ids=[
        "casatasks",
        "casatools-absent",
        "mpi4py",
        "casa-kernel",
        "python",
        "mpiexec-absent",
        "openmpi",
        "env",
        "workdir-absent",
        "workdir-not-shared",
        "data",
    ],
)
def test_judge_one_failure(outcome: Outcome, requirement: str, reason: str, fix: str) -> None:
    checks = judge(outcome, CTX)
    [(what, why, todo)] = failed(checks)
    assert (what, why) == (requirement, reason)
    assert fix in todo
    assert all(c.ok for c in checks if c.requirement != requirement)


def test_judge_data_missing_here_too() -> None:
    facts = copy.deepcopy(FACTS)
    facts["paths"] = {"/data/obs.ms": False}
    ctx = Context("orion", facts, SSH, "/venv/bin/python", "/work", ("/data/obs.ms",), {})
    [(_, reason, _)] = failed(judge(answered(paths={"/data/obs.ms": False}), ctx))
    assert reason == "/data/obs.ms not found (nor here)"


def test_judge_without_markers_checks_existence() -> None:
    ctx = Context("orion", FACTS, SSH, "/venv/bin/python", "/work", (), {"/work": ""})
    checks = judge(answered(folders__work__marker=None), ctx)
    assert {c.requirement: c.reason for c in checks}["workdir"] == (
        "exists (not writable here: no marker)"
    )
    assert not failed(checks)


UNREACHED_LATER = [r for r in REQUIREMENTS if r not in ("ssh", "keys")]  # keys: no key folder


@pytest.mark.parametrize(
    ("outcome", "agent", "reason", "fix"),
    [
        (
            Outcome(
                "antares", 255, "", "Warning: x\nroot@antares: Permission denied (publickey).\n"
            ),
            SSH,
            "root@antares: Permission denied (publickey). (exit code 255)",
            "ssh-copy-id antares",
        ),
        (
            Outcome("antares", 255, "", "ssh: Could not resolve hostname antares\n"),
            SSH,
            "ssh: Could not resolve hostname antares (exit code 255)",
            "`ssh -o BatchMode=yes antares true` must succeed without a prompt",
        ),
        (
            Outcome("antares", -9, "", "", timed_out=True),
            SSH,
            "no answer within 20 s",
            "ssh-keygen",
        ),
        (
            Outcome("antares", 1, "", "boom\n"),
            Agent("agent", ("/opt/agent",), "PRTE_MCA_plm_ssh_agent"),
            "boom (exit code 1)",
            "check the launcher agent /opt/agent (from PRTE_MCA_plm_ssh_agent)",
        ),
        (
            Outcome("antares", None, start_error="No such file or directory"),
            Agent("missing", ("ssh",)),
            "cannot run ssh (not found): No such file or directory",
            "install ssh on orion",
        ),
    ],
    ids=["publickey", "unknown-host", "timeout", "agent", "no-ssh"],
)
def test_judge_unreached_host(outcome: Outcome, agent: Agent, reason: str, fix: str) -> None:
    ctx = Context("orion", FACTS, agent, "/venv/bin/python", "/work", ("/data/obs.ms",), {})
    checks = judge(outcome, ctx)
    assert [(c.requirement, c.ok) for c in checks] == [("ssh", False)] + [
        (r, None) for r in UNREACHED_LATER
    ]
    assert checks[0].reason == reason
    assert fix in checks[0].fix


def test_judge_inside_a_job_does_not_check_ssh() -> None:
    ctx = Context("orion", FACTS, Agent("Slurm"), "/venv/bin/python", "/work", (), {"/work": "M1"})
    checks = judge(answered(), ctx)
    assert checks[0] == Check("antares", "ssh", None, "inside a Slurm job: not used")
    assert all(c.ok for c in checks[1:])
    [unreached] = [
        c for c in judge(Outcome("antares", 1, "", "srun: error: x\n"), ctx) if c.ok is False
    ]
    assert unreached.reason == "the Slurm job's launcher: srun: error: x (exit code 1)"
    assert "node of this Slurm job" in unreached.fix


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (
            Outcome("antares", 0, f"{REACHED}\n{NO_PYTHON}\n"),
            [("python", False, "/venv/bin/python not found")],
        ),
        (
            Outcome(
                "antares",
                1,
                f"{REACHED}\n",
                "/venv/bin/python: Error while finding module specification for "
                "'casa_kernel.preflight.probe' (ModuleNotFoundError: No module named "
                "'casa_kernel')\n",
            ),
            [("python", True, "3.11.2"), ("casa-kernel", False, "/venv/bin/python cannot import")],
        ),
        (
            Outcome("antares", 1, f"{REACHED}\n", "Segmentation fault\n"),
            [("python", False, "the probe failed: Segmentation fault (exit code 1)")],
        ),
        (
            Outcome("antares", -9, f"{REACHED}\n", "", timed_out=True),
            [("python", False, "the probe gave no answer within 20 s")],
        ),
    ],
    ids=["no-python", "no-casa-kernel", "crash", "slow"],
)
def test_judge_reached_without_facts(outcome: Outcome, expected: list) -> None:
    checks = judge(outcome, CTX)
    assert checks[0] == Check("antares", "ssh", True, "password-less")
    judged = [(c.requirement, c.ok, c.reason) for c in checks[1:] if c.ok is not None]
    assert [(r, ok) for r, ok, _ in judged] == [(r, ok) for r, ok, _ in expected]
    for (_, _, reason), (_, _, start) in zip(judged, expected):
        assert reason.startswith(start)
    assert all(c.ok is None for c in checks[1 + len(judged) :])


# ------------------------------------------------------------------ the report


def report_of(*outcomes: Outcome) -> Report:
    checks = [c for o in outcomes for c in judge(o, CTX)]
    return Report("orion", [o.host for o in outcomes], checks, 0.42, "ssh")


def test_report_all_pass_text_and_html() -> None:
    report = report_of(answered())
    assert report.ok and report.failures() == []
    text = repr(report.table())
    assert text.splitlines() == [
        "casa-kernel preflight from orion: 1 host in 0.42 s via ssh: all pass",
        "host     " + "  ".join(REQUIREMENTS),
        "antares  " + "  ".join("ok".ljust(len(r)) for r in REQUIREMENTS).rstrip(),
    ]
    html = report.table()._repr_html_()
    assert html.count("<tr>") == 2 and html.count(">ok</span>") == len(REQUIREMENTS)
    assert 'title="6.7.0.31"' in html  # the reason, on hover


def test_report_failures_name_host_requirement_and_what_to_do() -> None:
    bad = answered(versions__casatasks="6.6.0.20")
    gone = Outcome("sirius", 255, "", "ssh: connect to host sirius port 22: Connection refused\n")
    report = report_of(bad, gone)
    assert not report.ok
    table = report.table()
    text = repr(table)
    assert "2 failed on antares, sirius" in text.splitlines()[0]
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:4]}
    assert rows["antares"][REQUIREMENTS.index("casatasks")] == "FAIL"
    assert rows["sirius"] == ["FAIL"] + ["-"] * (len(REQUIREMENTS) - 1)
    assert text.splitlines()[4].startswith("antares casatasks: 6.6.0.20 there, 6.7.0.31 here -> ")
    html = table._repr_html_()
    assert html.count(">FAIL</span>") == 2 and "<li>sirius ssh: ssh: connect" in html

    error = report.error()
    assert isinstance(error, PreflightError) and isinstance(error, ClusterError)
    assert isinstance(error, CasaKernelError) and error.report is report
    lines = str(error).splitlines()
    assert lines[0] == (
        "the servers cannot be launched on antares, sirius: the preflight found 2 problems"
    )
    assert lines[1] == "  antares: casatasks: 6.6.0.20 there, 6.7.0.31 here"
    assert lines[2].startswith("    do: install casatasks==6.7.0.31")
    assert lines[3].startswith("  sirius: ssh: ssh: connect to host sirius port 22")
    assert lines[4].startswith("    do: set up password-less ssh from orion to sirius")
    assert "CASA_KERNEL_PREFLIGHT=0" in lines[-1]


def test_report_html_escapes_what_hosts_say() -> None:
    evil = Outcome("antares", 1, "", "<script>alert(1)</script>\n")
    html = report_of(evil).table()._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;" in html


# ------------------------------------------------------------------ when it runs


def write_hostfile(tmp_path: Path, text: str) -> str:
    path = tmp_path / "hosts.txt"
    path.write_text(text)
    return str(path)


def test_needed_only_for_other_hosts(tmp_path: Path) -> None:
    local = ClusterConfig.from_options(nprocs=3)
    remote = ClusterConfig.from_options(
        hostfile=write_hostfile(tmp_path, "localhost slots=1\nantares-x slots=2\n")
    )
    assert not preflight.needed(local, {})
    assert preflight.needed(remote, {})
    assert not preflight.needed(remote, {"CASA_KERNEL_PREFLIGHT": "0"})
    with pytest.raises(CasaKernelError, match="CASA_KERNEL_PREFLIGHT"):
        preflight.needed(remote, {"CASA_KERNEL_PREFLIGHT": "maybe"})
    assert preflight.remote_hosts(["localhost", "antares", "127.0.0.1", "antares", "b"]) == [
        "antares",
        "b",
    ]


@pytest.mark.parametrize(
    ("raw", "expected"), [("", 20.0), ("3", 3.0), (" 0.5 ", 0.5), ("0", None), ("nan", None)]
)
def test_time_limit(raw: str, expected: float | None) -> None:
    environ = {"CASA_KERNEL_PREFLIGHT_TIMEOUT": raw}
    if expected is None:
        with pytest.raises(CasaKernelError, match="CASA_KERNEL_PREFLIGHT_TIMEOUT"):
            preflight.time_limit(environ)
    else:
        assert preflight.time_limit(environ) == expected


# ------------------------------------------------------------------ the runner, for real

LOCAL_AGENT = """#!/bin/sh
host="$1"; shift
case "$host" in
  down*) echo "ssh: connect to host $host port 22: No route to host" >&2; exit 255 ;;
  slow*) exec sleep 60 ;;
esac
exec sh -c "$*"
"""


def test_check_runs_every_host_at_once_through_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real agent (local: every 'host' is this machine under another name), real probes."""
    agent = tmp_path / "agent"
    agent.write_text(LOCAL_AGENT)
    agent.chmod(0o755)
    data = tmp_path / "data" / "obs.ms"
    data.mkdir(parents=True)
    hostfile = write_hostfile(
        tmp_path, "localhost slots=1\nup1-x slots=1\ndown1-x slots=1\nslow1-x slots=1\n"
    )
    config = ClusterConfig.from_options(hostfile=hostfile)
    monkeypatch.setenv("PRTE_MCA_plm_ssh_agent", str(agent))
    monkeypatch.chdir(tmp_path)
    report = preflight.check(config, vis=["data/obs.ms"], timeout=3.0)
    assert report.hosts == ["up1-x", "down1-x", "slow1-x"]
    by_host = {h: {c.requirement: c for c in report.checks if c.host == h} for h in report.hosts}
    assert all(c.ok for c in by_host["up1-x"].values())
    assert by_host["up1-x"]["data"].reason == "1 path: same folder (marker seen)"
    assert by_host["down1-x"]["ssh"].reason == (
        "ssh: connect to host down1-x port 22: No route to host (exit code 255)"
    )
    assert by_host["slow1-x"]["ssh"].reason == "no answer within 3 s"
    # all at once: the slow host's 3 s limit is the whole wait (liveness bound)
    assert report.seconds < 20
    assert not list(tmp_path.rglob(".casa-kernel-preflight-*"))  # markers removed
    with pytest.raises(PreflightError, match="down1-x: ssh"):
        raise report.error()


def test_check_of_one_host_only_costs_nothing() -> None:
    report = preflight.check(ClusterConfig.from_options(nprocs=3))
    assert report.ok and report.hosts == [] and report.seconds == 0
    assert "nothing to check" in repr(report.table())
    assert preflight.require(ClusterConfig.from_options(nprocs=3)) is None


def test_an_interrupted_check_leaves_no_probe_behind(tmp_path: Path) -> None:
    """Ctrl-C in the notebook while a host hangs: the probes' sessions are killed.

    The check runs in a process of its own that gets a real SIGINT, as the
    kernel does (it interrupts the wait in its syscall); pytest's own process
    is never signalled, whatever its signal handlers are.
    """
    import signal
    import time

    import psutil

    agent = tmp_path / "agent"
    agent.write_text("#!/bin/sh\nexec sleep 61.25\n")
    agent.chmod(0o755)
    script = (
        "from casa_kernel import preflight\n"
        "try:\n"
        f"    preflight.run_probes(['h1', 'h2'], preflight.Agent('agent', ({str(agent)!r},)),"
        " 'true', 30.0)\n"
        "except KeyboardInterrupt:\n"
        "    print('INTERRUPTED', flush=True)\n"
    )
    checker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)

    def hanging() -> list[psutil.Process]:
        return [
            p
            for p in psutil.process_iter(["cmdline"])
            if (p.info["cmdline"] or [])[-2:] == ["sleep", "61.25"]
        ]

    try:
        deadline = time.monotonic() + 30
        while len(hanging()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(hanging()) == 2, "the two probes never started"
        checker.send_signal(signal.SIGINT)
        out, _ = checker.communicate(timeout=20)
    finally:
        if checker.poll() is None:
            checker.kill()
            checker.wait()
    assert out.strip() == "INTERRUPTED"
    assert hanging() == []


def test_a_configured_agent_that_does_not_exist(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PRTE_MCA_plm_ssh_agent", "/nonexistent/agent")
    hostfile = write_hostfile(tmp_path, "localhost slots=1\nantares-x slots=1\n")
    report = preflight.check(ClusterConfig.from_options(hostfile=hostfile), timeout=3.0)
    [failure] = report.failures()
    assert (failure.host, failure.requirement) == ("antares-x", "ssh")
    assert failure.reason == (
        "cannot run /nonexistent/agent (not found) (from PRTE_MCA_plm_ssh_agent): not found"
    )
    assert failure.fix == "make PRTE_MCA_plm_ssh_agent name an executable launcher agent"


def test_the_command_line_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``casa-kernel check``: the table on stdout, exit code 1 on a failure, 0 when all pass."""
    from casa_kernel.cli import main

    agent = tmp_path / "agent"
    agent.write_text(LOCAL_AGENT)
    agent.chmod(0o755)
    monkeypatch.setenv("PRTE_MCA_plm_ssh_agent", str(agent))
    monkeypatch.chdir(tmp_path)
    hostfile = write_hostfile(tmp_path, "localhost slots=1\nup1-x slots=1\ndown1-x slots=1\n")
    assert main(["check", "--hostfile", hostfile, "-n", "2"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("casa-kernel preflight from ") and " 1 host in " in first, first
    assert first.endswith(f"via {agent} (from PRTE_MCA_plm_ssh_agent): all pass"), first
    assert out.splitlines()[2].startswith("up1-x ")
    assert main(["check", "--hostfile", hostfile, "--vis", "nowhere.ms"]) == 1
    out = capsys.readouterr().out
    assert "up1-x data: " + str(tmp_path / "nowhere.ms") + " not found (nor here)" in out
    assert "down1-x ssh: ssh: connect to host down1-x port 22: No route to host" in out
    assert main(["check", "--hostfile", str(tmp_path / "missing.txt")]) == 2


# ------------------------------------------------------------------ inside a batch job

JOB = preflight.JOB_TAG


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        # the job has not run its probes yet (pending, or still probing)
        ("", None),
        (f"{preflight.JOB_NODES} antares orion \n{JOB} orion {REACHED}\n", None),
        # every node answered; mpiexec's own lines after DONE are not the preflight's
        (
            f"{preflight.JOB_NODES} antares orion \n{JOB} orion {REACHED}\n"
            f"{JOB} antares {REACHED}\n{JOB} antares {TAG} {{}}\n{JOB} orion {TAG} {{}}\n"
            f"{preflight.JOB_DONE} 0 98\nprterun: late words\n",
            (
                [
                    ("antares", 0, f"{REACHED}\n{TAG} {{}}", "", False),
                    ("orion", 0, f"{REACHED}\n{TAG} {{}}", "", False),
                ],
                0.098,
            ),
        ),
        # one node never answered: the launcher's own words are its reason
        (
            f"{preflight.JOB_NODES} antares orion \nsrun: error: antares: task 0: refused\n"
            f"{JOB} orion {REACHED}\n{JOB} orion Traceback (most recent call last):\n"
            f"{preflight.JOB_DONE} 1 2034\n",
            (
                [
                    ("antares", 1, "", "srun: error: antares: task 0: refused", False),
                    (
                        "orion",
                        1,
                        f"{REACHED}\nTraceback (most recent call last):",
                        "Traceback (most recent call last):",
                        False,
                    ),
                ],
                2.034,
            ),
        ),
        # the probes ran past the limit (timeout's 124): the silent node timed out
        (
            f"{preflight.JOB_NODES} antares \n{preflight.JOB_DONE} 124 20001\n",
            ([("antares", 124, "", "", True)], 20.001),
        ),
    ],
)
def test_parse_job_output(output: str, expected: Any) -> None:
    parsed = preflight.parse_job_output(output)
    if expected is None:
        assert parsed is None
        return
    outcomes, seconds = parsed
    got = [(o.host, o.returncode, o.stdout, o.stderr, o.timed_out) for o in outcomes]
    assert (got, seconds) == tuple(expected)


def test_job_output_shown_to_the_user_is_mpiexec_s_alone() -> None:
    output = (
        f"{preflight.JOB_NODES} a \n{JOB} a {REACHED}\n{preflight.JOB_DONE} 0 5\n"
        "prterun: a daemon failed\n"
    )
    assert preflight.without_job_lines(output) == "prterun: a daemon failed"


def test_job_preflight_is_only_for_servers_from_the_queue() -> None:
    from casa_kernel.config.batch import parse_batch_spec

    assert preflight.for_job(ClusterConfig.from_options(nprocs=3)) is None
    queued = ClusterConfig.from_options(batch=parse_batch_spec("slurm", 2))
    assert preflight.for_job(queued, {"CASA_KERNEL_PREFLIGHT": "0"}) is None
    lines = preflight.job_script_lines("slurm", "echo hi", 20)
    assert any(line.startswith(f'echo "{preflight.JOB_NODES} ') for line in lines)
    assert any("timeout -k 5 20 srun --nodes=" in line for line in lines)
    assert not any(
        preflight.JOB_NODES in line for line in preflight.job_script_lines("pbs", "x", 5)
    )


def test_job_preflight_runs_in_a_job_script_for_real(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PBS's lines run by sh, ``pbsdsh -u`` being this machine (no PBS here):
    the real probe on the 'node', its quoting through sh -c, the kernel's
    judging of the output; then one node that lacks the folder."""
    from casa_kernel.config.batch import parse_batch_spec

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pbsdsh").write_text('#!/bin/sh\n[ "$1" = -u ] && shift\nexec "$@"\n')
    (bin_dir / "pbsdsh").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("CASA_KERNEL_KEY_DIR", str(tmp_path / "keys"))
    config = ClusterConfig.from_options(batch=parse_batch_spec("pbs", 2))
    job = preflight.for_job(config, {})
    assert job is not None
    markers = job.marker_paths()
    assert markers and all(os.path.exists(p) for p in markers)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def run(lines: list[str]) -> str:
        script = tmp_path / "job.sh"
        script.write_text("\n".join(["#!/bin/sh", *lines]) + "\n")
        return subprocess.run(
            ["sh", str(script)], capture_output=True, text=True, env=env, timeout=60
        ).stdout

    output = run(job.script_lines)
    assert job.report(output[: output.index(preflight.JOB_DONE)]) is None  # not done yet
    report = job.report(output)
    node = os.uname().nodename
    assert report is not None and report.hosts == [node], output
    assert report.ok, report.error()
    passed = {c.requirement: c.reason for c in report.checks}
    assert passed["workdir"] == "same folder (marker seen)"
    assert passed["casa-kernel"] == collect({})["versions"]["casa-kernel"]
    # the same node, as if it did not mount the folder: the marker is not there
    os.rename(markers[0], markers[0] + ".away")
    report = job.report(run(job.script_lines))
    assert report is not None and not report.ok
    (failure,) = report.failures()
    assert (failure.host, failure.requirement) == (node, "workdir")
    os.rename(markers[0] + ".away", markers[0])
    job.remove_markers()
    assert not any(os.path.exists(p) for p in markers)
