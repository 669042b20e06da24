"""The servers of a cluster: one engine set started, watched, replaced; their status.

Split from :mod:`casa_kernel.cluster.lifecycle` (which owns the state) so each room
stays small: here is what talks to ipyparallel about engines. The engine set is
one mpiexec run by the kernel (:class:`~casa_kernel.cluster.launcher.CasaEngineSetLauncher`)
or one batch job of servers (:mod:`casa_kernel.cluster.batch_launcher`); a job ended
from outside (scancel, time limit) is not replaced behind the user's back: the
cell that was running says so, and the next one that needs servers queues a
new job.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import psutil

from casa_kernel import preflight
from casa_kernel.cluster import health, keyfile
from casa_kernel.cluster.janitor import kill_now, reap
from casa_kernel.cluster.launcher import death_cause, last_words, out_of_memory, outside_python
from casa_kernel.cluster.state import State
from casa_kernel.errors import ClusterError

if TYPE_CHECKING:
    from casa_kernel.cluster.lifecycle import CasaCluster

log = logging.getLogger("casa_kernel.cluster")

# How long the controller gets to drop the servers of a killed engine set.
UNREGISTER_TIMEOUT = 15.0
# What is read of the servers' output per cell for the note on C output (its start).
UNREAD_LIMIT = 64 * 1024


@dataclass(frozen=True)
class ServerInfo:
    """One server as ``%casa_cluster status`` shows it."""

    rank: int
    host: str
    pid: int
    state: str  # idle | busy | stuck | dead | starting | replacing
    memory_share: int = 0  # bytes CASA plans for on this server (0: the whole host)
    cgroup: str = ""  # its memory cgroup folder, where the OOM killer's kills are counted
    oom_kills: int | None = None  # that count when the server started


class EngineSet:
    """The current mpiexec engine set of a cluster."""

    def __init__(self, cluster: CasaCluster):
        self.cluster = cluster
        self.id: str | None = None
        self.launcher: Any = None
        self._stop_data: Any = None
        self._stopped = threading.Event()
        self._ours = False  # stopped by us (a replacement), not by a death
        self.lost = ""  # why the servers' batch job ended from outside ("" if it did not)
        self.url_file: str | None = None  # the connection file on a shared folder, if any
        self._read_upto: dict[str, int] = {}  # servers' output file -> bytes already seen

    def job(self) -> Any:
        """The batch job launcher of the current engine set (None: mpiexec run here)."""
        launcher = self.launcher
        return launcher if launcher is not None and hasattr(launcher, "describe_job") else None

    async def start(self) -> Any:
        """Launch the servers, wait until all registered, set them up; the client."""
        c = self.cluster
        ipp, n = c._ipp, c.config.nranks  # the servers, and CASA's cube client if any
        c.note = f"controller up; mpiexec starting {c.config.nservers} servers" + (
            " and CASA's cube client" if c.config.cube_client else ""
        )
        self._stopped = threading.Event()
        self._ours, self.lost = False, ""
        self._stop_data = None  # (an exit code of the set before is not this one's)
        if self.url_file is not None:  # the key by file, not through mpiexec or the queue
            info = await ipp.controller.get_connection_info()
            keyfile.write(os.path.dirname(self.url_file), info["engine"])
        checking = self._job_preflight()
        try:
            es_id = await ipp.start_engines(n)
            self.id, self.launcher = es_id, ipp.engines[es_id]
            self.launcher.on_stop(partial(c._on_engines_stopped, es_id))
            if getattr(self.launcher, "pid", None):  # mpiexec here (not a batch job)
                c.watch_also(self.launcher.pid, "the servers' mpiexec")
            c.janitor.track(self.launcher)
            client = c.client if c.client is not None else await ipp.connect_client()
            c.client = client
            waiting = client.wait_for_engines(
                n, block=False, timeout=c.config.start_timeout, interactive=False
            )
            registered = asyncio.wrap_future(waiting)
            job = self.job()
            while job is not None and not registered.done():
                # "Slurm job 12 PENDING (Resources); 0/4 servers registered"
                c.note = f"{job.describe_job()}; {len(client.ids)}/{n} servers registered"
                if checking is not None and self._judge_job_preflight(checking, job):
                    checking = None
                await asyncio.wait([registered], timeout=0.5)
            if checking is not None and job is not None:  # (it runs before mpiexec)
                self._judge_job_preflight(checking, job)
        finally:
            if checking is not None:
                checking.remove_markers()
        try:
            await registered
        except Exception as exc:
            import ipyparallel

            if isinstance(exc, ipyparallel.error.EngineError):
                what = job.ended_message() if job is not None else "mpiexec exited"
                what_of = "processes" if c.config.cube_client else "servers"
                raise ClusterError(
                    f"{what} before all {n} {what_of} registered "
                    f"({len(client.ids)} did)\nmpiexec said:\n{self.output()}"
                ) from None
            raise
        if self.url_file is not None:  # every server has read it: no key left lying
            keyfile.remove(os.path.dirname(self.url_file))
        c.note = "servers registered; binding rank, size, comm"
        await self._setup(client)
        return client

    def _job_preflight(self) -> preflight.JobPreflight | None:
        """Servers from the batch queue: the preflight their job script runs first."""
        c = self.cluster
        if c.config.batch is None:
            return None
        from casa_kernel.cluster.batch_launcher import LAUNCHERS

        checking = preflight.for_job(c.config, c.extra_env)
        launcher_config = c._ipp.config[LAUNCHERS[c.config.batch.system].__name__]
        launcher_config.preflight = checking.script_lines if checking is not None else []
        if checking is not None:  # a killed kernel's watchdog removes them too
            for path in checking.marker_paths():
                c.janitor.add_path(path)
        return checking

    def _judge_job_preflight(self, checking: preflight.JobPreflight, job: Any) -> bool:
        """Judge the job's preflight once its nodes answered (True: judged);
        a failure raises ONE PreflightError (the start fails: the job is cancelled)."""
        report = checking.report(job.get_output())
        if report is None:
            return False
        checking.remove_markers()
        if not report.ok:
            raise report.error()
        return True

    async def _setup(self, client: Any) -> None:
        """Bind rank/size/comm on every server and learn where each one runs."""
        from casa_kernel.server import engine

        c = self.cluster
        ar = client[sorted(client.ids)].apply_async(
            engine.setup_server, c.config.preload_casa, c.config.start_timeout
        )
        infos = await asyncio.wrap_future(ar)
        # keyed by engine id: the MPI world rank (server rank + 1 with a cube client)
        c.servers = {
            eid: ServerInfo(rank, host, pid, "idle", share, cgroup, oom)
            for eid, (rank, host, pid, share, cgroup, oom) in zip(ar.engine_id, infos)
        }
        c.world += 1  # (engine ids are MPI ranks: the same in every world)
        if c.config.placement.is_local:
            c.janitor.add(info.pid for info in c.servers.values())
        c.janitor.make_private()
        self.unread_output()  # the baseline: what they wrote while starting is not news
        for launcher in [c._ipp.controller, *c._ipp.engines.values()]:
            c.janitor.track(launcher)  # the schedulers and nannies exist by now

    async def replace(self, cause: str) -> None:
        """Kill this engine set, wait until the controller forgot it, start anew."""
        c = self.cluster
        started = time.monotonic()
        c.last_cause = cause
        old_pids = {info.pid for info in c.servers.values()}
        if c.config.placement.is_local:
            kill_now(old_pids)  # stuck or stopped servers honour nothing else
        if self.id in c._ipp.engines:
            self._ours = True
            try:  # (a batch job: cancelled, and gone from the queue)
                await asyncio.wait_for(c._ipp.stop_engines(self.id), timeout=UNREGISTER_TIMEOUT)
            except Exception as exc:
                log.warning("stopping the old engine set: %r", exc)
        if c.config.placement.is_local:  # remote pids are other processes here
            await asyncio.get_running_loop().run_in_executor(None, reap, old_pids, 1.0)
        c.janitor.forget(old_pids)
        c.janitor.forget_job(self.launcher)
        c.stuck, c._views = {}, {}  # servers stay listed (as "replacing") until new ones
        client = c.client
        deadline = time.monotonic() + UNREGISTER_TIMEOUT
        delay = 0.005  # nothing to await: the client has no public unregister event
        while client.ids:
            if time.monotonic() > deadline:
                raise ClusterError(f"the controller still lists servers {client.ids} after kill")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        await self.start()
        elapsed = time.monotonic() - started
        with c._lock:
            c.notices.append(f"{cause}; new servers started ({elapsed:.1f} s)")
        c._set_state(State.RUNNING, "running")

    def stopped(self, es_id: str, stop_data: Any) -> None:
        """The engine set ended (on the private loop): replace it unless we stopped it."""
        if es_id != self.id:
            return
        self._stop_data = stop_data
        job = self.job()
        if not self._ours and job is not None and job.ended_by_manager():
            # Not replaced now: the running cell (recover) says so, the next
            # cell that needs servers (wait_ready) queues a new job.
            self.lost = job.ended_message()
        self._stopped.set()
        if not self._ours and not self.lost:
            self.cluster.replace(self.cause())

    def death(self, timeout: float) -> str:
        """Why the servers died during a cell, once mpiexec has said it (``timeout``
        at most); a batch job ended from outside is an error, not quietly re-queued."""
        self._stopped.wait(timeout)
        if self.lost:
            raise ClusterError(
                f"{self.lost}: its {self.cluster.config.nservers} servers are gone. "
                "The next cell that needs servers submits a new job."
            )
        return self.cause()

    def ended_unnoticed(self, wait: float = 3.0) -> str:
        """'' unless this engine set's mpiexec (run here) has ended and ipyparallel
        has not said so yet (a cell sent at once after prterun was killed ran on
        its orphaned servers): then wait for that stop callback, which replaces
        the servers, and say why. No cell goes to servers whose mpiexec is gone."""
        proc = getattr(self.launcher, "process", None)
        if proc is None or self._stopped.is_set() or self.job() is not None:
            return ""
        try:
            ended = proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            ended = True
        except psutil.Error:
            return ""
        if not ended:
            return ""
        self._stopped.wait(wait)
        return self.cause() if self._stopped.is_set() else "the servers' mpiexec ended"

    def cause(self) -> str:
        hosts = {info.rank: info.host for info in self.cluster.servers.values()}
        output = self.output()
        text = death_cause(output, hosts, self.cluster.config.cube_client)
        if self.cluster.config.placement.is_local:
            text = out_of_memory(text, list(self.cluster.servers.values())) or text
        code = (self._stop_data or {}).get("exit_code")
        if text.startswith("a server died") and code not in (None, 0):
            text = f"the servers' mpiexec {health.describe_exit(code)}" + last_words(output)
        return text

    def unread_output(self) -> tuple[str, str, str]:
        """What the servers wrote outside Python (C code, fd 1/2) since the last
        call; the file that keeps it while they run, and the log it goes to after.

        The first call for an engine set only sets the baseline: their start-up
        (before Python's streams are ours) is not news.
        """
        launcher = self.launcher
        path = getattr(launcher, "output_file", "") if launcher is not None else ""
        log = getattr(launcher, "output_log", "") if launcher is not None else ""
        try:
            size = os.path.getsize(path) if path else 0
        except OSError:
            return "", path, log
        start = self._read_upto.get(path)
        self._read_upto[path] = size
        if start is None or size <= start:
            return "", path, log
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(min(size - start, UNREAD_LIMIT))
        text = data.decode("utf-8", errors="replace")
        return outside_python(preflight.without_job_lines(text)), path, log

    def output(self) -> str:
        launcher = self.launcher
        if launcher is None:
            return ""
        try:
            output = launcher.final_output or launcher.get_output()
        except Exception:
            output = launcher.final_output
        return preflight.without_job_lines(output).strip()


async def stop_all(cluster: CasaCluster) -> None:
    """Close the client, kill the servers, stop engine sets and controller."""
    ipp_cluster, client = cluster._ipp, cluster.client
    if client is not None:
        try:
            client.close()
        except Exception:
            pass
    if ipp_cluster is None:
        return
    for launcher in [ipp_cluster.controller, *ipp_cluster.engines.values()]:
        if launcher is not None:
            cluster.janitor.track(launcher)
    if cluster.config.placement.is_local:
        kill_now(info.pid for info in cluster.servers.values())
    try:
        await asyncio.wait_for(ipp_cluster.stop_cluster(), timeout=20)
    finally:
        ipp_cluster.shutdown_atexit = False


def start_timed_out(cluster: CasaCluster, timeout: float) -> ClusterError:
    output = cluster._engines.output()
    return ClusterError(
        f"servers not ready after {timeout:g} s ({cluster.note}); the start was stopped"
        + (f"\nmpiexec said:\n{output}" if output else "")
    )


def gone(cluster: CasaCluster) -> str:
    """Why servers must be replaced before use ('' if none must): their batch job
    ended (a new job is queued), or the controller no longer lists some."""
    if cluster._engines.lost:
        return cluster._engines.lost
    ended = cluster._engines.ended_unnoticed()
    if ended:
        return ended
    lost = missing(cluster)
    return f"{lost} stopped answering the controller" if lost else ""


def missing(cluster: CasaCluster) -> str:
    """'server rank 1 on vm' for servers the controller no longer lists ('' if none)."""
    client = cluster.client
    alive = set(client.ids) if client is not None else set()
    gone = sorted(
        (info.rank, info.host) for eid, info in cluster.servers.items() if eid not in alive
    )
    if not gone:
        return ""
    hosts = ", ".join(sorted({host for _, host in gone}))
    named = ["CASA's cube client" for rank, _ in gone if rank < 0]
    ranks = ", ".join(str(rank) for rank, _ in gone if rank >= 0)
    named += [f"server rank {ranks}"] if ranks else []
    return f"{' and '.join(named)} on {hosts}"


def layout_source(cluster: CasaCluster) -> str | None:
    """Where the layout came from when not a hostfile: the batch job with its
    id and state ("Slurm job 12 RUNNING, 4 servers") or the allocation."""
    job = cluster._engines.job()
    if job is not None and job.job_id:
        return f"{job.describe_job()}, {cluster.config.nservers} servers"
    return cluster.config.layout_source


def status_rows(cluster: CasaCluster) -> list[ServerInfo]:
    """Status of each server from what the client already knows (no waiting on them)."""
    state, client = cluster.state, cluster.client
    infos = sorted(cluster.servers.items(), key=lambda item: item[1].rank)
    if state is not State.RUNNING or client is None:
        return [ServerInfo(i.rank, i.host, i.pid, state.value) for _, i in infos]
    alive = set(client.ids)
    stuck = {eid for eid, ars in cluster.stuck.items() if any(not ar.ready() for ar in ars)}
    # The kernel is the cluster's only client: a server is busy while a task of
    # ours on it is outstanding. Asked of the client, not the controller, so
    # status answers even when the controller does not.
    busy = {client.metadata[msg_id].get("engine_id") for msg_id in client.outstanding}
    rows = []
    for eid, info in infos:
        if eid not in alive:
            row = "dead"
        elif eid in stuck:
            row = "stuck"
        else:
            row = "busy" if eid in busy else "idle"
        rows.append(ServerInfo(info.rank, info.host, info.pid, row))
    gone = missing(cluster)
    if gone:  # never "running" with dead servers: replace them now
        cluster.replace(f"{gone} stopped answering the controller")
    return rows
