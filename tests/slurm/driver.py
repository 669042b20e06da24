"""Drive a real casa-kernel on the Slurm of ``tests/slurm_harness.py``.

Two ways of running, each printing one JSON object per line on stdout:

``in-job``
    Run by ``sbatch`` as the job's batch script, so on the job's first node and
    inside its allocation: starts the kernelspec named ``--kernel`` (installed by
    the test without -n/--hostfile), runs an SPMD cell and ``%casa_cluster
    status``, shuts the kernel down and reports what is left.
``queue``
    Run on the login node (outside any job): ``%casa_cluster start --slurm``,
    an SPMD cell, status, a cell during which the job is cancelled (scancel),
    the next cell (a new job), then stop; or, with ``--kill``, SIGKILL of the
    kernel while its job runs (the watchdog must cancel it).
``kill-pending``
    A kernel whose kernelspec asks for servers from the queue
    (``CASA_KERNEL_BATCH``) is killed while their job is held in the queue.
``preflight``
    A kernel started in ``--cwd`` (a folder one node does not share) asks the
    queue for servers: the start must fail on the job's preflight; reports the
    queue after it, marker files left in the folder, and processes left.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for kernels

from kernels import (  # noqa: E402
    Reply,
    cluster_processes,
    execute,
    kernel_env,
    kernel_pid,
    running_kernel,
    wait_gone,
)

SPMD_CELL = """%%casa_parallel
from mpi4py import MPI
(rank, MPI.Get_processor_name(), comm.allreduce(rank))
"""


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def summary(reply: Reply, started: float) -> dict[str, object]:
    return {
        "status": reply.status,
        "result": reply.result,
        "error": reply.error,
        "stdout": reply.stdout,
        "stderr": reply.stderr,
        # the live displays (the start's progress) as text, every update
        "display": "\n".join(
            content["data"].get("text/plain", "") for _, content in reply.display_messages()
        ),
        "traceback": reply.traceback[-3000:],
        "seconds": round(time.monotonic() - started, 2),
    }


def queue() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T %j"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.strip()]


def in_job(kernel: str) -> None:
    started = time.monotonic()
    with running_kernel(kernel_env(), kernel_name=kernel) as (km, kc):
        pid = kernel_pid(km)
        emit(kernel_pid=pid, host=os.uname().nodename)
        emit(parallel=summary(execute(kc, SPMD_CELL, timeout=90), started))
        emit(status=summary(execute(kc, "%casa_cluster status", timeout=30), started))
        emit(processes_while_running=len(cluster_processes(pid)))
        # the preflight of the job's other node, through srun (no ssh inside a job)
        emit(check=summary(execute(kc, "%casa_cluster check", timeout=60), started))
        # the job's steps: mpiexec's daemons, if it launched them through Slurm
        steps = subprocess.run(
            ["squeue", "-s", "-h", "-o", "%i %j %N"], capture_output=True, text=True
        )
        emit(steps=steps.stdout.splitlines())
    left = wait_gone(pid, timeout=15)
    emit(left=[" ".join(p.cmdline()) for p in left if p.is_running()])


def job_ids(text: str) -> list[str]:
    return [word for word in text.replace(",", " ").split() if word.isdigit()]


def release_held_job(after: float) -> None:
    """In the background: once our held job is queued, release it ``after`` seconds later."""

    def release() -> None:
        held: list[str] = []
        while not held:
            held = [line.split()[0] for line in queue() if line.endswith("casa-servers")]
            time.sleep(0.1)
        time.sleep(after)
        subprocess.run(["scontrol", "release", held[0]], check=False)

    threading.Thread(target=release, daemon=True).start()


def key_exposure(pid: int) -> dict[str, object]:
    """Encrypted, servers from the queue read the HMAC key from a shared file: how
    each server got its connection info, and whether the key is in what Slurm
    carries and keeps for the job (its batch script, its stored environment)."""
    engines, key = [], ""
    for proc in cluster_processes(pid):
        try:
            argv, environ = proc.cmdline(), proc.environ()
        except Exception:
            continue
        if "--mpi" not in argv or os.path.basename(argv[0]) in ("mpiexec", "prterun"):
            continue
        prefix = "--IPEngine.url_file="
        url_file = next((a[len(prefix) :] for a in argv if a.startswith(prefix)), "")
        engines.append(
            {"url_file": bool(url_file), "info_in_env": "IPP_CONNECTION_INFO" in environ}
        )
        profile = environ.get("IPP_PROFILE_DIR")
        if not key and profile:  # the controller's own copy, in the kernel's private folder
            for path in Path(profile, "security").glob("*-engine.json"):
                key = json.loads(path.read_text()).get("key", "")
    (job,) = [line.split()[0] for line in queue()]
    script = subprocess.run(
        ["scontrol", "write", "batch_script", job, "-"], capture_output=True, text=True
    ).stdout
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True)
    state = next(
        line.split("=", 1)[1].strip()
        for line in config.stdout.splitlines()
        if line.startswith("StateSaveLocation")
    )
    stored = list(Path(state).glob(f"hash.*/job.{job}/environment"))
    job_env = stored[0].read_bytes() if stored else b""
    return {
        "engines": engines,
        "key_found": bool(key),
        "script_read": "mpiexec" in script,
        "key_in_script": bool(key) and key in script,
        "job_env_read": b"SLURM" in job_env or b"PATH=" in job_env,
        "key_in_job_env": bool(key) and key.encode() in job_env,
        "info_in_job_env": b"IPP_CONNECTION_INFO" in job_env,
    }


def in_queue(start: str, kill: bool) -> None:
    started = time.monotonic()
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="2")) as (km, kc):
        pid = kernel_pid(km)
        emit(kernel_pid=pid, host=os.uname().nodename)
        execute(kc, "%casa_cluster stop", timeout=60)
        if kill:
            release_held_job(3)  # the start line holds the job (--hold): it pends
        emit(start=summary(execute(kc, start, timeout=120), started))
        emit(queue_while_running=queue())
        emit(parallel=summary(execute(kc, SPMD_CELL, timeout=90), started))
        if not kill:
            emit(key_exposure=key_exposure(pid))
        if kill:
            os.kill(pid, signal.SIGKILL)
            km.provisioner.process.wait(timeout=10)  # type: ignore[union-attr]
            deadline = time.monotonic() + 30
            while queue() and time.monotonic() < deadline:
                time.sleep(0.2)
            emit(queue_after_kill=queue(), seconds=round(time.monotonic() - started, 2))
            left = wait_gone(pid, timeout=15)
            emit(left=[" ".join(p.cmdline()) for p in left if p.is_running()])
            return
        # SIGKILL of one server mid-cell: its job ends, a new one is queued and
        # the cell's work re-run there (the usual recovery)
        pids = ast.literal_eval(
            execute(kc, "%%casa_parallel\nimport os\nos.getpid()", timeout=30).result or "[]"
        )
        victim = threading.Timer(2.0, os.kill, (pids[1], signal.SIGKILL))
        victim.start()
        cell = "%%casa_parallel\nimport time\ntime.sleep(6)\nrank"
        emit(killed=summary(execute(kc, cell, timeout=90), started), queue_after_kill=queue())
        victim.join()
        # scancel the job while a cell runs on its servers
        jobs = [line.split()[0] for line in queue()]

        def cancel() -> None:
            time.sleep(3)
            subprocess.run(["scancel", *jobs], check=False)

        threading.Thread(target=cancel, daemon=True).start()
        cell = "%%casa_parallel\nimport time\ntime.sleep(60)\nrank"
        emit(cancelled=summary(execute(kc, cell, timeout=90), started), cancelled_jobs=jobs)
        emit(again=summary(execute(kc, SPMD_CELL, timeout=120), started))
        emit(queue_again=queue())
        emit(status=summary(execute(kc, "%casa_cluster status", timeout=30), started))
        emit(restart=summary(execute(kc, "%casa_cluster restart", timeout=120), started))
        emit(queue_after_restart=queue())
        emit(stop=summary(execute(kc, "%casa_cluster stop", timeout=60), started))
        emit(queue_after_stop=queue())
        emit(start_again=summary(execute(kc, start, timeout=120), started))
        emit(queue_again_running=queue())
        # then the kernel's shutdown, with the job running
    left = wait_gone(pid, timeout=15)
    emit(
        left=[" ".join(p.cmdline()) for p in left if p.is_running()],
        queue_after_shutdown=queue(),
        seconds=round(time.monotonic() - started, 2),
    )


def kill_pending(spec: str) -> None:
    """A kernelspec whose servers come from the queue (CASA_KERNEL_BATCH): the
    kernel submits their job at start; SIGKILL of the kernel while it pends."""
    env = kernel_env(CASA_KERNEL_NPROCS="3", CASA_KERNEL_BATCH=spec)
    with running_kernel(env) as (km, kc):
        pid = kernel_pid(km)
        emit(kernel_pid=pid)
        msg_id = kc.execute("%casa_cluster status")  # waits for the servers
        seen = ""
        deadline = time.monotonic() + 60
        while "PENDING (JobHeldUser)" not in seen and time.monotonic() < deadline:
            msg = kc.get_iopub_msg(timeout=max(1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                seen += msg["content"]["text"]
            elif msg["msg_type"] in ("display_data", "update_display_data"):
                seen += msg["content"]["data"].get("text/plain", "") + "\n"
        emit(pending_output=seen, queue_while_pending=queue(), markers_while_pending=markers())
        os.kill(pid, signal.SIGKILL)
        km.provisioner.process.wait(timeout=10)  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while queue() and time.monotonic() < deadline:
            time.sleep(0.2)
        emit(queue_after_kill=queue())
    left = wait_gone(pid, timeout=15)
    deadline = time.monotonic() + 15  # the watchdog removes files after the processes
    while markers() and time.monotonic() < deadline:
        time.sleep(0.2)
    emit(left=[" ".join(p.cmdline()) for p in left if p.is_running()], markers_after=markers())


def markers(folder: str | None = None) -> list[str]:
    """The job preflight's marker files in the kernel's folder (it waits for the job)."""
    return sorted(p.name for p in Path(folder or os.getcwd()).glob(".casa-kernel-preflight-*"))


def failed_preflight(start: str, cwd: str) -> None:
    started = time.monotonic()
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="2"), cwd=cwd) as (km, kc):
        pid = kernel_pid(km)
        emit(kernel_pid=pid)
        execute(kc, "%casa_cluster stop", timeout=60)
        emit(start=summary(execute(kc, start, timeout=120), started))
        deadline = time.monotonic() + 30  # the failed start cancels its job as it ends
        while queue() and time.monotonic() < deadline:
            time.sleep(0.2)
        emit(queue_after_start=queue())
        emit(status=summary(execute(kc, "%casa_cluster status", timeout=30), started))
        emit(markers=markers(cwd))
    left = wait_gone(pid, timeout=15)
    emit(left=[" ".join(p.cmdline()) for p in left if p.is_running()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("mode", choices=["in-job", "queue", "kill-pending", "preflight"])
    parser.add_argument("--cwd", default=os.getcwd(), help="the kernel's folder (preflight)")
    parser.add_argument("--kernel", default="casa-mpi")
    parser.add_argument("--start", default="%casa_cluster start --slurm -n 5")
    parser.add_argument("--kill", action="store_true")
    parser.add_argument("--batch", default="slurm --sbatch-arg=--hold")
    args = parser.parse_args()
    if args.mode == "in-job":
        in_job(args.kernel)
    elif args.mode == "kill-pending":
        kill_pending(args.batch)
    elif args.mode == "preflight":
        failed_preflight(args.start, args.cwd)
    else:
        in_queue(args.start, args.kill)


if __name__ == "__main__":
    main()
