"""ipyparallel engine launchers whose servers are ONE Slurm or PBS job.

:class:`SlurmMPIEngineSetLauncher` / :class:`PBSMPIEngineSetLauncher` sit beside
:class:`~casa_kernel.cluster.launcher.CasaEngineSetLauncher` (the servers' mpiexec run
by the kernel): they submit a job whose script runs the same mpiexec command
line (:func:`casa_kernel.config.mpiexec.mpiexec_command`, without a hostfile: mpiexec
in the job reads the job's allocation), follow the job's state (so a pending
job is shown and a job ended from outside ends the engine set at once, through
ipyparallel's stop event), and cancel it on stop, waiting until it has left
the queue. The script and the scheduler commands are built in
:mod:`casa_kernel.config.batch` (pure).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from ipyparallel.cluster.launcher import (
    BatchEngineSetLauncher,
    PBSEngineSetLauncher,
    SlurmEngineSetLauncher,
)
from traitlets import Instance, List, Unicode

from casa_kernel import variables
from casa_kernel.config.batch import (
    ENDED_FROM_OUTSIDE,
    BatchJob,
    batch_script,
    call,
    cancel_command,
    is_active,
    parse_status,
    status_command,
)
from casa_kernel.config.mpiexec import LaunchSpec, mpiexec_command, running_as_root
from casa_kernel.errors import ClusterError

# How long stop waits for a cancelled job to leave the queue.
CANCEL_WAIT = 30.0


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
    extra_mpi_args = List([], config=True, help="site flags appended to mpiexec's")
    note = Unicode("", config=True, help="comment lines for the job script")
    preflight = List(
        Unicode(), [], config=True, help="shell lines run before mpiexec (the preflight)"
    )

    # set while running
    job_state = Unicode("")
    job_reason = Unicode("")
    final_output = ""
    _watcher: asyncio.Task | None = None
    _submit_argv: list[str] | None = None

    def _spec(self, n: int) -> LaunchSpec:
        # No hostfile: mpiexec in the job reads the job's allocation by itself.
        return LaunchSpec(self.mpi_cmd[0], n, None, False, tuple(self.extra_mpi_args))

    def get_env(self) -> dict[str, str]:
        env = dict(super().get_env())
        _, added = mpiexec_command(self._spec(self.n), [], {**os.environ, **env}, running_as_root())
        return {**env, **added}

    def launch_command(self, n: int) -> list[str]:
        """The servers' mpiexec command line, run by the job script."""
        environ = {**os.environ, **self.get_env()}
        # ipyparallel's own program/program_args are for its script templates
        # (and are reset when engine_args change): the engines as MPI engines.
        program = [*self.engine_cmd, "--mpi", *self.cluster_args, *self.engine_args]
        argv, _ = mpiexec_command(self._spec(n), program, environ, running_as_root())
        return argv

    def write_batch_script(self, n: int = 1) -> None:
        self.n = n
        job = self.job
        if job is None:
            raise ClusterError("no batch job configured")
        # Written on the job's first node: into the log folder the kernel gives
        # its servers (the user's home, shared on clusters), not the kernel's
        # private /tmp folder, which other nodes do not have.
        folder = self.environment.get(variables.LOG_DIR) or os.environ.get(variables.LOG_DIR)
        if folder:
            os.makedirs(folder, exist_ok=True)
            self.output_file = os.path.join(folder, f"{self.identifier}.log")
        launch = self.launch_command(n)
        text, argv = batch_script(
            job, launch, self.batch_file, self.output_file, self.note, self.preflight
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
        """Cancel the job and wait (CANCEL_WAIT at most) until it has left the queue."""
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
            deadline = time.monotonic() + CANCEL_WAIT
            delay = 0.05
            while is_active(self.system, self.job_state):
                if time.monotonic() > deadline:
                    self.log.warning(
                        "%s %.0f s after %s", self.describe_job(), CANCEL_WAIT, shlex.join(command)
                    )
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
        # the output stays in its file (the log folder), where messages read it
        self.final_output = self.get_output()


class SlurmMPIEngineSetLauncher(_BatchMPIEngineSetLauncher, SlurmEngineSetLauncher):
    """Servers as ONE Slurm job running ``mpiexec`` over its tasks."""

    system = "slurm"
    batch_file_name = Unicode("casa_servers.sbatch", config=True)


class PBSMPIEngineSetLauncher(_BatchMPIEngineSetLauncher, PBSEngineSetLauncher):
    """Servers as ONE PBS job running ``mpiexec`` over its chunks."""

    system = "pbs"
    batch_file_name = Unicode("casa_servers.pbs", config=True)


LAUNCHERS = {"slurm": SlurmMPIEngineSetLauncher, "pbs": PBSMPIEngineSetLauncher}
