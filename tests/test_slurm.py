"""casa-kernel on a real Slurm: inside a job, and servers from the batch queue.

The Slurm is Debian's slurm-wlm (22.05) with munge, started by the fixture with
two nodes, orion (3 CPUs) and antares (2 CPUs), in namespaces of this machine
(``tests/slurm_harness.py``); the kernels are real, started by jupyter_client
from ``tests/slurm/driver.py`` on the login node or inside a job. Nothing is
mocked. Needs root (namespaces) and the Slurm packages; as root, a missing
package is a failure, not a skip, so CI always runs it.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from slurm_harness import Slurm, slurm_for_test

DRIVER = Path(__file__).resolve().parent / "slurm" / "driver.py"
VENV_BIN = str(Path(sys.executable).parent)

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux namespaces"),
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0,
        reason="needs root: the Slurm nodes are namespaces",
    ),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    with slurm_for_test(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def job_env(cluster: Slurm, **extra: str) -> dict[str, str]:
    """What a user's shell on the login node has: this venv on PATH, MPI over va."""
    env = cluster.env(**extra)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    # The "nodes" share one machine: MPI between them over the veth, not lo.
    env["OMPI_MCA_btl_tcp_if_include"] = "va"
    for key in ("CASA_KERNEL_NPROCS", "CASA_KERNEL_HOSTFILE", "CASA_KERNEL_MPIEXEC"):
        env.pop(key, None)
    return env


def report(text: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith("{"):
            merged.update(json.loads(line))
    return merged


@contextlib.contextmanager
def explained(got: dict[str, Any]) -> Iterator[None]:
    """On a failed assert, show the driver's whole report (what each cell said)."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- driver report:\n{json.dumps(got, indent=1)}") from None


def status_rows(text: str) -> tuple[str, list[list[str]]]:
    """Title and rows of ``%casa_cluster status``; CASA's cube client's row (when
    there is one: not for servers from the queue) as ``["cube client", host, ...]``."""
    lines = text.strip("'\"").splitlines()
    rows = [line.split() for line in lines[2:]]
    return lines[0], [
        ["cube client", *row[2:]] if row[:2] == ["cube", "client"] else row for row in rows
    ]


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("install_args", "job_args", "ranks", "title"),
    [
        (  # the mpicasa rule: the client holds one antares slot; servers antares 1, orion 3
            [],
            ["-N2", "-n5"],
            [(0, "antares", 6), (1, "orion", 6), (2, "orion", 6), (3, "orion", 6)],
            "client on antares, 4 servers, N=5 (Slurm job {job}: antares 2, orion 3); "
            "traffic encrypted (CurveZMQ)",
        ),
        (  # one node: everything local to it
            [],
            ["-N1", "-n3", "-w", "orion"],
            [(0, "orion", 1), (1, "orion", 1)],
            "client on orion, 2 servers, N=3 (Slurm job {job}: orion 3); "
            "traffic not encrypted (loopback only)",
        ),
    ],
    ids=["2-nodes", "1-node"],
)
def test_kernel_in_a_job_fills_its_allocation(
    cluster: Slurm,
    tmp_path: Path,
    install_args: list[str],
    job_args: list[str],
    ranks: list[tuple[int, str, int]],
    title: str,
) -> None:
    """A batch job runs the kernel (started by jupyter_client from an installed
    kernelspec) on its first node; the servers fill the job's other slots, one
    MPI world (the allreduce of the ranks)."""
    prefix = tmp_path / "prefix"
    install = subprocess.run(
        [f"{VENV_BIN}/casa-kernel", "install", "--prefix", str(prefix), *install_args],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    # without -n nothing sizes the cluster but the job
    assert ("CASA_KERNEL_NPROCS" in install.stdout) == bool(install_args)
    assert ("every slot of the batch job" in install.stdout) != bool(install_args)
    out = tmp_path / "job.out"
    env = job_env(cluster, JUPYTER_PATH=str(prefix / "share" / "jupyter"))
    # Submitted, then followed with squeue: `sbatch --wait` polls at growing
    # intervals and returned ~25 s after this job had ended.
    done = cluster.run(
        "sbatch",
        "--parsable",
        *job_args,
        f"--output={out}",
        f"--chdir={tmp_path}",
        "--wrap",
        f"{sys.executable} {DRIVER} in-job --kernel casa-mpi",
        env=env,
    )
    job_id = done.stdout.strip().split(";")[0]
    assert cluster.wait_queue_empty(timeout=120) == [], cluster.logs()
    text = out.read_text() if out.exists() else ""
    state = cluster.run("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T").stdout.strip()
    assert state == "COMPLETED", f"{state}\n{text}\n{cluster.logs()}"
    got = report(text)
    client = ranks[0][1]
    assert got["host"] == client, text  # the job's first node (Slurm orders by name)

    parallel = got["parallel"]
    assert parallel["status"] == "ok", parallel["traceback"] or parallel["error"]
    assert ast.literal_eval(parallel["result"]) == ranks
    status = got["status"]
    assert status["status"] == "ok", status["traceback"] or status["error"]
    got_title, rows = status_rows(status["result"])
    # CASA's cube client holds the client's slot on the job's first node
    assert rows[0][:2] == ["cube client", client], rows
    rows = rows[1:]
    # (the mpiexec and mpi4py's MPI, named in the title, are tests/test_mpi_choice.py's)
    got_title = re.sub(r"mpiexec \S+ \([^)]*\); mpi4py's MPI: [^;]*; ", "", got_title)
    assert got_title == "CASA cluster (running): " + title.format(job=job_id)
    assert [(int(r[0]), r[1], r[3]) for r in rows] == [(r, h, "idle") for r, h, _ in ranks]
    assert got["processes_while_running"] >= len(ranks) + 1
    if any(host != client for _, host, _ in ranks):
        # mpiexec started its daemons as a step of the job (srun), not over ssh
        assert any(
            step.startswith(f"{job_id}.") and "prted" in step and "orion" in step
            for step in got["steps"]
        ), got["steps"]
    check = got["check"]
    assert check["status"] == "ok", check["error"]
    lines = check["result"].strip("'\"").splitlines()
    if any(host != client for _, host, _ in ranks):
        # the preflight reached orion through the job's srun: no ssh requirement there
        assert "via the Slurm job's launcher: all pass" in lines[0], check["result"]
        other = next(line.split() for line in lines[2:] if line.split()[0] != client)
        assert other[:2] == ["orion", "-"] and set(other[2:]) == {"ok"}, check["result"]
    else:
        assert "nothing to check" in lines[0], check["result"]
    assert got["left"] == []
    assert cluster.wait_queue_empty() == []


def run_queue_driver(
    cluster: Slurm, tmp_path: Path, *args: str, mode: str = "queue"
) -> dict[str, Any]:
    done = cluster.run(
        sys.executable,
        str(DRIVER),
        mode,
        *args,
        env=job_env(cluster),
        timeout=220,
        check=False,
    )
    got = report(done.stdout)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{cluster.logs()}"
    return got


@pytest.mark.timeout(240)
def test_servers_from_the_queue(cluster: Slurm, tmp_path: Path) -> None:
    """From the login node: one Slurm job of servers on both nodes; a scancel
    mid-cell is an error naming the job; the next cell gets a new job; stop and
    shutdown leave nothing in squeue or ps."""
    start = "%casa_cluster start --slurm -n 5 --time 10 --sbatch-arg=--nodes=2"
    got = run_queue_driver(cluster, tmp_path, "--start", start)
    with explained(got):
        assert got["host"] == "login"
        assert got["start"]["status"] == "ok", got["start"]["traceback"] or got["start"]["error"]
        running = got["queue_while_running"]
        assert len(running) == 1 and running[0].endswith("RUNNING casa-servers"), running
        first_job = running[0].split()[0]

        parallel = got["parallel"]
        assert parallel["status"] == "ok", parallel["traceback"] or parallel["error"]
        ranks = ast.literal_eval(parallel["result"])
        assert [r[0] for r in ranks] == [0, 1, 2, 3]
        assert {r[2] for r in ranks} == {6}  # one MPI world
        assert {r[1] for r in ranks} == {"antares", "orion"}  # servers on both nodes

        # encrypted (servers from the queue may be anywhere): the HMAC key reached
        # the 4 servers by the shared key file, not in the job's environment or
        # script, which Slurm carries to the nodes and keeps with the job
        exposure = got["key_exposure"]
        assert exposure["engines"] == [{"url_file": True, "info_in_env": False}] * 4, exposure
        assert exposure["key_found"] and exposure["script_read"], exposure
        assert not exposure["key_in_script"], exposure
        assert exposure["job_env_read"], exposure  # (else the next line proves nothing)
        assert not exposure["key_in_job_env"] and not exposure["info_in_job_env"], exposure

        # a server killed mid-cell: recovered as without Slurm, in a new job
        killed = got["killed"]
        assert killed["status"] == "ok", killed["traceback"] or killed["error"]
        assert ast.literal_eval(killed["result"]) == [0, 1, 2, 3]
        assert "started new servers and re-ran" in killed["stderr"], killed
        (replacement,) = got["queue_after_kill"]
        assert replacement.split()[0] != first_job, replacement
        first_job = replacement.split()[0]

        cancelled = got["cancelled"]
        assert cancelled["status"] == "error"
        assert got["cancelled_jobs"] == [first_job]
        assert f"Slurm job {first_job} ended (CANCELLED" in cancelled["traceback"], cancelled
        assert cancelled["seconds"] - killed["seconds"] < 30  # not the cell's 60 s sleep

        again = got["again"]
        assert again["status"] == "ok", again["traceback"] or again["error"]
        assert [r[0] for r in ast.literal_eval(again["result"])] == [0, 1, 2, 3]
        (second,) = got["queue_again"]
        assert second.split()[0] != first_job and second.endswith("RUNNING casa-servers")
        assert f"Slurm job {second.split()[0]} RUNNING" in got["status"]["result"]

        # restart: the running job is cancelled and gone before a new one is queued
        assert got["restart"]["status"] == "ok", got["restart"]["traceback"]
        (third,) = got["queue_after_restart"]
        assert third.split()[0] not in (first_job, second.split()[0])
        # stop: cancelled, the queue is empty; start again: one job
        assert got["stop"]["status"] == "ok", got["stop"]["traceback"]
        assert got["queue_after_stop"] == []
        assert got["start_again"]["status"] == "ok", got["start_again"]["traceback"]
        assert len(got["queue_again_running"]) == 1
        # kernel shutdown with that job running: cancelled, nothing left anywhere
        assert got["queue_after_shutdown"] == []
        assert got["left"] == []


@pytest.mark.timeout(150)
def test_kernel_death_cancels_its_job(cluster: Slurm, tmp_path: Path) -> None:
    """A pending job is shown with its reason; SIGKILL of the kernel, while its
    job runs or while it is still pending: the watchdog cancels the job."""
    got = run_queue_driver(
        cluster,
        tmp_path,
        "--kill",
        "--start",
        "%casa_cluster start --slurm -n 3 --time 5 --sbatch-arg=--hold",
    )
    start = got["start"]
    assert start["status"] == "ok", start["traceback"] or start["error"]
    # the job was held for 3 s: the cell said so, with Slurm's reason, then went on
    # to ready (the start's live display, as text: "casa-kernel: starting the CASA
    # cluster: ... (Slurm job 12 PENDING (JobHeldUser); 0/2 servers registered)").
    # Whether a "RUNNING; 1/2" line shows in between depends on when squeue is
    # next asked (every 2 s) against how fast the servers register: not asserted.
    held = re.search(r"\(Slurm job \d+ PENDING \(JobHeldUser\); 0/2", start["display"])
    assert held, start
    ready = re.search(r"2/2 servers in [\d.]+ s; ready", start["display"])
    assert ready and ready.start() > held.start(), start
    assert len(got["queue_while_running"]) == 1
    assert got["parallel"]["status"] == "ok"
    assert got["queue_after_kill"] == []
    assert got["left"] == []

    # a kernelspec with servers from the queue (CASA_KERNEL_BATCH): the job is
    # submitted at kernel start; killed while that job pends, the watchdog
    # cancels it
    got = run_queue_driver(
        cluster, tmp_path, "--batch", "slurm --time 5 --sbatch-arg=--hold", mode="kill-pending"
    )
    assert "PENDING (JobHeldUser)" in got["pending_output"]
    (pending,) = got["queue_while_pending"]
    assert pending.endswith("PENDING casa-servers"), pending
    assert got["queue_after_kill"] == []
    assert got["left"] == []
    # the job's preflight marker waits in the kernel's folder while the job
    # pends; the watchdog removes it with the rest
    assert len(got["markers_while_pending"]) == 1, got
    assert got["markers_after"] == [], got


@pytest.mark.timeout(180)
def test_job_preflight_names_the_node_without_the_shared_folder(
    cluster: Slurm, tmp_path: Path
) -> None:
    """Servers from the queue run on nodes nobody knows before the job starts:
    the job checks them before its mpiexec. The kernel's folder is not on
    antares (hidden there): the start fails at once with ONE error naming
    antares, the requirement and what to do; the job is cancelled; no marker
    file, job or process is left."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    start = "%casa_cluster start --slurm -n 5 --time 5 --sbatch-arg=--nodes=2"
    with cluster.hidden("antares", folder):
        got = run_queue_driver(
            cluster, tmp_path, "--start", start, "--cwd", str(folder), mode="preflight"
        )
    with explained(got):
        reply = got["start"]
        assert reply["status"] == "error", reply
        message = reply["error"]
        assert "cannot be launched on antares:" in message, message
        assert f"antares: workdir: {folder} is another folder there" in message, message
        assert "do: start the notebook in a folder that antares mounts" in message, message
        assert "orion" not in message, message  # orion shares the folder
        # long before the servers' own wait for their connection (60 s) ran out
        assert reply["seconds"] < 60, reply
        assert got["queue_after_start"] == []  # the job was cancelled (not left to time out)
        # status says so too (and how to go on)
        assert "the cluster failed to start" in got["status"]["error"], got["status"]
        assert "then %casa_cluster restart" in got["status"]["error"], got["status"]
        assert got["markers"] == []
        assert got["left"] == []
