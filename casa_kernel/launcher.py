"""The servers' launcher: ONE ``mpiexec`` whose whole command line is built here.

:func:`mpiexec_command` is pure (a test checks the list and the environment
without starting anything); :class:`CasaEngineSetLauncher` is ipyparallel's
``MPIEngineSetLauncher`` with that builder, and with mpiexec's output kept for
our messages and a log file instead of dumped into the notebook. What mpiexec
says when a rank dies is read by :func:`death_cause`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ipykernel.iostream import OutStream
from ipyparallel.cluster.launcher import MPIEngineSetLauncher
from traitlets import Bool, List, Unicode

# The controller's default 3 s heartbeat makes engine registration take ~6 s;
# 500 ms brings a 4-engine start to ~2.5 s. Twenty misses (10 s) before an
# engine is declared dead keeps oversubscribed or busy engines from being
# dropped while still noticing a stopped (SIGSTOP) server.
# No task database in the controller (NoDB): its default DictDB keeps every
# request and reply (culled past 1,024 by sorting them all) for hub queries
# (get_result of another client, resubmit) that casa-kernel never makes; without
# it the controller holds nothing per task in a long session and uses ~8 % less
# CPU per cell (stress/long_session.py, README "Long sessions").
CONTROLLER_ARGS = [
    "--HeartMonitor.period=500",
    "--HeartMonitor.max_heartmonitor_misses=20",
    "--IPController.db_class=ipyparallel.controller.dictdb.NoDB",
]

# Variables every server needs even on another host (mpiexec only forwards the
# local environment to local ranks; -x forwards to all). Only those that are
# set are forwarded: `-x NAME` of an unset NAME makes OpenMPI open its error
# text with "Could not find the environment variable".
FORWARDED_ENV = (
    "PATH",
    "LD_LIBRARY_PATH",
    "PYTHONPATH",
    "CASASITECONFIG",
    "CASA_KERNEL_LOG_DIR",
    "CASA_KERNEL_LOG_TAG",
    # set by ipyparallel only when not encrypted across hosts: then the HMAC key
    # it holds goes in a shared file instead (casa_kernel/keyfile.py)
    "IPP_CONNECTION_INFO",
)


# A rank waiting in MPI (CASA's cube client while its workers grid, a worker
# between channel chunks, a server in a bcast) polls in a loop; with servers
# sharing the cores that loop takes CPU from the ones working. These make the
# poll sleep 100 us when idle instead (OpenMPI 5's pthreads yield strategy);
# measured on a loaded 2-core box: a C++ cube 1.5-2x faster (BENCHMARKS.md,
# Imaging). A message waits at most one sleep longer; the user's values win.
SLEEP_WHEN_IDLE = {
    "OMPI_MCA_mpi_yield_when_idle": "1",
    "OMPI_MCA_threads_pthreads_yield_strategy": "nanosleep",
    "OMPI_MCA_threads_pthreads_nanosleep_time": "100000",
}


# The servers' stdout/stderr: what Python writes goes to the cell. C-level
# output (fd 1/2) is not captured: CASA echoes every WARN/SEVERE there AND logs
# it, and the log is relayed (whole lines, known noise dropped, see
# casa/logs.py), so capturing both printed each message twice, garbled. What C
# code prints otherwise ends in mpiexec's output, kept in the cluster log file.
ENGINE_ARGS = ["--IPEngine.out_stream_factory=casa_kernel.launcher.ServerOutStream"]


class ServerOutStream(OutStream):
    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["watchfd"] = False
        super().__init__(*args, **kwargs)


@dataclass(frozen=True)
class LaunchSpec:
    """What the command line depends on, besides the environment."""

    mpiexec: str
    nservers: int
    hostfile: str | None  # None: mpiexec reads the batch job's allocation itself
    local: bool  # every server on this machine
    extra_args: tuple[str, ...] = ()


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def mpi_environment(local: bool, as_root: bool, environ: Mapping[str, str]) -> dict[str, str]:
    """Variables to add for mpiexec and the servers (pure)."""
    env: dict[str, str] = {}
    if as_root:
        # OpenMPI refuses to run as root unless both are set; only set them
        # when we really are root (containers, CI).
        env.update(
            OMPI_ALLOW_RUN_AS_ROOT="1",
            OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
            PRTE_ALLOW_RUN_AS_ROOT="1",
            PRTE_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        )
    if local and "OMPI_MCA_btl" not in environ:
        # The ofi BTL costs ~1 s of MPI_Init probing fabrics a single machine
        # does not have; on real multi-host clusters it may be the fast path.
        env["OMPI_MCA_btl"] = "^ofi"
    if local:
        env.update({k: v for k, v in SLEEP_WHEN_IDLE.items() if k not in environ})
    return env


def mpiexec_command(
    spec: LaunchSpec, program: Sequence[str], environ: Mapping[str, str], as_root: bool
) -> tuple[list[str], dict[str, str]]:
    """The whole mpiexec command line and the variables it adds (pure).

    ``environ`` is the environment mpiexec will see without the additions.
    """
    added = mpi_environment(spec.local, as_root, environ)
    seen = {**environ, **added}
    argv = [spec.mpiexec, "-n", str(spec.nservers)]
    if spec.hostfile:
        argv += ["--hostfile", spec.hostfile]
    # Binding more ranks than cores fails on small machines ("request to bind
    # ... more cpus than are available"); --bind-to none keeps the slot check.
    argv += ["--bind-to", "none"]
    for name in FORWARDED_ENV:
        if name in seen:
            argv += ["-x", name]
    return argv + list(spec.extra_args) + list(program), added


class CasaEngineSetLauncher(MPIEngineSetLauncher):
    """ipyparallel's MPI engine set, with our command line and quiet output."""

    hostfile = Unicode("", config=True, help="hostfile of the servers")
    all_local = Bool(True, config=True, help="every server runs on this machine")
    extra_mpi_args = List([], config=True, help="site flags appended to mpiexec's")
    output_log = Unicode("", config=True, help="file that keeps mpiexec's output")

    def _spec(self) -> LaunchSpec:
        return LaunchSpec(
            self.mpi_cmd[0], self.n, self.hostfile, self.all_local, tuple(self.extra_mpi_args)
        )

    def get_env(self) -> dict[str, str]:
        env = dict(super().get_env())
        _, added = mpiexec_command(self._spec(), [], {**os.environ, **env}, running_as_root())
        return {**env, **added}

    def find_args(self) -> list[str]:
        environ = {**os.environ, **super().get_env()}
        argv, _ = mpiexec_command(
            self._spec(), self.program + self.program_args, environ, running_as_root()
        )
        return argv

    def get_output(self, remove: bool = False) -> str:
        # ipyparallel caches the first read: a read during the start would hide
        # what mpiexec says when it ends. Read the file each time instead.
        self._output = None
        return str(super().get_output(remove=remove))

    def _log_output(self, stop_data: Any = None) -> None:
        # ipyparallel logs the whole output at WARNING when mpiexec ends badly,
        # which lands in the notebook; keep it in a file and for our messages.
        self.final_output = self.get_output(remove=False)
        if self.output_log and self.final_output:
            with open(self.output_log, "a") as f:
                f.write(f"--- mpiexec {self.identifier} ended: {stop_data}\n")
                f.write(self.final_output)

    final_output = ""


# prterun wraps its message: "process rank 1 with PID 0 on node vm exited on\nsignal 9 (Killed)."
_SIGNALLED = re.compile(
    r"rank\s+(?P<rank>\d+)\s+with\s+PID\s+(?P<pid>\d+)\s+on\s+node\s+(?P<host>\S+)\s+"
    r"exited\s+on\s+signal\s+(?P<signal>\d+)(?:\s+\((?P<name>[^)]*)\))?"
)
# "Process name: [prterun-vm-7972@1,1]\n   Exit code:    3"
_EXITED = re.compile(r"Process name:\s*\[[^\]]*?,(?P<rank>\d+)\]\s*Exit code:\s*(?P<code>-?\d+)")


def death_cause(output: str, hosts: Mapping[int, str] | None = None) -> str:
    """'server rank 1 on vm died of signal 9 (Killed)' from mpiexec's words.

    ``hosts`` (rank -> host) names the host when mpiexec does not.
    """
    hosts = hosts or {}
    match = _SIGNALLED.search(output)
    if match:
        name = f" ({match['name']})" if match["name"] else ""
        return (
            f"server rank {match['rank']} on {match['host']} died of signal {match['signal']}{name}"
        )
    match = _EXITED.search(output)
    if match:
        rank = int(match["rank"])
        host = hosts.get(rank)
        where = f" on {host}" if host else ""
        return f"server rank {rank}{where} exited with code {match['code']}"
    return "a server died (mpiexec ended the MPI job)"
