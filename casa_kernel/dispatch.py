"""Dispatch cells to the servers and gather their results.

Two shapes, both in ParallelTaskHelper's fixed steps (generate jobs -> execute
-> collect -> consolidate):

- SPMD: the cell runs once on every server (``rank``, ``size``, ``comm`` bound);
  the value is the list of each server's last expression, in rank order.
- per sub-MS: the cell runs once per sub-MS of a Multi-MS with ``vis`` bound,
  load-balanced over the servers; the values are merged as CASA merges them.

Waiting is event-driven (``AsyncResult.wait``) with a short cap so servers'
output is relayed while they run. Never stuck: Ctrl-C or ``--timeout``
interrupts the servers; servers that do not stop within INTERRUPT_GRACE are
named, and replaced (at once after a timeout; after an interrupt, when the next
cell that needs them is interrupted too). The pure parts (job grouping,
failure classification, lost-job detection, traceback trimming) are module
functions, tested by tables.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from casa_kernel import engine
from casa_kernel.display import StreamPrinter, server_label
from casa_kernel.errors import ClusterError, RemoteError, ServerFailure, TaskTimeout, server_failure
from casa_kernel.lifecycle import CasaCluster

# How long the servers get to stop after an interrupt before we call them stuck
# (an interrupted cell returns within this + a little: the issue asks for 5 s).
INTERRUPT_GRACE = 3.0
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


@dataclass
class Handle:
    """One job's share of an AsyncResult (an SPMD apply covers every server)."""

    ar: Any
    index: int = 0
    multi: bool = False
    engine: int | None = None  # known for a direct job; load-balanced: from metadata

    @property
    def metadata(self) -> dict[str, Any]:
        md = self.ar.metadata
        return md[self.index] if self.multi else md

    @property
    def msg_id(self) -> str:
        return self.ar.msg_ids[self.index]

    def engine_id(self) -> int | None:
        eid = self.metadata.get("engine_id")
        return self.engine if eid is None else eid

    def done(self, client: Any) -> bool:
        return self.msg_id not in client.outstanding

    def value(self) -> Any:
        """The job's value; its exception is raised."""
        if not self.multi:
            return self.ar.get(0)
        value = self.ar.get(0, return_exceptions=True)[self.index]
        if isinstance(value, BaseException):
            raise value
        return value

    def kind(self) -> str | None:
        """None while running, else classify() of how it ended."""
        if not self.ar.ready():
            return None
        try:
            self.value()
        except Exception as exc:
            return classify(exc)
        return "ok"


# -- pure parts --------------------------------------------------------------


def classify(exc: BaseException) -> str:
    """How a job ended, by the remote exception's type: died | aborted | failed.

    ipyparallel reports a server that died under a running task as an
    ``EngineError`` (wrapped in a RemoteError carrying its type name).
    """
    ename = getattr(exc, "ename", None) or type(exc).__name__
    if ename == "EngineError":
        return "died"
    if ename == "TaskAborted":
        return "aborted"
    return "failed"


def is_lost(kind: str | None, engine: int | None, world: set[int]) -> bool:
    """A job to run again after its MPI world ended: it died with its server, or
    was running in that world. Jobs queued in the load-balancer (no engine yet)
    are not lost: they go to the new servers by themselves."""
    if kind is not None:
        return kind == "died"
    return engine is not None and engine in world


def shared_apply(jobs: list[Job]) -> list[int]:
    """Indexes of direct jobs that can go out as ONE DirectView apply (an SPMD
    cell: same function, same argument tuple); [] when they cannot."""
    direct = [i for i, job in enumerate(jobs) if job.target is not None]
    if len(direct) < 2:
        return []
    first = jobs[direct[0]]
    if all(jobs[i].func is first.func and jobs[i].args is first.args for i in direct):
        return direct
    return []


def trim_traceback(tb: str) -> str:
    """Only the user's part of a server traceback: from the first line of their
    cell on, without ipyparallel's and casa-kernel's frames above it.

    A traceback that never reached a cell (e.g. from a CASA task) loses only
    the frames of ipyparallel and casa-kernel's engine module.
    """
    lines = tb.splitlines()
    for i, line in enumerate(lines):
        if "<casa_parallel cell" in line:
            return "\n".join(["Traceback (most recent call last):", *lines[i:]])
    kept: list[str] = []
    skipping = False
    for line in lines:
        if line.lstrip().startswith("File "):
            skipping = "ipyparallel" in line or "casa_kernel/engine.py" in line
        elif not line.startswith(" "):
            skipping = False
        if not skipping:
            kept.append(line)
    return "\n".join(kept)


def failure_from(exc: BaseException) -> ServerFailure:
    """A ServerFailure of the remote type (rank/host filled by the caller)."""
    ename = getattr(exc, "ename", None) or type(exc).__name__
    evalue = getattr(exc, "evalue", None)
    evalue = str(exc) if evalue is None else evalue
    tb = getattr(exc, "traceback", "") or ""
    if isinstance(tb, list):
        tb = "\n".join(tb)
    return server_failure(None, None, ename, evalue, trim_traceback(tb))


# -- the dispatcher ----------------------------------------------------------


class Dispatcher:
    def __init__(self, cluster: CasaCluster, printer: StreamPrinter | None = None):
        self.cluster = cluster
        self.printer = printer or StreamPrinter()
        self._seen: dict[tuple[str, str], int] = {}  # (msg_id, stream) -> chars relayed
        self._known: dict[int, Any] = {}  # every server seen, so dead ones keep a name

    def spmd(self, code: str, timeout: float | None = None) -> list[Any]:
        """Run ``code`` on every server; return values in rank order."""
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

    def execute(self, jobs: list[Job], timeout: float | None = None) -> list[Outcome]:
        """Submit every job, relay output while they run, collect outcomes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return self.collect(jobs, self.submit(jobs, deadline), timeout, deadline)

    def collect(
        self,
        jobs: list[Job],
        submitted: list[Handle],
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> list[Outcome]:
        """Wait for submitted jobs, relaying their output; one Outcome per job.

        A dead server costs no result: OpenMPI ends the whole MPI world when one
        rank dies, so every job running then dies with it. The engine set is
        replaced (queued load-balanced jobs then flow to the new servers) and
        exactly the jobs that died are run again; nothing that had finished is.
        """
        handles = list(submitted)
        if deadline is None and timeout is not None:
            deadline = time.monotonic() + timeout
        try:
            for attempt in range(MAX_RECOVERIES + 1):
                self._wait(handles, timeout, deadline)
                world = set(self.cluster.servers)  # OpenMPI ends the whole world
                lost = [i for i, h in enumerate(handles) if is_lost(h.kind(), h.engine_id(), world)]
                if not lost or attempt == MAX_RECOVERIES:
                    break
                self._relay(handles)
                cause = self.cluster.recover()
                names = ", ".join(jobs[i].label for i in lost)
                say(f"{cause}; started new servers and re-ran: {names}")
                for i, handle in zip(lost, self.submit([jobs[i] for i in lost], deadline)):
                    handles[i] = handle
        finally:
            # A result can arrive before the last of its output (other socket).
            for ar in _unique(handles):
                if ar.ready():
                    ar.wait_for_output(OUTPUT_GRACE)
            self._relay(handles)
            self.printer.flush()
        return [self._outcome(job, h) for job, h in zip(jobs, handles)]

    def submit(self, jobs: list[Job], deadline: float | None = None) -> list[Handle]:
        """Send the jobs to the servers; one Handle per job.

        Jobs with a target that share one function and arguments (an SPMD cell)
        go out as ONE DirectView apply: serialized once, one AsyncResult.
        """
        self._wait_stuck(deadline)
        client = self._ready()
        handles: list[Handle | None] = [None] * len(jobs)
        together = shared_apply(jobs)
        if together:
            eids = [self._engine_of(jobs[i].target) for i in together]
            first = jobs[together[0]]
            ar = self.cluster.view(eids).apply_async(first.func, *first.args)
            for index, i in enumerate(together):
                handles[i] = Handle(ar, index, multi=True, engine=eids[index])
        for i, job in enumerate(jobs):
            if job.target is not None and handles[i] is None:
                eid = self._engine_of(job.target)
                handles[i] = Handle(client[eid].apply_async(job.func, *job.args), engine=eid)
        balanced = [i for i, job in enumerate(jobs) if job.target is None]
        if balanced:
            lview = client.load_balanced_view()
            for i in balanced:
                handles[i] = Handle(lview.apply_async(jobs[i].func, *jobs[i].args))
        return [h for h in handles if h is not None]

    def _ready(self) -> Any:
        from casa_kernel.display import progress

        client = self.cluster.wait_ready(progress=progress)
        self._known.update(self.cluster.servers)
        for notice in self.cluster.take_notices():
            say(notice)
        return client

    def _engine_of(self, rank: int | None) -> int:
        for eid, info in self.cluster.servers.items():
            if info.rank == rank:
                return eid
        raise ClusterError(f"no server has rank {rank}")

    # -- waiting, never stuck ---------------------------------------------

    def _wait(self, handles: list[Handle], timeout: float | None, deadline: float | None) -> None:
        """Until every job is done, a server died, the timeout or Ctrl-C."""
        pending = [ar for ar in _unique(handles) if not ar.ready()]
        try:
            while pending:
                pending[0].wait(OUTPUT_INTERVAL)
                self._relay(handles)
                if self._world_lost(handles):
                    return  # the rest would wait for servers that are gone
                pending = [ar for ar in pending if not ar.ready()]
                if pending and deadline is not None and time.monotonic() > deadline:
                    self._timed_out(handles, pending, timeout)
        except KeyboardInterrupt:
            self._interrupted(handles, pending)
            raise

    def _world_lost(self, handles: list[Handle]) -> bool:
        """A server died: a job failed that way, or servers left the controller."""
        if any(h.kind() == "died" for h in handles):
            return True
        client = self.cluster.client
        return client is not None and len(client.ids) < self.cluster.config.nservers

    def _timed_out(self, handles: list[Handle], pending: list[Any], timeout: float | None) -> None:
        busy = self._busy(handles)
        stuck = self._stop_running(handles, pending)
        names = self._names(busy) or "unknown servers"
        message = f"{len(pending)} task(s) still running after {timeout:g} s on {names}; "
        if stuck:
            self.cluster.replace(f"{self._names(stuck)} did not stop after the timeout")
            message += (
                f"interrupted, but {self._names(stuck)} did not stop within "
                f"{INTERRUPT_GRACE:g} s: the servers were killed and new ones are starting "
                "(%casa_cluster status)"
            )
        else:
            message += "they were interrupted"
        raise TaskTimeout(message)

    def _interrupted(self, handles: list[Handle], pending: list[Any]) -> None:
        try:
            stuck = self._stop_running(handles, pending)
        except KeyboardInterrupt:  # a second Ctrl-C: do not wait for them
            stuck = self._busy(handles)
            self.cluster.replace(f"{self._names(stuck)} interrupted twice")
            say(f"{self._names(stuck)} replaced by new servers (interrupted twice)")
            return
        if stuck:
            self.cluster.mark_stuck(stuck, pending)
            say(
                f"{self._names(stuck)} did not stop within {INTERRUPT_GRACE:g} s of the "
                "interrupt (a blocking MPI call, or C code that ignores Ctrl-C); the next "
                "cell waits for it: interrupt that cell to replace the stuck servers "
                "(or %casa_cluster restart)"
            )

    def _stop_running(self, handles: list[Handle], pending: list[Any]) -> set[int]:
        """Abort queued work, interrupt the servers running ours; those that did
        not stop within INTERRUPT_GRACE."""
        client = self.cluster.client
        busy = self._busy(handles)
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
        return self._busy(handles) if any(not ar.ready() for ar in pending) else set()

    def _wait_stuck(self, deadline: float | None) -> None:
        """Servers still running an interrupted cell: wait for them, or replace
        them when this cell is interrupted or times out."""
        stuck = {e for e, ars in self.cluster.stuck.items() if any(not a.ready() for a in ars)}
        if not stuck:
            self.cluster.stuck.clear()
            return
        names = self._names(stuck)
        say(f"{names} still running an interrupted cell; waiting (interrupt to replace)")
        try:
            for ar in {id(a): a for e in stuck for a in self.cluster.stuck.get(e, [])}.values():
                while not ar.wait(OUTPUT_INTERVAL):
                    if deadline is not None and time.monotonic() > deadline:
                        self.cluster.replace(f"{names} stuck in an interrupted cell")
                        raise TaskTimeout(
                            f"{names} still stuck in an interrupted cell at the timeout: "
                            "the servers were killed and new ones are starting"
                        )
        except KeyboardInterrupt:
            self.cluster.replace(f"{names} stuck in an interrupted cell")
            say(f"{names} killed; new servers are starting (%casa_cluster status)")
            raise
        self.cluster.stuck.clear()

    def _busy(self, handles: list[Handle]) -> set[int]:
        """Engines running (or holding) the unfinished jobs."""
        client = self.cluster.client
        busy = {h.engine_id() for h in handles if not h.done(client)}
        if None in busy:  # load-balanced and not started: every engine may hold one
            busy = set(client.ids)
        return {e for e in busy if e is not None}

    def _names(self, eids: set[int]) -> str:
        return ", ".join(self._label(e) for e in sorted(eids))

    def _label(self, eid: int | None) -> str:
        info = self._info(eid)
        if info is None:
            return f"engine {eid}"
        return server_label(info.rank, info.host)

    # -- output and outcomes ----------------------------------------------

    def _relay(self, handles: list[Handle]) -> None:
        """Print what servers wrote since the last relay (metadata is live)."""
        for handle in handles:
            md = handle.metadata
            eid = md.get("engine_id")
            if eid is None:
                continue
            for name in ("stdout", "stderr"):
                text = md.get(name) or ""
                key = (handle.msg_id, name)
                done = self._seen.get(key, 0)
                if len(text) > done:
                    self.printer.write(self._label(eid), name, text[done:])
                    self._seen[key] = len(text)

    def _outcome(self, job: Job, handle: Handle) -> Outcome:
        eid = handle.engine_id()
        outcome = Outcome(job)
        try:
            outcome.value = handle.value()
        except Exception as exc:
            outcome.failure = failure_from(exc)
            if classify(exc) == "died":  # never ipyparallel's words: ours, with the cause
                cause = self.cluster.death_cause() or "its server died"
                outcome.failure = server_failure(
                    None,
                    None,
                    "ServerDied",
                    f"{cause} while running it, each of {MAX_RECOVERIES + 1} times; "
                    "new servers are running",
                )
        info = self._info(eid)
        if info is not None:
            outcome.rank, outcome.host = info.rank, info.host
            if outcome.failure is not None:
                outcome.failure.rank, outcome.failure.host = info.rank, info.host
        return outcome

    def _info(self, eid: int | None) -> Any:
        if eid is None:
            return None
        return self.cluster.servers.get(eid) or self._known.get(eid)


def _unique(handles: list[Handle]) -> list[Any]:
    seen: dict[int, Any] = {}
    for handle in handles:
        seen.setdefault(id(handle.ar), handle.ar)
    return list(seen.values())


def say(message: str) -> None:
    """A casa-kernel message in the cell (stderr: it is about a problem)."""
    print(f"casa-kernel: {message}", file=sys.stderr, flush=True)
