"""Cluster lifecycle: one ipyparallel controller plus ONE ``mpiexec`` engine set.

The kernel is the client (mpicasa's rank 0); the servers are ipyparallel engines
started by :class:`~casa_kernel.cluster.launcher.CasaEngineSetLauncher`, so they form
one MPI world; engine id == MPI world rank, in each new world (``world`` counts them).

Async first: the work is done by coroutines (``start_async``, ``replace_async``,
``stop_async``) on one private event loop in a daemon thread, so the kernel's own
loop is never blocked; the kernel's thread calls their twins (``start``, which
returns at once, ``wait_ready``, ``replace``, ``stop``), which schedule them and
wait with a deadline. The state is a :class:`State` changed in one place, under a
lock. When the engine set stops on its own (a server died, between cells or
during one), ipyparallel's stop event starts a replacement at once, on the same
controller. The controller itself is watched by a thread of its own
(cluster/health.py): when it dies or goes silent, the cluster is LOST: its
processes are killed at once, a running cell ends naming the cause, and the
next cell starts a whole new cluster (controller and servers) and says so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from casa_kernel import preflight, variables
from casa_kernel.cluster import health, ipp_cluster, servers
from casa_kernel.cluster.janitor import Janitor, reap
from casa_kernel.cluster.state import State
from casa_kernel.config.settings import ClusterConfig
from casa_kernel.errors import ClusterError, ClusterLost, PreflightError

log = logging.getLogger("casa_kernel.cluster")

# How long a dying mpiexec gets to say why (its words name the rank and signal).
DEATH_REPORT_WAIT = 5.0
STOP_TIMEOUT = 30.0
# Lines of the controller's own output shown when it is lost during a start.
CONTROLLER_TAIL_LINES = 12


class PrivateLoop:
    """An asyncio loop in a daemon thread: ipyparallel's coroutines run there,
    so the kernel's own loop is never blocked."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="casa-kernel-cluster", daemon=True
        )
        self._thread.start()

    def run(self, coro: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class CasaCluster:
    """Start, watch, replace and stop one controller + one mpiexec engine set."""

    def __init__(self, config: ClusterConfig, *, env: Mapping[str, str] | None = None):
        self.config = config
        self.extra_env = dict(env or {})
        self._lock = threading.Lock()
        self._state = State.STOPPED
        self._ready = concurrent.futures.Future()  # resolved with the client when RUNNING
        self.error: BaseException | None = None
        self.note = "not started"  # what the cluster is doing, for progress lines
        self.client: Any = None
        self.servers: dict[int, servers.ServerInfo] = {}  # engine id -> server
        self.notices: list[str] = []  # what happened between cells, told by the next one
        # why the servers were last replaced; which set of servers runs (+1 at each)
        self.last_cause, self.world = "", 0
        self.stuck: dict[int, list[Any]] = {}  # engine id -> results it did not stop
        self.janitor = Janitor()
        self._ipp: Any = None
        self._engines = servers.EngineSet(self)
        self._task: asyncio.Task | None = None  # the running start or replacement
        self._views: dict[tuple[int, ...], Any] = {}
        self.lost = ""  # why the controller was lost ("" while it is fine)
        self._watch: health.ControllerWatch | None = None
        self._restarted: tuple[str, float] | None = None  # (cause, when) of a restart
        self._loop = PrivateLoop()
        self._run = self._loop.run

    # -- state: changed here only ------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    def _set_state(self, new: State, note: str | None = None) -> None:
        with self._lock:
            old, self._state = self._state, new
            if note is not None:
                self.note = note
            if new in (State.STARTING, State.REPLACING) and self._ready.done():
                self._ready = concurrent.futures.Future()
            ready = self._ready
        if new is State.RUNNING and not ready.done():
            ready.set_result(self.client)
        elif new in (State.FAILED, State.STOPPED) and not ready.done():
            ready.set_exception(self.error or ClusterError("the cluster was stopped"))
        if old is not new:
            log.info("cluster %s -> %s (%s)", old.value, new.value, self.note)

    # -- the kernel thread's API -------------------------------------------

    def start(self) -> concurrent.futures.Future:
        """Start in the background; the returned future resolves with the client."""
        if self._state in (State.STARTING, State.RUNNING, State.REPLACING):
            return self._ready
        self.error, self.lost = None, ""
        self._set_state(State.STARTING, "launching controller")
        self._run(self.start_async())
        return self._ready

    def wait_ready(
        self, timeout: float | None = None, progress: Callable[[str], None] | None = None
    ) -> Any:
        """Block until every server is registered; return the ipyparallel Client.

        Servers found missing (dead, or dropped by the heartbeat) are replaced
        first. ``progress`` is called with a short message when the note changes.
        """
        if timeout is None:  # a start or replacement ends itself at start_timeout
            timeout = self.config.start_timeout + 5
        deadline = time.monotonic() + timeout
        last = None
        while True:
            state = self._state
            if state is State.RUNNING:
                gone = servers.gone(self)  # dead servers, or their batch job ended
                if not gone:
                    self._tell_restart()
                    return self.client
                self.replace(gone)
                continue
            if state is State.LOST:  # a whole new cluster, not new servers
                self._restarted = (self.lost, time.monotonic())
                self.stop()
                self.start()
                continue
            if state in (State.STOPPED, State.STOPPING):
                raise ClusterError("the cluster is not running: %casa_cluster start")
            if state is State.FAILED:
                if isinstance(self.error, PreflightError):
                    raise self.error  # names host, requirement and what to do
                raise ClusterError(f"the cluster failed to start: {self.error}")
            if progress and self.note != last:
                last = self.note
                progress(last)
            remaining = deadline - time.monotonic()
            if remaining <= 0:  # (a start past ITS deadline stops itself)
                raise ClusterError(f"servers not ready after {timeout:g} s ({self.note})")
            try:
                self._ready.result(timeout=min(remaining, 0.2))
            except concurrent.futures.TimeoutError:
                pass
            except Exception:
                pass  # the state says what happened; looped above

    def replace(self, cause: str) -> None:
        """Kill the current servers and start new ones on the same controller, in
        the background (wait_ready waits for them). ``cause`` is told to the user."""
        with self._lock:
            if self._state is not State.RUNNING:
                return
        self._set_state(State.REPLACING, f"replacing the servers: {cause}")
        self._run(self.replace_async(cause))

    def recover(self, died_in: int) -> str:
        """After servers of ``died_in`` (a :attr:`world`) died during a cell: wait for
        new ones (started here, unless that world was replaced already); say why."""
        if died_in == self.world:
            self.replace(self._engines.death(DEATH_REPORT_WAIT))
        self.wait_ready()
        self.take_notices()  # the caller tells the cause, with what it re-ran
        return self.last_cause

    def is_lost(self) -> bool:
        return self._state is State.LOST

    def check_alive(self) -> None:
        """Raise :class:`ClusterLost` if the controller was lost (waits call it)."""
        if self._state is State.LOST:
            raise ClusterLost(
                f"{self.lost}: the work this cell sent to the servers is lost. "
                "The next cell that needs servers starts a new cluster (controller and servers)."
            )

    def _tell_restart(self) -> None:
        if self._restarted is None:
            return
        cause, began = self._restarted
        self._restarted = None
        took, n = time.monotonic() - began, self.config.nservers
        with self._lock:
            self.notices.append(
                f"{cause}; started a new cluster (controller and {n} servers) in {took:.1f} s"
            )

    def take_notices(self) -> list[str]:
        with self._lock:
            return [self.notices.pop(0) for _ in list(self.notices)]

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop engines, mpiexec and controller; make sure none of them remains."""
        if self._state is State.STOPPED and self._ipp is None:
            return
        self._set_state(State.STOPPING, "stopping")
        self._halt_watch()
        try:
            self._run(self.stop_async()).result(timeout=timeout)
        except Exception as exc:  # still reap below: leaving processes is worse
            log.warning("clean cluster stop failed (%r); killing its processes", exc)
        finally:
            self.janitor.clean()
            self.client, self._ipp, self._views, self.servers, self.stuck = None, None, {}, {}, {}
            self._set_state(State.STOPPED, "stopped")

    def close(self) -> None:
        """Stop the cluster and the private event loop (kernel shutdown)."""
        self.stop()
        self._loop.close()
        self.janitor.remove_late_files()
        ipp_cluster.close_log(self)

    def status(self) -> list[servers.ServerInfo]:  # never waits on the servers
        return servers.status_rows(self)

    def view(self, eids: list[int]) -> Any:
        """A DirectView on these engines, reused (building one costs ~0.2 ms)."""
        key = tuple(eids)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self.client[list(key)]
        return view

    # -- the async core: coroutines on the private loop ----------------------

    async def start_async(self) -> None:
        """Start controller and servers (as THE task, bounded by start_timeout)."""
        await self._begin(self._start())

    async def replace_async(self, cause: str) -> None:
        """Kill the servers, start new ones on the same controller."""
        await self._begin(self._replace(cause))

    async def _replace(self, cause: str) -> None:
        await self._preflight()
        await self._engines.replace(cause)

    async def _preflight(self) -> None:
        """Before every launch that spans hosts: each host meets the multi-node
        requirements, or ONE PreflightError (see casa_kernel.preflight)."""
        if not preflight.needed(self.config, {**os.environ, **self.extra_env}):
            return  # one host only: nothing to check, nothing spent
        self.note = "preflight: checking the servers' hosts"
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, preflight.require, self.config, self.extra_env)

    async def _begin(self, coro: Any) -> None:
        """Run a start or replacement as THE task (stop cancels it)."""
        self._task = asyncio.current_task()
        timeout = self.config.start_timeout
        try:
            await asyncio.wait_for(coro, timeout)
        except asyncio.CancelledError:
            if self.lost and self._state in (State.STARTING, State.REPLACING):
                await self._failed_start(self.error or ClusterLost(self.lost))
        except Exception as exc:
            failure: BaseException = exc
            if self.lost and self.error is not None:
                failure = self.error  # what failed first: the controller, not the wait on it
            elif isinstance(exc, asyncio.TimeoutError):
                failure = servers.start_timed_out(self, timeout)
            if self._state in (State.STARTING, State.REPLACING):
                await self._failed_start(failure)
        finally:
            self._task = None

    async def _failed_start(self, exc: BaseException) -> None:
        self.error = exc
        # Nothing half-started may linger or needs a gentle stop: signals, THEN the
        # failure is said (a waiting mpiexec launched servers after "stopped").
        launchers = [self._ipp.controller, *self._ipp.engines.values()] if self._ipp else []
        watched, loop = {p.pid for p in self._watch_processes()}, asyncio.get_running_loop()
        self._halt_watch()
        await loop.run_in_executor(None, self.janitor.kill_everything, launchers, watched)
        self._set_state(State.FAILED, f"failed: {exc}")
        await self.stop_async()
        self.janitor.clean()
        await loop.run_in_executor(None, self.janitor.kill_everything, [], set())

    async def _start(self) -> None:
        await self._preflight()
        workdir = self.janitor.make_workdir()
        env = dict(self.extra_env)
        # Every process of this cluster carries its owner's pid, so it can be
        # found (by tests, by an admin) even after being orphaned.
        env[variables.OWNER] = str(os.getpid())
        self._ipp = ipp_cluster.make_ipp_cluster(self, workdir, env)
        await self._ipp.start_controller()
        self.janitor.track(self._ipp.controller)
        await self._watch_controller()
        self.client = await self._engines.start()
        self._set_state(State.RUNNING, "running")

    # -- the controller's watch (cluster/health.py) ------------------------------

    async def _watch_controller(self) -> None:
        """From the controller's launch on: its processes; once its connection
        files exist, also its hub and heart monitor."""
        controller = self._ipp.controller

        def exit_code() -> int | None:
            return (getattr(controller, "stop_data", None) or {}).get("exit_code")

        watch = health.ControllerWatch(controller.pid, self._controller_lost, exit_code)
        self._watch = watch
        watch.start()
        files = await controller.get_connection_info()
        watch.connect(health.watch_info(files["client"], files["engine"]))

    def watch_also(self, pid: int, name: str) -> None:
        """A process the cluster cannot do without that the watch should see stopped."""
        if self._watch is not None:
            self._watch.also_watch(pid, name)

    def _halt_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.stop()

    def _controller_lost(self, cause: str) -> None:
        """The watch's report (its own thread): fail the start, or lose the cluster."""
        with self._lock:
            state = self._state
        if state not in (State.STARTING, State.RUNNING, State.REPLACING):
            return  # stopping or stopped on purpose, or already failed
        self.lost = cause
        if state is State.STARTING:
            tail = self.controller_tail()
            self.error = ClusterLost(
                f"{cause} while the servers were starting"
                + (f"; the controller's last lines:\n{tail}" if tail else "")
            )
            self._loop.loop.call_soon_threadsafe(self._cancel_task)
            return
        self._set_state(State.LOST, f"lost: {cause}")
        self._cancel_task_threadsafe()
        # Signals only (the kernel's thread may be using the client): the
        # controller's processes, mpiexec and the servers go now; the next
        # cell's stop() cleans the rest and starts anew.
        reap(self.janitor.pids() | {p.pid for p in self._watch_processes()}, grace=1.0)

    def _cancel_task_threadsafe(self) -> None:
        self._loop.loop.call_soon_threadsafe(self._cancel_task)

    def _cancel_task(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _watch_processes(self) -> list[Any]:
        watch = self._watch
        return watch.processes() if watch is not None else []

    def controller_tail(self, lines: int = CONTROLLER_TAIL_LINES) -> str:
        """The last lines of the controller's own output (its log), replaced where not UTF-8."""
        controller = getattr(self._ipp, "controller", None)
        path = getattr(controller, "output_file", "")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return "\n".join(f.read().splitlines()[-lines:])
        except OSError:
            return ""

    async def stop_async(self) -> None:
        """Stop a start or replacement under way, then everything."""
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            # let a start or replacement unwind first, so it launches nothing after
            task.cancel()
            await asyncio.wait([task])
        await servers.stop_all(self)

    def _on_engines_stopped(self, es_id: str, stop_data: Any) -> None:
        """ipyparallel's stop event of an engine set (runs on the private loop)."""
        self._engines.stopped(es_id, stop_data)
