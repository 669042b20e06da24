"""Is the controller alive and answering? A watch that trusts none of the kernel's loops.

ipyparallel notices dead servers (their heartbeat, mpiexec's exit) but nothing
notices a dead or silent CONTROLLER: results just never come and a cell waits
forever. :class:`ControllerWatch` is a daemon thread that checks, every
``PERIOD`` and whatever the kernel is doing:

- every process of the controller (its hub, and the processes the hub forks:
  task and broadcast schedulers, heart monitor) still runs and is not stopped
  (SIGSTOP) for longer than ``STOPPED_GRACE``;
- the hub answers a question (a ``queue_request`` on its query socket, as a
  client asks) within ``ANSWER_TIMEOUT``;
- its heart monitor beats: the pings every server also gets (the engine side's
  ``hb_ping`` socket) arrive at least once per ``BEAT_TIMEOUT``.

The first failure is told ONCE through ``on_lost(cause)``, with a cause that
names the process, its pid and what happened ("the controller's hub (pid 812)
was killed by signal 9 (SIGKILL)"). The sockets and zmq context are the
thread's own, so a wedged client or event loop cannot hide a dead controller.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import zmq
from ipyparallel.util import disambiguate_url
from jupyter_client.session import Session

log = logging.getLogger("casa_kernel.cluster")

PERIOD = 1.0  # seconds between two checks
# The hub answers a queue_request in ~1 ms and the heart monitor beats every
# 500 ms (launcher.CONTROLLER_ARGS). 4 s of silence, checked every second,
# keeps "noticed within 5 s" and is 8 beats: a controller starved on a box at
# load 10 still beats far more often than that.
ANSWER_TIMEOUT = 4.0
BEAT_TIMEOUT = 4.0
# A process stopped this long (SIGSTOP, a debugger) counts as silent.
STOPPED_GRACE = 2.0
# How long the launcher's own wait gets to learn the hub's exit status.
EXIT_STATUS_WAIT = 1.0


def describe_exit(returncode: int | None) -> str:
    """'was killed by signal 9 (SIGKILL)' / 'exited with code 1' / 'exited' (pure)."""
    if returncode is None:
        return "exited"
    if returncode < 0:
        try:
            name = f" ({signal.Signals(-returncode).name})"
        except ValueError:
            name = ""
        return f"was killed by signal {-returncode}{name}"
    return f"exited with code {returncode}"


def watch_info(client_info: dict[str, Any], engine_info: dict[str, Any]) -> dict[str, Any]:
    """What the watch connects to, from the controller's two connection dicts (pure).

    The watch runs on the controller's host: an interface bound to every
    address (``tcp://*``, across hosts) is reached on loopback."""
    query = f"{client_info['interface']}:{client_info['registration']}"
    beats = f"{engine_info['interface']}:{engine_info['hb_ping']}"
    return {
        "key": client_info["key"],
        "signature_scheme": client_info.get("signature_scheme", "hmac-sha256"),
        "query": disambiguate_url(query),
        "beats": disambiguate_url(beats),
        "curve_serverkey": client_info.get("curve_serverkey") or "",
    }


class ControllerWatch:
    """Watch one controller: its processes from its launch on, then (once its
    connection files exist, :meth:`connect`) its hub and heart monitor."""

    def __init__(
        self,
        hub_pid: int,
        on_lost: Callable[[str], None],
        exit_code: Callable[[], int | None] = lambda: None,
    ) -> None:
        """``hub_pid``: the controller's first process; ``exit_code``: the hub's
        exit status once its launcher knows it, to name the signal that killed it."""
        self.hub = psutil.Process(hub_pid)
        self.on_lost = on_lost
        self.exit_code = exit_code
        self.lost = ""
        self._info: dict[str, Any] | None = None
        self._halt = threading.Event()
        self._forked: dict[int, psutil.Process] = {}
        # other processes the cluster cannot do without, watched for SIGSTOP only
        # (their deaths have their own events): pid -> (process, name for the user)
        self._also: dict[int, tuple[psutil.Process, str]] = {}
        self._stopped_since: dict[int, float] = {}
        self._thread = threading.Thread(
            target=self._run, name="casa-kernel-controller-watch", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def connect(self, info: dict[str, Any]) -> None:
        """Also ask the hub and listen to the heart monitor (``info``: :func:`watch_info`)."""
        self._info = info

    def stop(self) -> None:
        """Stop watching (the cluster is being stopped on purpose); returns at once."""
        self._halt.set()

    def also_watch(self, pid: int, name: str) -> None:
        """Watch this process (``name``: "the servers' mpiexec") for being stopped."""
        try:
            self._also = {**self._also, pid: (psutil.Process(pid), name)}
        except psutil.Error:
            pass

    def processes(self) -> list[psutil.Process]:
        """The controller's processes seen so far (the hub first)."""
        return [self.hub, *self._forked.values()]

    # -- the thread ----------------------------------------------------------

    def _run(self) -> None:
        ctx = zmq.Context()
        try:
            cause = self._watch(ctx)
        except Exception as exc:  # a bug here must not pass silently
            log.exception("the controller watch failed")
            cause = f"the controller watch failed: {exc!r}"
        finally:
            ctx.destroy(linger=0)
        if cause and not self._halt.is_set():
            self.lost = cause
            log.info("controller lost: %s", cause)
            self.on_lost(cause)

    def _watch(self, ctx: zmq.Context) -> str:
        """Check until halted ('') or until something is wrong (the cause)."""
        hub: _HubLine | None = None
        while not self._halt.is_set():
            if hub is None and self._info is not None:
                hub = _HubLine(ctx, self._info)
            if hub is not None:
                hub.listen(PERIOD)
            else:
                self._halt.wait(PERIOD)
            if self._halt.is_set():
                return ""
            now = time.monotonic()
            cause = self._processes_lost(now)
            if not cause and hub is not None:
                cause = hub.silence(now, self.hub.pid)
            if cause:
                return cause
        return ""

    def _processes_lost(self, now: float) -> str:
        """A process of the controller gone or stopped ('' if none)."""
        try:
            for child in self.hub.children(recursive=True):
                self._forked.setdefault(child.pid, child)
        except psutil.Error:
            pass
        if not _alive(self.hub) or any(not _alive(p) for p in self._forked.values()):
            time.sleep(EXIT_STATUS_WAIT / 4)  # a kill of the whole group: report it whole
            return self._deaths()
        named = [(p, "the controller's forked process") for p in self._forked.values()]
        named = [(self.hub, "the controller's hub"), *named, *self._also.values()]
        for proc, name in named:
            try:
                stopped = proc.status() == psutil.STATUS_STOPPED
            except psutil.Error:
                stopped = False
            if not stopped:
                self._stopped_since.pop(proc.pid, None)
                continue
            if now - self._stopped_since.setdefault(proc.pid, now) >= STOPPED_GRACE:
                return f"{name} (pid {proc.pid}) is stopped (SIGSTOP)"
        return ""

    def _deaths(self) -> str:
        """'the controller's hub (pid 8) was killed by signal 9 (SIGKILL), and 4
        processes it forked (pids 9, 10, 11, 12) exited'."""
        dead = sorted(pid for pid, proc in self._forked.items() if not _alive(proc))
        forked = ""
        if dead:
            pids = ", ".join(map(str, dead))
            plural = "es" if len(dead) > 1 else ""
            forked = f"{len(dead)} process{plural} it forked (pid {pids}) exited"
        hub = f"the controller's hub (pid {self.hub.pid})"
        if _alive(self.hub):
            return f"{hub} lives, but {forked}"
        deadline = time.monotonic() + EXIT_STATUS_WAIT
        while self.exit_code() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the launcher's thread reaps it and records the status
        return f"{hub} {describe_exit(self.exit_code())}" + (f", and {forked}" if forked else "")


class _HubLine:
    """The watch's two sockets to a controller: a question to the hub, the beats."""

    def __init__(self, ctx: zmq.Context, info: dict[str, Any]) -> None:
        self.info = info
        self.session = Session(
            key=info["key"].encode("ascii"), signature_scheme=info["signature_scheme"]
        )
        self.query = self._socket(ctx, zmq.DEALER)
        self.query.connect(info["query"])
        self.beats = self._socket(ctx, zmq.SUB)
        self.beats.setsockopt(zmq.SUBSCRIBE, b"")
        self.beats.connect(info["beats"])
        self.poller = zmq.Poller()
        self.poller.register(self.query, zmq.POLLIN)
        self.poller.register(self.beats, zmq.POLLIN)
        self.last_beat = time.monotonic()
        self.asked = 0.0  # when the unanswered question was sent (0: none pending)

    def listen(self, seconds: float) -> None:
        """For ``seconds``: ask once (unless a question is pending), take what arrives.

        Never returns early: an answer must not send the next question at once
        (that would hammer the hub as fast as it answers)."""
        end = time.monotonic() + seconds
        if not self.asked:
            self.session.send(self.query, "queue_request", {"targets": None, "verbose": False})
            self.asked = time.monotonic()
        while (left := end - time.monotonic()) > 0:
            for sock, _ in self.poller.poll(timeout=max(1, int(left * 1000))):
                while sock.poll(0):
                    sock.recv_multipart()
                if sock is self.query:
                    self.asked = 0.0
                else:
                    self.last_beat = time.monotonic()

    def silence(self, now: float, hub_pid: int) -> str:
        """What has been silent too long ('' if nothing)."""
        if self.asked and now - self.asked > ANSWER_TIMEOUT:
            return f"the controller's hub (pid {hub_pid}) did not answer for {ANSWER_TIMEOUT:g} s"
        if now - self.last_beat > BEAT_TIMEOUT:
            return (
                "the controller's heart monitor sent the servers no heartbeat "
                f"for {BEAT_TIMEOUT:g} s"
            )
        return ""

    def _socket(self, ctx: zmq.Context, kind: int) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.linger = 0
        if self.info["curve_serverkey"]:  # encrypted: any client key pair is accepted
            sock.curve_serverkey = self.info["curve_serverkey"].encode("ascii")
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        return sock


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
