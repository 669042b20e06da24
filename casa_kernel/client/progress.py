"""What each server is doing during a parallel operation, from ipyparallel's own records.

Every job's ``AsyncResult`` metadata is live: ``engine_id`` appears with the
first message the engine sends about the job (its "busy" status, i.e. when
the job starts there), ``started``/``completed`` are the engine's own stamps
when the result arrives. :class:`Tracker` turns those into per-server rows
(what runs now, since when, busy time) and hands them to
:class:`casa_kernel.display.Progress`, the one display updated in place.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from casa_kernel import variables
from casa_kernel.display import Progress, ServerRow, StartProgress
from casa_kernel.errors import CasaKernelError

# What each cluster's servers run now, for `%casa_cluster status`:
# id(cluster) -> {engine id: (work, monotonic start)}.
_current: dict[int, dict[int, tuple[str, float]]] = {}


def current_work(cluster: Any) -> dict[int, tuple[str, float]]:
    """engine id -> (work, monotonic start) of what the cluster's servers run now."""
    return dict(_current.get(id(cluster), {}))


def short_label(label: str) -> str:
    """A sub-MS path shortened to its name; other labels as they are."""
    if os.sep in label:
        return os.path.basename(label.rstrip(os.sep))
    return label


class Operation:
    """ONE display for a call made of many dispatches (a parallel continuum
    tclean: a command batch per step and major cycle). Every Tracker opened
    while it is current updates this display instead of making its own; the
    caller names the stage (``major cycle 3``) and how a job reads in it."""

    def __init__(
        self,
        title: str,
        describe: Callable[[str], str] | None = None,
        show_after: float = 0.0,
        live: Callable[[int], str | None] | None = None,
    ):
        self.view = Progress(title, 1, "call", show_after)
        self.t0 = time.monotonic()
        self.stage = ""  # what the call is at, from the client side
        self.cycles = 0  # major cycles begun (imaging)
        self.describe = describe or (lambda label: label)
        # server rank -> what it does now, read at each refresh (a cube's workers:
        # their step, from their CASA logs); None keeps the job's label
        self.live = live
        self.busy: dict[int, float] = {}  # engine id -> seconds, over every dispatch
        self.jobs: dict[int, int] = {}
        self.rows: list[ServerRow] = []

    def set_stage(self, stage: str) -> None:
        changed, self.stage = stage != self.stage, stage
        # a new stage is shown at once (a few per major cycle, seconds apart)
        self.view.update(self.rows, 0, time.monotonic() - self.t0, stage, force=changed)

    def finish(self, ok: bool, message: str) -> None:
        for row in self.rows:
            if row.state in ("idle", "busy"):
                row.state, row.work, row.elapsed = "done", "", None
        self.view.finish(self.rows, int(ok), time.monotonic() - self.t0, message)


_operation: Operation | None = None


@contextlib.contextmanager
def operation(
    title: str,
    describe: Callable[[str], str] | None = None,
    live: Callable[[int], str | None] | None = None,
) -> Iterator[Operation]:
    """While open, every dispatch's progress goes to one display (see Operation)."""
    global _operation
    op = _operation = Operation(title, describe, live=live)
    ended = "stopped"
    try:
        yield op
        ended = ""
    except Exception:
        ended = "failed"
        raise
    finally:
        _operation = None
        op.finish(not ended, ", ".join(w for w in (ended, op.stage) if w))


def current_operation() -> Operation | None:
    return _operation


class Tracker:
    """Follow the jobs of one operation and keep its display up to date."""

    def __init__(
        self,
        cluster: Any,
        labels: Sequence[str],
        title: str,
        unit: str = "jobs",
        show_after: float = 0.0,
    ):
        self.cluster = cluster
        self.op = _operation  # part of a larger call: its one display
        if self.op is not None:
            self.labels = [self.op.describe(label) for label in labels]
            self.view = self.op.view
            self.t0 = self.op.t0
        else:
            self.labels = [short_label(label) for label in labels]
            self.view = Progress(title, len(labels), unit, show_after)
            self.t0 = time.monotonic()
        self._seen: dict[int, tuple[int, float]] = {}  # job -> (engine id, first seen)
        # engine id -> seconds of finished jobs, finished jobs (an operation's: all of it)
        self._busy: dict[int, float] = self.op.busy if self.op else {}
        self._jobs: dict[int, int] = self.op.jobs if self.op else {}
        self._finished: set[int] = set()
        self._current = _current.setdefault(id(cluster), {})

    def poll(self, handles: Sequence[Any]) -> None:
        """Read the handles' metadata; update the display (throttled by it)."""
        now = time.monotonic()
        for i, handle in enumerate(handles):
            if i in self._finished:
                continue
            md = handle.metadata
            eid = md.get("engine_id")
            if eid is None:
                continue
            if i not in self._seen:
                self._seen[i] = (eid, now)
            if handle.ready():
                self._finish_job(i, eid, md, now)
        if self.view.due(now - self.t0):  # rows only when they will be shown
            if self.op is not None:
                self.view.update(self._rows(now), 0, now - self.t0, self.op.stage)
            else:
                self.view.update(self._rows(now), len(self._finished), now - self.t0)

    def finish(self, handles: Sequence[Any], message: str = "") -> None:
        """Final state and the summary line (wall time, each server's busy share)."""
        now = time.monotonic()
        if self.op is not None:  # the operation sums up, at its end
            for i, handle in enumerate(handles):
                eid = handle.metadata.get("engine_id")
                if i not in self._finished and eid is not None and handle.ready():
                    self._seen.setdefault(i, (eid, now))
                    self._finish_job(i, eid, handle.metadata, now)
            self._rows(now)
            self._current.clear()
            return
        if not self.view.shown and now - self.t0 < self.view.show_after:
            self._current.clear()
            return  # quick work: never shown, nothing to sum up
        for i, handle in enumerate(handles):
            eid = handle.metadata.get("engine_id")
            if i not in self._finished and eid is not None and handle.ready():
                self._seen.setdefault(i, (eid, now))
                self._finish_job(i, eid, handle.metadata, now)
        self._current.clear()
        rows = self._rows(now)
        for row in rows:
            if row.state == "idle":
                row.state = "done"
        self.view.finish(rows, len(self._finished), now - self.t0, message)

    def _finish_job(self, i: int, eid: int, md: Any, now: float) -> None:
        self._finished.add(i)
        started, completed = md.get("started"), md.get("completed")
        try:  # the engine's own stamps: exact, whenever we happened to look
            seconds = (completed - started).total_seconds()
        except TypeError:
            seconds = now - self._seen[i][1]
        self._busy[eid] = self._busy.get(eid, 0.0) + max(0.0, seconds)
        self._jobs[eid] = self._jobs.get(eid, 0) + 1

    def _rows(self, now: float) -> list[ServerRow]:
        running: dict[int, tuple[str, float]] = {}
        for i, (eid, since) in self._seen.items():
            if i not in self._finished:
                running[eid] = (self.labels[i], since)
        self._current.clear()
        self._current.update(running)
        alive = set(self.cluster.client.ids) if self.cluster.client is not None else set()
        rows = []
        for eid, info in sorted(self.cluster.servers.items(), key=lambda item: item[1].rank):
            if info.rank < 0 and eid not in running and not self._jobs.get(eid):
                continue  # CASA's cube client: a row only where it works (a cube)
            row = ServerRow(info.rank, info.host, pid=info.pid, share=info.memory_share)
            row.memory = _local_rss(info.pid)  # against its share; none read remotely here
            row.busy = self._busy.get(eid, 0.0)
            row.jobs = self._jobs.get(eid, 0)
            if eid not in alive:
                row.state = "dead"
            elif eid in running:
                work, since = running[eid]
                if self.op is not None and self.op.live is not None:
                    work = self.op.live(info.rank) or work
                row.state, row.work, row.elapsed = "busy", work, now - since
                row.busy += now - since
            rows.append(row)
        if self.op is not None:
            self.op.rows = rows
        return rows


def wait_ready(cluster: Any) -> Any:
    """Wait for the servers, showing the start as one live display; the client."""
    # (also when running: wait_ready replaces servers found missing first; the
    # view shows nothing unless there is something to wait for)
    view = StartProgress(cluster.config.placement)
    try:
        client = cluster.wait_ready(progress=view)
    except CasaKernelError:
        view.finish([], ok=False)
        raise
    if view.waited:
        view.finish(cluster.status())
    return client


def status_rows(cluster: Any, timeout: float = 2.0) -> list[ServerRow]:
    """``%casa_cluster status``: rank, host, pid, state, current work, memory (RSS).

    Memory is read with psutil where the server's pid belongs to this cluster on
    this machine (even while it is busy), else asked from the idle servers.
    """
    infos = cluster.status()
    work = current_work(cluster)
    now = time.monotonic()
    eid_of = {(info.rank, info.pid): eid for eid, info in cluster.servers.items()}
    rows = []
    remote: dict[int, ServerRow] = {}
    for info in infos:
        row = ServerRow(info.rank, info.host, info.state, pid=info.pid)
        eid = eid_of.get((info.rank, info.pid))
        known = cluster.servers.get(eid) if eid is not None else None
        if known is not None:
            row.share = known.memory_share
        if eid in work:
            row.work, since = work[eid]
            row.elapsed = now - since
        if info.state != "dead":
            row.memory = _local_rss(info.pid)
            if row.memory is None and info.state == "idle" and eid is not None:
                remote[eid] = row
        rows.append(row)
    if remote:
        from casa_kernel.server import engine

        try:
            ar = cluster.view(sorted(remote)).apply_async(engine.memory)
            for eid, rss in zip(sorted(remote), ar.get(timeout)):
                remote[eid].memory = rss
        except Exception:  # a server that does not answer now shows '?'
            pass
    return rows


def _local_rss(pid: int) -> int | None:
    import psutil

    try:
        proc = psutil.Process(pid)
        # the same pid on another host is another process: check it is ours
        if proc.environ().get(variables.OWNER) != str(os.getpid()):
            return None
        return proc.memory_info().rss
    except psutil.Error:
        return None
