"""Dispatch cells to the servers and gather their results.

Two shapes, both in ParallelTaskHelper's fixed steps (generate jobs -> execute
-> collect -> consolidate):

- SPMD: the cell runs once on every server (``rank``, ``size``, ``comm`` bound);
  the value is the list of each server's last expression, in rank order.
- per sub-MS: the cell runs once per sub-MS of a Multi-MS with ``vis`` bound,
  load-balanced over the servers; the values are merged as CASA merges them.

Waiting is event-driven (``AsyncResult.wait``) with a short cap so servers'
output is relayed while they run; Ctrl-C interrupts the servers, a timeout
names the servers still busy.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from casa_kernel import engine
from casa_kernel.cluster import CasaCluster
from casa_kernel.display import StreamPrinter, server_label
from casa_kernel.errors import ClusterError, RemoteError, ServerFailure, TaskTimeout

# How long the servers get to stop after an interrupt before we give up on them.
INTERRUPT_GRACE = 5.0
# Upper bound on the time between two relays of servers' output.
OUTPUT_INTERVAL = 0.05
# How long a finished task's last output may lag behind its result.
OUTPUT_GRACE = 5.0
# How many times one call replaces dead servers before giving up.
MAX_RECOVERIES = 2


@dataclass
class Job:
    """One unit of work: where its result goes (label) and how to run it."""

    label: str  # sub-MS path, or "rank R"
    func: Any
    args: tuple[Any, ...]
    target: int | None = None  # server rank for SPMD; None = load-balanced


@dataclass
class Outcome:
    job: Job
    rank: int | None = None
    host: str | None = None
    value: Any = None
    failure: ServerFailure | None = None


@dataclass
class SubMSResults:
    """Per-sub-MS values, the merged value, and which sub-MSs failed."""

    vis: str
    per_submms: dict[str, Any] = field(default_factory=dict)
    merged: Any = None
    failures: list[ServerFailure] = field(default_factory=list)


class Dispatcher:
    def __init__(self, cluster: CasaCluster, printer: StreamPrinter | None = None):
        self.cluster = cluster
        self.printer = printer or StreamPrinter()

    # -- the two shapes --------------------------------------------------------

    def spmd(self, code: str, timeout: float | None = None) -> list[Any]:
        """Run ``code`` on every server; return values in rank order."""
        self.cluster.wait_ready()
        ranks = range(self.cluster.config.nservers)
        args = (code,)  # one tuple for all: submitted as one DirectView apply
        jobs = [Job(f"rank {r}", engine.run_cell, args, target=r) for r in ranks]
        outcomes = self.execute(jobs, timeout)
        failures = [o.failure for o in outcomes if o.failure]
        values = [o.value for o in outcomes]
        if failures:
            raise RemoteError(failures, results=values)
        return values

    def per_submms(
        self, code: str, submms: list[str], vis: str, timeout: float | None = None
    ) -> SubMSResults:
        """Run ``code`` once per sub-MS (``vis`` bound to it), load-balanced."""
        jobs = [Job(path, engine.run_cell, (code, {"vis": path})) for path in submms]
        outcomes = self.execute(jobs, timeout)
        result = SubMSResults(vis=vis)
        for outcome in outcomes:
            if outcome.failure:
                outcome.failure.submms = outcome.job.label
                result.failures.append(outcome.failure)
            else:
                result.per_submms[outcome.job.label] = outcome.value
        return result

    # -- execute + collect ------------------------------------------------------

    def execute(self, jobs: list[Job], timeout: float | None = None) -> list[Outcome]:
        """Submit every job, relay output while they run, collect outcomes."""
        return self.collect(jobs, self.submit(jobs), timeout)

    def collect(
        self, jobs: list[Job], submitted: list[Handle], timeout: float | None = None
    ) -> list[Outcome]:
        """Wait for submitted jobs, relaying their output; one Outcome per job.

        A dead server costs no result: OpenMPI ends the whole MPI world when one
        rank dies, so every job running then dies with it. The engine set is
        replaced at once (queued load-balanced jobs then flow to the new
        servers) and exactly the jobs that died are run again; nothing that had
        finished is re-run.
        """
        handles = list(submitted)
        client = self.cluster.wait_ready()
        try:
            for attempt in range(MAX_RECOVERIES + 1):
                self._wait(client, handles, timeout)
                # OpenMPI ends the whole world: every engine of it is gone
                world = set(self.cluster.servers)
                lost = [i for i, h in enumerate(handles) if h.lost(world)]
                if not lost or attempt == MAX_RECOVERIES:
                    break
                self._relay(handles)
                cause = self.cluster.recover()
                client = self.cluster.client
                names = ", ".join(jobs[i].label for i in lost)
                print(
                    f"casa-kernel: {cause}; started new servers and re-ran: {names}",
                    file=sys.stderr,
                    flush=True,
                )
                for i, handle in zip(lost, self.submit([jobs[i] for i in lost])):
                    handles[i] = handle
        finally:
            # A result can arrive before the last of its output (other socket).
            for ar in _unique(handles):
                if ar.ready():
                    ar.wait_for_output(OUTPUT_GRACE)
            self._relay(handles)
            self.printer.flush()
        return [self._outcome(job, h) for job, h in zip(jobs, handles)]

    def submit(self, jobs: list[Job]) -> list[Handle]:
        """Send the jobs to the servers; one Handle per job.

        Jobs with a target that share one function and arguments (an SPMD cell)
        go out as ONE DirectView apply: serialized once, one AsyncResult.
        """
        client = self.cluster.wait_ready()
        handles: list[Handle | None] = [None] * len(jobs)
        direct = [i for i, job in enumerate(jobs) if job.target is not None]
        first = jobs[direct[0]] if direct else None
        if (
            first is not None
            and len(direct) > 1
            and all(jobs[i].func is first.func and jobs[i].args is first.args for i in direct)
        ):
            eids = [self._engine_of(jobs[i].target) for i in direct]
            ar = self.cluster.view(eids).apply_async(first.func, *first.args)
            for index, i in enumerate(direct):
                handles[i] = Handle(ar, index, multi=True)
            direct = []
        for i in direct:
            ar = client[self._engine_of(jobs[i].target)].apply_async(jobs[i].func, *jobs[i].args)
            handles[i] = Handle(ar)
        balanced = [i for i, job in enumerate(jobs) if job.target is None]
        if balanced:
            lview = client.load_balanced_view()
            for i in balanced:
                handles[i] = Handle(lview.apply_async(jobs[i].func, *jobs[i].args))
        return [h for h in handles if h is not None]

    def _engine_of(self, rank: int) -> int:
        for eid, info in self.cluster.servers.items():
            if info.rank == rank:
                return eid
        raise ClusterError(f"no server has rank {rank}")

    def _wait(self, client: Any, handles: list[Handle], timeout: float | None) -> None:
        """Until every job is done, a server died, the timeout or Ctrl-C."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = [ar for ar in _unique(handles) if not ar.ready()]
        try:
            while pending:
                pending[0].wait(OUTPUT_INTERVAL)
                self._relay(handles)
                if self._world_lost(handles):
                    return  # the rest would wait for servers that are gone
                pending = [ar for ar in pending if not ar.ready()]
                if pending and deadline is not None and time.monotonic() > deadline:
                    busy = self._busy_engines(pending)
                    self._stop_running(client, pending)
                    names = ", ".join(self._label(e) for e in busy) or "unknown servers"
                    raise TaskTimeout(
                        f"{len(pending)} task(s) still running after {timeout:g} s on {names}; "
                        "they were interrupted. A server that does not respond can be "
                        "replaced with %casa_cluster restart"
                    )
        except KeyboardInterrupt:
            self._stop_running(client, pending)
            raise

    def _world_lost(self, handles: list[Handle]) -> bool:
        """A server died: a job failed that way, or servers left the controller."""
        if any(h.died() for h in handles):
            return True
        client = self.cluster.client
        return client is not None and len(client.ids) < self.cluster.config.nservers

    def _stop_running(self, client: Any, pending: list[Any]) -> None:
        """Abort queued work and interrupt the servers running ours."""
        busy = self._busy_engines(pending)
        try:
            client.abort(jobs=pending, block=False)
        except Exception:
            pass
        if busy:
            try:
                client.send_signal(signal.SIGINT, targets=sorted(busy), block=False)
            except Exception:
                pass
        deadline = time.monotonic() + INTERRUPT_GRACE
        for ar in pending:
            ar.wait(max(0.0, deadline - time.monotonic()))

    def _busy_engines(self, pending: list[Any]) -> set[int]:
        """Engines of the unfinished parts of these results."""
        busy: set[int] = set()
        for ar in pending:
            targets = getattr(ar, "_targets", None) or []
            for i, (md, child) in enumerate(zip(ar._metadata, ar._children)):
                if child.done():
                    continue
                eid = md.get("engine_id")
                if eid is None and i < len(targets) and isinstance(targets[i], int):
                    eid = targets[i]  # a direct job: its engine is known before it starts
                if eid is not None:
                    busy.add(eid)
        if not busy:  # load-balanced and not started: every engine may hold one
            busy = set(self.cluster.client.ids) if self.cluster.client else set()
        return busy

    def _label(self, eid: int | None) -> str:
        info = self.cluster.servers.get(eid) if eid is not None else None
        if info is None:
            return f"engine {eid}"
        return server_label(info.rank, info.host)

    def _relay(self, handles: list[Handle]) -> None:
        """Print what servers wrote since the last relay (metadata is live)."""
        for handle in handles:
            md = handle.metadata
            eid = md.get("engine_id")
            if eid is None:
                continue
            seen = md.setdefault("_casa_kernel_seen", {})
            for name in ("stdout", "stderr"):
                text = md.get(name) or ""
                done = seen.get(name, 0)
                if len(text) > done:
                    self.printer.write(self._label(eid), name, text[done:])
                    seen[name] = len(text)

    def _outcome(self, job: Job, handle: Handle) -> Outcome:
        eid = handle.metadata.get("engine_id")
        outcome = Outcome(job)
        try:
            outcome.value = handle.value()
        except Exception as exc:
            outcome.failure = failure_from(exc)
            if eid is None:
                eid = outcome.failure.engine_id
        info = self.cluster.servers.get(eid) if eid is not None else None
        if info is not None:
            outcome.rank, outcome.host = info.rank, info.host
            if outcome.failure is not None:
                outcome.failure.rank, outcome.failure.host = info.rank, info.host
        return outcome


@dataclass
class Handle:
    """One job's share of an AsyncResult (an SPMD apply covers every server)."""

    ar: Any
    index: int = 0
    multi: bool = False

    @property
    def metadata(self) -> dict[str, Any]:
        return self.ar._metadata[self.index]

    def ready(self) -> bool:
        return self.ar.ready()

    def value(self) -> Any:
        """The job's value; its exception is raised."""
        if not self.multi:
            return self.ar.get(0)
        value = self.ar.get(0, return_exceptions=True)[self.index]
        if isinstance(value, BaseException):
            raise value
        return value

    def died(self) -> bool:
        """Finished because its server died."""
        if not self.ready():
            return False
        try:
            self.value()
        except Exception as exc:
            return _is_death(exc)
        return False

    def lost(self, world: set[int]) -> bool:
        """Died with its server, or was running in the world that ended.

        Jobs still queued in the load-balancer are not lost: they go to the new
        servers by themselves.
        """
        if self.ready():
            return self.died()
        return self.metadata.get("engine_id") in world


def _unique(handles: list[Handle]) -> list[Any]:
    seen: dict[int, Any] = {}
    for handle in handles:
        seen.setdefault(id(handle.ar), handle.ar)
    return list(seen.values())


# "Engine 1 died while ..." (direct) or "Engine b'<uuid>' died ..." (load-balanced)
_DIED = re.compile(r"Engine (\d+|b'[^']*') died")


def _is_death(exc: BaseException) -> bool:
    return getattr(exc, "ename", "") == "EngineError" and bool(
        _DIED.search(getattr(exc, "evalue", "") or str(exc))
    )


def failure_from(exc: BaseException) -> ServerFailure:
    """Turn an ipyparallel error into a ServerFailure (rank/host filled by the caller)."""
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    tb = getattr(exc, "traceback", "") or ""
    if isinstance(tb, list):
        tb = "\n".join(tb)
    info = getattr(exc, "engine_info", None) or {}
    failure = ServerFailure(None, None, ename, evalue, trim_traceback(tb))
    failure.engine_id = info.get("engine_id")
    died = _DIED.search(evalue or "") if ename == "EngineError" else None
    failure.died = died is not None
    if died and failure.engine_id is None and died.group(1).isdigit():
        failure.engine_id = int(died.group(1))
    return failure


def trim_traceback(tb: str) -> str:
    """Drop the frames of ipyparallel and casa-kernel above the user's cell.

    The user wants to see their cell's lines, not our plumbing; a traceback
    that never reached a cell (e.g. from a CASA task) is kept whole.
    """
    lines = tb.splitlines()
    for i, line in enumerate(lines):
        if "<casa_parallel cell" in line:
            return "\n".join(lines[:2] + [""] + lines[i:])
    return tb
