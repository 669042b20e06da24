"""The servers' launcher: ONE ``mpiexec`` whose whole command line is built here.

:func:`~casa_kernel.config.mpiexec.mpiexec_command` is pure (a test checks the list
and the environment without starting anything); :class:`CasaEngineSetLauncher` is ipyparallel's
``MPIEngineSetLauncher`` with that builder, and with mpiexec's output kept for
our messages and a log file instead of dumped into the notebook. What mpiexec
says when a rank dies is read by :func:`death_cause` (and :func:`out_of_memory`
when the OOM killer took it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from ipyparallel.cluster.launcher import MPIEngineSetLauncher
from traitlets import Bool, List, Unicode

from casa_kernel import variables
from casa_kernel.casa.role import CUBE_CLIENT_RANK, world_to_server
from casa_kernel.config.mpiexec import LaunchSpec, mpiexec_command, running_as_root

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

# The servers' stdout/stderr: what Python writes goes to the cell. C-level
# output (fd 1/2) is not captured: CASA echoes every WARN/SEVERE there AND logs
# it, and the log is relayed (whole lines, known noise dropped, see
# casa/logs.py), so capturing both printed each message twice, garbled. What C
# code prints otherwise ends in mpiexec's output, kept in the cluster log file.
# (The class is imported on the servers: it lives with what runs there.)
ENGINE_ARGS = ["--IPEngine.out_stream_factory=casa_kernel.server.output.ServerOutStream"]


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
        # ipyparallel caches the first read (a read during the start would hide
        # what mpiexec says when it ends) and decodes strictly: a server's C
        # library writing bytes that are not UTF-8 to fd 1/2 made the read raise
        # in the stop callback, and the death was never recovered. Read the
        # file's tail each time, undecodable bytes replaced.
        self._output = None
        self._output = read_tail(self.output_file)
        return str(super().get_output(remove=remove))

    def _log_output(self, stop_data: Any = None) -> None:
        # ipyparallel logs the whole output at WARNING when mpiexec ends badly,
        # which lands in the notebook; keep it in a file and for our messages.
        # Runs in the stop callback, ahead of recovery: it must never raise.
        try:
            self.final_output = self.get_output(remove=False)
            if self.output_log and self.final_output:
                with open(self.output_log, "a", errors="replace") as f:
                    f.write(f"--- mpiexec {self.identifier} ended: {stop_data}\n")
                    f.write(self.final_output)
        except Exception as exc:  # a full disk, a removed folder
            self.log.error("casa-kernel: could not keep mpiexec's output: %s", exc)

    final_output = ""


# What is kept of mpiexec's output for messages and the cluster log: its end
# (where mpiexec says why it ended); a server printing without end from C code
# must not make the kernel read gigabytes.
OUTPUT_TAIL = 1 << 20


def read_tail(path: str, limit: int = OUTPUT_TAIL) -> str:
    """The last ``limit`` bytes of ``path`` as text (bad bytes replaced); '' if absent."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return ""
    head = f"[... {size - limit} earlier bytes in {path}]\n" if size > limit else ""
    return head + data.decode("utf-8", errors="replace")


# prterun wraps its message: "process rank 1 with PID 0 on node vm exited on\nsignal 9 (Killed)."
_SIGNALLED = re.compile(
    r"rank\s+(?P<rank>\d+)\s+with\s+PID\s+(?P<pid>\d+)\s+on\s+node\s+(?P<host>\S+)\s+"
    r"exited\s+on\s+signal\s+(?P<signal>\d+)(?:\s+\((?P<name>[^)]*)\))?"
)
# "Process name: [prterun-vm-7972@1,1]\n   Exit code:    3"
_EXITED = re.compile(r"Process name:\s*\[[^\]]*?,(?P<rank>\d+)\]\s*Exit code:\s*(?P<code>-?\d+)")
# A C++ exception nothing caught (casacore throws from destructors: a table
# flushed on a full disk), the process's last words before SIGABRT:
# "terminate called after throwing an instance of 'casacore::AipsError'\n  what():  ..."
# prterun forwards each rank's lines as they come: when two servers abort at
# once (a full disk), another rank's lines can fall between the two.
_TERMINATED = re.compile(
    r"terminate called after throwing an instance of '(?P<type>[^']+)'"
    r"[^\n]*\n(?:[^\n]*\n){0,20}?\s*what\(\):\s*(?P<what>[^\n]*)"
)


# A server's Python stacks at a crash (faulthandler, server/engine.py): the
# crashing thread's innermost frame says where, e.g. "Current thread 0x7f...
# (most recent call first):\n  File ".../x.py", line 519 in string_at"
_FAULT = re.compile(
    r"Fatal Python error: (?P<what>[^\n]+)\n(?:.*\n)*?Current thread [^\n]*\n"
    r"\s*File \"(?P<file>[^\"]+)\", line (?P<line>\d+) in (?P<func>\S+)"
)


# ipyparallel's own log lines in the servers' output ("2026-12-06 23:27:14.493
# [IPEngine.1] ...", "[KernelNanny.0]"), and CASA's console echo of its log
# ("<date>\tWARN\t<origin>\t<text>", relayed from the log file instead).
_IPP_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \[(IPEngine|KernelNanny)[^\]]*\]")
_CASA_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\t[A-Z]+\d?\t")


def outside_python(output: str) -> str:
    """The lines of the servers' output that C code wrote to file descriptors
    1/2: ipyparallel's log and CASA's echoed log lines left out."""
    kept = [
        line
        for line in output.splitlines()
        if line.strip() and not _IPP_LOG.match(line) and not _CASA_LOG.match(line)
    ]
    return "\n".join(kept)


def death_cause(
    output: str, hosts: Mapping[int, str] | None = None, cube_client: bool = False
) -> str:
    """'server rank 1 on vm died of signal 9 (Killed)' from mpiexec's words.

    ``hosts`` (server rank -> host) names the host when mpiexec does not; with a
    ``cube_client`` mpiexec's world rank 0 is it and world rank R is server R-1.
    """
    hosts = hosts or {}
    match = _SIGNALLED.search(output)
    if match:
        name = f" ({match['name']})" if match["name"] else ""
        who = _who(int(match["rank"]), cube_client)
        return f"{who} on {match['host']} died of signal {match['signal']}{name}" + last_words(
            output
        )
    match = _EXITED.search(output)
    if match:
        rank = world_to_server(int(match["rank"]), cube_client)
        host = hosts.get(rank)
        where = f" on {host}" if host else ""
        return f"{_who(int(match['rank']), cube_client)}{where} exited with code {match['code']}"
    return "a server died (mpiexec ended the MPI job)" + last_words(output)


def _who(world: int, cube_client: bool) -> str:
    rank = world_to_server(world, cube_client)
    return "CASA's cube client" if rank == CUBE_CLIENT_RANK else f"server rank {rank}"


def last_words(output: str) -> str:
    """': casacore::AipsError: <what>' when a C++ exception ended a server (the
    last one in mpiexec's output), ', in f (file:line)' from a crashed server's
    Python stack (its innermost frame), else ''. SIGABRT alone says nothing of a full disk."""
    found = list(_TERMINATED.finditer(output))
    if found:
        return f": {found[-1]['type']}: {found[-1]['what'].strip()}"
    faults = list(_FAULT.finditer(output[-OUTPUT_TAIL:]))
    if faults:
        fault = faults[-1]
        return f", in {fault['func']} ({fault['file']}:{fault['line']})"
    return ""


# How a death by the OOM killer is said (a job is not run again after one: the
# same work would need the same memory).
OOM_KILLED = "killed by the out-of-memory killer"


def out_of_memory(cause: str, servers: list[Any]) -> str:
    """The death ``cause`` said as an out-of-memory kill when the OOM killer took
    a process of a server's cgroup since it started ('' when it did not);
    ``servers`` are cluster/servers.py's ServerInfo."""
    from casa_kernel.server.memory import cgroup_peak, oom_kills

    for info in servers:
        if not info.cgroup or info.oom_kills is None:
            continue
        now = oom_kills(info.cgroup)
        if now is None or now <= info.oom_kills:
            continue
        share = f"{info.memory_share / 2**30:.1f} GiB" if info.memory_share else "the whole host"
        who = cause.split(" died of ")[0] if " died of " in cause else "a server"
        peak, limit = cgroup_peak(info.cgroup)
        held = ""
        if peak is not None:  # the killed process is gone: its group's high-water mark
            held = f"; its memory cgroup held up to {peak / 2**20:.0f} MiB" + (
                f" of its {limit / 2**20:.0f} MiB limit" if limit is not None else ""
            )
        killed = now - info.oom_kills
        if killed == 1:
            what = f"{who} was {OOM_KILLED} (CASA planned for {share} on it{held})"
        else:
            # The killer can take a second process before the first one's memory
            # is freed, and mpiexec names only the death it saw first: not
            # necessarily the process that took the memory.
            what = (
                f"{killed} of the servers' processes were {OOM_KILLED}, "
                f"{who} the first mpiexec saw (CASA planned for {share} on each{held})"
            )
        return (
            f"{what}. "
            "Use fewer servers per host (-n), or more memory for them (a larger batch job), "
            f"or a smaller {variables.SERVER_MEMORY}"
        )
    return ""
