"""Servers from the batch queue: what to ask Slurm or PBS for, and how (pure).

From a login node (or a JupyterHub single-user server there) the kernel keeps
its controller and submits ONE batch job; inside the job one ``mpiexec`` (which
reads the job's allocation by itself and launches through the resource manager)
starts the servers as one MPI world, and they connect back to the controller.

* :class:`BatchJob` is what the user asked for (``--slurm -n 17 --time ...``);
  :func:`parse_batch_spec` reads a kernelspec's ``variables.BATCH``.
* :func:`batch_script` builds the whole job script and submit command line.
* :func:`status_command`, :func:`parse_status`, :func:`is_active`,
  :func:`cancel_command`: the scheduler's commands and what their output means.
* :func:`call` runs a scheduler command, raising with the command, exit code
  and output.

Everything here is table-tested without a scheduler and imports nothing heavy
(the configuration room uses it); the engine launchers that run these commands
are in :mod:`casa_kernel.cluster.batch_launcher`.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from casa_kernel import variables
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
        raise ClusterError(f"{variables.BATCH}: {message}")


def parse_batch_spec(text: str, nservers: int) -> BatchJob:
    """``variables.BATCH`` (a kernelspec's servers-from-the-queue choice) as a job.

    The words of ``%casa_cluster start``: ``slurm --time 2:00:00 --partition P
    --account A --sbatch-arg=--nodes=2`` (or ``pbs ...``); N comes from -n as usual.
    """
    parser = _SpecParser(prog=variables.BATCH, add_help=False)
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
    job: BatchJob,
    launch: Sequence[str],
    script_path: str,
    output_path: str,
    note: str = "",
    preflight: Sequence[str] = (),
) -> tuple[str, list[str]]:
    """The job script and the submit command line, ``(text, argv)``.

    ``launch`` is the servers' whole ``mpiexec ... -n N ... ipengine`` command;
    the job asks for exactly ``nservers`` tasks, one per server.  Options go in
    the script as directives (they show in its log); the user's ``extra_args``
    go on the command line, where they override the directives. ``preflight``
    lines run first (casa_kernel.preflight.job_script_lines).
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
    lines += preflight
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
