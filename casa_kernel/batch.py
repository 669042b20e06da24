"""Servers from the batch queue: ONE Slurm or PBS job whose mpiexec starts them.

From a login node (or a JupyterHub single-user server there) the kernel keeps
its controller and submits one batch job; inside the job one ``mpiexec`` (which
reads the job's allocation by itself and launches through the resource manager)
starts the servers as one MPI world, and they connect back to the controller.

* :class:`BatchJob` is what the user asked for (``--slurm -n 17 --time ...``).
* :func:`batch_script` builds the whole job script and submit command line:
  pure, table-tested.
* :class:`SlurmMPIEngineSetLauncher` / :class:`PBSMPIEngineSetLauncher` are
  ipyparallel's batch engine launchers with that script, a watcher that follows
  the job's state (so a pending job is shown, and a cancelled one ends the
  engine set at once), and a stop that waits until the job has left the queue.
* :func:`call` runs every scheduler command, raising with the command, exit
  code and output.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from ipyparallel.cluster.launcher import (
    BatchEngineSetLauncher,
    PBSEngineSetLauncher,
    SlurmEngineSetLauncher,
)
from traitlets import Instance, List, Unicode

from casa_kernel.errors import ClusterError

#: Job states after which the job's processes are gone (Slurm's and PBS's letters).
SLURM_ACTIVE = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
    "RESV_DEL_HOLD",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
}
# Slurm end states that mean the job was ended from outside its script.
ENDED_FROM_OUTSIDE = {"CANCELLED", "TIMEOUT", "PREEMPTED", "DEADLINE", "NODE_FAIL", "BOOT_FAIL"}
PBS_ACTIVE = {"Q", "R", "H", "W", "T", "S", "B", "E"}  # E: exiting, still has processes

#: A kernelspec's choice of servers from the batch queue (see parse_batch_spec).
ENV_BATCH = "CASA_KERNEL_BATCH"

_TIME = re.compile(r"\d+(?:-\d+)?(?::\d+){0,2}\Z")  # minutes, h:m:s, d-h, d-h:m:s


@dataclass(frozen=True)
class BatchJob:
    """One batch job of servers: what ``%casa_cluster start --slurm`` asks for."""

    system: str  # "slurm" | "pbs"
    nservers: int
    time: str | None = None  # wall time, Slurm syntax ("2:00:00", "90", "1-00:00:00")
    partition: str | None = None  # Slurm partition / PBS queue
    account: str | None = None
    extra_args: tuple[str, ...] = ()  # passed to sbatch/qsub as given
    name: str = "casa-servers"

    def __post_init__(self) -> None:
        if self.system not in ("slurm", "pbs"):
            raise ClusterError(f"unknown batch system {self.system!r} (slurm or pbs)")
        if self.nservers < 1:
            raise ClusterError(f"a batch job needs at least one server, got {self.nservers}")
        if self.time is not None and not _TIME.match(self.time):
            raise ClusterError(
                f"--time {self.time!r}: use minutes, H:MM:SS or D-HH:MM:SS (e.g. 2:00:00)"
            )
        for label, value in (
            ("--partition", self.partition),
            ("--account", self.account),
            ("job name", self.name),
        ):
            # A value with a blank or newline would end the #SBATCH/#PBS line early.
            if value is not None and (not value or any(c.isspace() for c in value)):
                raise ClusterError(f"{label} {value!r}: must be one word")

    @property
    def manager(self) -> str:
        return {"slurm": "Slurm", "pbs": "PBS"}[self.system]

    def describe(self) -> str:
        parts = [f"{self.nservers} servers"]
        if self.time:
            parts.append(f"time {self.time}")
        if self.partition:
            parts.append(f"{'partition' if self.system == 'slurm' else 'queue'} {self.partition}")
        if self.account:
            parts.append(f"account {self.account}")
        return f"{self.manager} batch job ({', '.join(parts)})"


class _SpecParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would exit the kernel
        raise ClusterError(f"{ENV_BATCH}: {message}")


def parse_batch_spec(text: str, nservers: int) -> BatchJob:
    """``CASA_KERNEL_BATCH`` (a kernelspec's servers-from-the-queue choice) as a job.

    The words of ``%casa_cluster start``: ``slurm --time 2:00:00 --partition P
    --account A --sbatch-arg=--nodes=2`` (or ``pbs ...``); N comes from -n as usual.
    """
    parser = _SpecParser(prog=ENV_BATCH, add_help=False)
    parser.add_argument("system", choices=["slurm", "pbs"])
    parser.add_argument("--time")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--sbatch-arg", dest="batch_args", action="append", default=[])
    args = parser.parse_args(shlex.split(text))
    return BatchJob(
        args.system,
        nservers,
        time=args.time,
        partition=args.partition,
        account=args.account,
        extra_args=tuple(args.batch_args),
    )


def batch_script(
    job: BatchJob, launch: Sequence[str], script_path: str, output_path: str, note: str = ""
) -> tuple[str, list[str]]:
    """The job script and the submit command line, ``(text, argv)``.

    ``launch`` is the servers' whole ``mpiexec ... -n N ... ipengine`` command;
    the job asks for exactly ``nservers`` tasks, one per server.  Options go in
    the script as directives (they show in its log); the user's ``extra_args``
    go on the command line, where they override the directives.
    """
    pbs_time = _pbs_walltime(job.time) if job.system == "pbs" and job.time else None
    if job.system == "slurm":
        lines = [
            "#!/bin/sh",
            f"#SBATCH --job-name={job.name}",
            f"#SBATCH --ntasks={job.nservers}",
            f"#SBATCH --output={output_path}",
            "#SBATCH --export=ALL",
        ]
        if job.time:
            lines.append(f"#SBATCH --time={job.time}")
        if job.partition:
            lines.append(f"#SBATCH --partition={job.partition}")
        if job.account:
            lines.append(f"#SBATCH --account={job.account}")
        argv = ["sbatch", "--parsable", *job.extra_args, script_path]
    else:
        lines = [
            "#!/bin/sh",
            f"#PBS -N {job.name}",
            f"#PBS -l select={job.nservers}:ncpus=1:mpiprocs=1",
            "#PBS -j oe",
            f"#PBS -o {output_path}",
            "#PBS -V",
        ]
        if pbs_time:
            lines.append(f"#PBS -l walltime={pbs_time}")
        if job.partition:
            lines.append(f"#PBS -q {job.partition}")
        if job.account:
            lines.append(f"#PBS -A {job.account}")
        argv = ["qsub", *job.extra_args, script_path]
    if note:
        lines += [f"# {line}" for line in note.splitlines()]
    command = shlex.join(launch)
    if job.system == "pbs" and launch:
        # An MPI built without PBS's tm interface does not read the job's nodes
        # by itself: hand them over (the variable is expanded in the job).
        command = f'{shlex.quote(launch[0])} --hostfile "$PBS_NODEFILE" {shlex.join(launch[1:])}'
    lines.append("exec " + command)
    return "\n".join(lines) + "\n", argv


def _pbs_walltime(value: str) -> str:
    """Slurm's time syntax to PBS's ``HH:MM:SS`` (minutes alone, D-H[:M[:S]])."""
    days, _, rest = value.rpartition("-")
    fields = [int(f) for f in rest.split(":")]
    if not days and len(fields) == 1:
        h, m, s = 0, fields[0], 0  # Slurm: a bare number is minutes
    elif not days and len(fields) == 2:
        h, m, s = 0, fields[0], fields[1]  # Slurm: M:S
    else:
        h, m, s = (fields + [0, 0])[:3] if days else fields
    total = (int(days or 0) * 24 + h) * 3600 + m * 60 + s
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def status_command(system: str, job_id: str) -> list[str]:
    """The command that prints a job's state (and pending reason)."""
    if system == "slurm":
        # -t all: a finished job stays listed (MinJobAge) with its end state.
        return ["squeue", "-h", "-j", job_id, "-t", "all", "-o", "%T|%r"]
    return ["qstat", "-x", "-f", job_id]


def cancel_command(system: str, job_id: str) -> list[str]:
    return ["scancel", job_id] if system == "slurm" else ["qdel", job_id]


def parse_status(system: str, output: str) -> tuple[str, str]:
    """(state, reason) from :func:`status_command`'s output; ("GONE", "") if not listed."""
    if system == "slurm":
        line = output.strip().splitlines()[0] if output.strip() else ""
        if not line:
            return "GONE", ""
        state, _, reason = line.partition("|")
        return state.strip(), "" if reason.strip() in ("None", "") else reason.strip()
    state = re.search(r"job_state\s*=\s*(\S+)", output)
    comment = re.search(r"comment\s*=\s*(.+)", output)
    return (state.group(1) if state else "GONE"), (comment.group(1).strip() if comment else "")


def is_active(system: str, state: str) -> bool:
    if system == "slurm":
        return state.rstrip("+") in SLURM_ACTIVE
    return state in PBS_ACTIVE


def call(
    command: Sequence[str],
    timeout: float = 30.0,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run a scheduler command; its stdout, or a ClusterError with everything said."""
    try:
        done = subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env),
        )
    except FileNotFoundError:
        raise ClusterError(
            f"{command[0]} not found: the batch system's commands must be on PATH"
        ) from None
    except subprocess.TimeoutExpired:
        raise ClusterError(f"{shlex.join(command)} did not answer in {timeout:.0f} s") from None
    if check and done.returncode != 0:
        said = "\n".join(t.strip() for t in (done.stdout, done.stderr) if t.strip())
        raise ClusterError(f"{shlex.join(command)} failed (exit code {done.returncode}): {said}")
    return done.stdout


async def acall(command: Sequence[str], timeout: float = 30.0) -> tuple[int, str]:
    """:func:`call` for the event loop, not raising: (exit code, stdout + stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"{command[0]} did not answer in {timeout:.0f} s"
    return proc.returncode or 0, out.decode("utf-8", "replace")


class _BatchMPIEngineSetLauncher(BatchEngineSetLauncher):
    """What the Slurm and PBS engine launchers share (see the module docstring);
    listed first in their bases, so these methods win over ipyparallel's."""

    system = "slurm"
    job = Instance(BatchJob, allow_none=True, config=True, help="what to ask the queue for")
    mpi_cmd = List(Unicode(), ["mpiexec"], config=True, help="mpiexec inside the job")
    mpi_args = List(Unicode(), [], config=True, help="mpiexec flags after -n N")
    note = Unicode("", config=True, help="comment lines for the job script")

    # set while running
    job_state = Unicode("")
    job_reason = Unicode("")
    _watcher: asyncio.Task | None = None
    _submit_argv: list[str] | None = None

    @property
    def program(self) -> list[str]:  # type: ignore[override]
        return self.engine_cmd + ["--mpi"]

    @property
    def program_args(self) -> list[str]:  # type: ignore[override]
        return self.cluster_args + self.engine_args

    def launch_command(self, n: int) -> list[str]:
        return [*self.mpi_cmd, "-n", str(n), *self.mpi_args, *self.program, *self.program_args]

    def write_batch_script(self, n: int = 1) -> None:
        self.n = n
        job = self.job
        if job is None:
            raise ClusterError("no batch job configured")
        # Written on the job's first node: into the log folder the kernel gives
        # its servers (the user's home, shared on clusters), not the kernel's
        # private /tmp folder, which other nodes do not have.
        folder = self.environment.get("CASA_KERNEL_LOG_DIR") or os.environ.get(
            "CASA_KERNEL_LOG_DIR"
        )
        if folder:
            os.makedirs(folder, exist_ok=True)
            self.output_file = os.path.join(folder, f"{self.identifier}.log")
        text, argv = batch_script(
            job, self.launch_command(n), self.batch_file, self.output_file, self.note
        )
        with open(self.batch_file, "w") as f:
            f.write(text)
        os.chmod(self.batch_file, 0o700)
        self._submit_argv = argv

    def find_args(self) -> list[str]:
        return list(self._submit_argv or ["sbatch" if self.system == "slurm" else "qsub"])

    def _run_command(self, command: list[str], **kwargs: Any) -> str:
        # ipyparallel's version drops stderr: sbatch's reason for refusing a job
        return call(command, timeout=60, env=kwargs.get("env"))

    @property
    def manager(self) -> str:
        return "Slurm" if self.system == "slurm" else "PBS"

    def describe_job(self) -> str:
        """``Slurm job 1234 PENDING (Resources)``."""
        if not self.job_id:
            return f"{self.manager} job not submitted yet"
        reason = f" ({self.job_reason})" if self.job_reason else ""
        return f"{self.manager} job {self.job_id} {self.job_state or 'SUBMITTED'}{reason}"

    @property
    def cancel_command(self) -> list[str] | None:
        return cancel_command(self.system, self.job_id) if self.job_id else None

    def start(self, n: int = 1) -> str:
        job_id = super().start(n)  # type: ignore[misc]
        self.job_state = "SUBMITTED"
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return job_id

    async def _poll(self) -> tuple[str, str]:
        rc, out = await acall(status_command(self.system, self.job_id))
        if rc != 0:
            # squeue: "Invalid job id specified" once the job is purged.
            if "invalid job id" in out.lower() or "unknown job id" in out.lower():
                return "GONE", ""
            return self.job_state or "UNKNOWN", ""
        return parse_status(self.system, out)

    async def _watch(self) -> None:
        """Follow the job until it ends; then end the engine set (notify_stop)."""
        delay = 0.05
        while True:
            state, reason = await self._poll()
            self.job_state, self.job_reason = state, reason
            if not is_active(self.system, state):
                break
            await asyncio.sleep(delay)
            # quick while the job starts, then every 2 s: squeue asks slurmctld
            delay = min(delay * 2, 2.0)
        self.notify_stop(
            {"job_id": self.job_id, "state": state, "exit_code": 0 if state == "COMPLETED" else 1}
        )

    def ended_by_manager(self) -> bool:
        """The job was ended from outside (scancel, time limit, preemption), not
        by its mpiexec exiting after a server died."""
        state = self.job_state.rstrip("+")
        if self.system == "slurm":
            return state in ENDED_FROM_OUTSIDE or state == "GONE"
        return False  # PBS's qstat does not say why: treat as a server death

    def ended_message(self) -> str:
        """Why the servers are gone, naming the job: for the user."""
        return f"{self.manager} job {self.job_id} ended ({self.job_state})"

    async def stop(self) -> dict[str, Any]:  # type: ignore[override]
        """Cancel the job and wait (30 s at most) until it has left the queue."""
        if not self.job_id:
            return {}
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()
        if is_active(self.system, self.job_state or "PENDING"):
            command = cancel_command(self.system, self.job_id)
            rc, out = await acall(command)
            if rc != 0:
                raise ClusterError(
                    f"{shlex.join(command)} failed (exit code {rc}): {out.strip()}; "
                    f"the {self.manager} job may still be queued"
                )
            deadline = time.monotonic() + 30
            delay = 0.05
            while is_active(self.system, self.job_state):
                if time.monotonic() > deadline:
                    self.log.warning("%s 30 s after %s", self.describe_job(), shlex.join(command))
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                self.job_state, self.job_reason = await self._poll()
        data = {"job_id": self.job_id, "state": self.job_state}
        self.notify_stop(data)
        return data

    def get_output(self, remove: bool = True) -> str:
        """The job's output (mpiexec's words); kept in the log folder, never removed."""
        try:
            with open(self.output_file, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _log_output(self, stop_data: Any = None) -> None:
        pass  # the output stays in its file, where error messages read it


class SlurmMPIEngineSetLauncher(_BatchMPIEngineSetLauncher, SlurmEngineSetLauncher):
    """Servers as ONE Slurm job running ``mpiexec`` over its tasks."""

    system = "slurm"
    batch_file_name = Unicode("casa_servers.sbatch", config=True)


class PBSMPIEngineSetLauncher(_BatchMPIEngineSetLauncher, PBSEngineSetLauncher):
    """Servers as ONE PBS job running ``mpiexec`` over its chunks."""

    system = "pbs"
    batch_file_name = Unicode("casa_servers.pbs", config=True)


LAUNCHERS = {"slurm": SlurmMPIEngineSetLauncher, "pbs": PBSMPIEngineSetLauncher}
