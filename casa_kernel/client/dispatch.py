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

import time
from typing import Any

from casa_kernel.casa.outputs import full_disk_death
from casa_kernel.casa.tasks import writing
from casa_kernel.client.interrupts import Interrupts, say
from casa_kernel.client.jobs import (
    Handle,
    Job,
    Outcome,
    SubMSResults,
    is_lost,
    outcome_of,
    placed,
    shared_apply,
    world_ended,
)
from casa_kernel.client.progress import Tracker
from casa_kernel.cluster.launcher import OOM_KILLED
from casa_kernel.cluster.lifecycle import CasaCluster
from casa_kernel.display import StreamPrinter, server_label
from casa_kernel.errors import ClusterError, RemoteError, kernel_cwd
from casa_kernel.server import engine

# Upper bound on the time between two relays of servers' output.
OUTPUT_INTERVAL = 0.05
# How long a finished task's last output may lag behind its result.
OUTPUT_GRACE = 5.0
# How many times one call replaces dead servers before giving up.
MAX_RECOVERIES = 2
# An SPMD cell shows its live table only when it runs longer than this: a quick
# cell should not flash a display.
SPMD_SHOW_AFTER = 1.0
# A per-sub-MS cell's table appears after this: each update of a display costs
# ~3 ms (ipykernel flushes the streams first), which a 15 ms cell would feel.
SUBMMS_SHOW_AFTER = 0.25


class Dispatcher:
    def __init__(
        self,
        cluster: CasaCluster,
        printer: StreamPrinter | None = None,
        title: str = "casa_parallel",
    ):
        self.cluster = cluster
        self.output = ServerOutput(cluster, printer)
        self.interrupts = Interrupts(cluster, self.output.names)
        self.title = title  # names the operation in its live progress display
        self.unit = "jobs"
        self.show_after = 0.0

    def spmd(self, code: str, timeout: float | None = None) -> list[Any]:
        """Run ``code`` on every server; return values in rank order."""
        ranks = range(self.cluster.config.nservers)
        # one tuple for all: submitted as one DirectView apply
        args = (code, None, kernel_cwd())
        jobs = [Job(f"rank {r}", engine.run_cell, args, target=r) for r in ranks]
        self.unit, self.show_after = "servers", SPMD_SHOW_AFTER
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
        cwd = kernel_cwd()
        jobs = [Job(path, engine.run_cell, (code, {"vis": path}, cwd)) for path in submms]
        self.unit, self.show_after = "sub-MS", SUBMMS_SHOW_AFTER
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
        replaced (queued load-balanced jobs are sent to the new servers) and
        exactly the jobs that died are run again; nothing that had finished is.
        """
        handles = list(submitted)
        if deadline is None and timeout is not None:
            deadline = time.monotonic() + timeout
        tracker = Tracker(
            self.cluster, [job.label for job in jobs], self.title, self.unit, self.show_after
        )
        tracker.poll(handles)
        finished = False
        recoveries = stale_reruns = 0
        tries: dict[int, int] = {}  # jobs lost and not run again: how many runs they had
        full_disk = False  # (or out of memory: nothing re-run either)
        try:
            while True:
                self._wait(handles, timeout, deadline, tracker)
                unplaced = [i for i, h in enumerate(handles) if h.kind() == "unplaced"]
                if unplaced:  # queued for servers replaced since: to the new ones, quietly
                    resent = self.submit([jobs[i] for i in unplaced], deadline)
                    for i, handle in zip(unplaced, resent):
                        handles[i] = handle
                    continue
                engines = set(self.cluster.servers)  # OpenMPI ends the whole world
                kinds = {i: h.kind() for i, h in enumerate(handles) if i not in tries}
                died_in = [handles[i].world for i, k in kinds.items() if k == "died"]
                current = self.cluster.world
                ended = world_ended(died_in, current, self._servers_missing())
                lost = [
                    i
                    for i, k in kinds.items()
                    if is_lost(k, handles[i].engine_id(), engines, ended)
                ]
                if not lost:
                    break
                self.output.relay(handles)
                names = ", ".join(jobs[i].label for i in lost)
                if full_disk:  # still full: nothing is run again in this call
                    tries.update({i: recoveries for i in lost})
                    continue
                if recoveries and not ended:
                    # Jobs that reached a server of the world that ended just
                    # before it ended fail late, after the recovery; the new
                    # world is fine: run them again, do not replace it.
                    if stale_reruns >= MAX_RECOVERIES:
                        tries.update({i: recoveries for i in lost})
                        continue
                    stale_reruns += 1
                    say(f"re-ran jobs lost with the servers replaced before: {names}")
                elif recoveries < MAX_RECOVERIES:
                    recoveries += 1
                    # (not ended: the watch replaced their world before we looked)
                    cause = self.cluster.recover(current if ended else min(died_in))
                    # a full disk fails the same write the same way again; the
                    # same work needs the same memory
                    full_disk = full_disk_death(cause, writing()) or OOM_KILLED in cause
                    kept = [i for i in lost if full_disk or not jobs[i].rerun]
                    tries.update({i: recoveries for i in kept})
                    lost = [i for i in lost if i not in tries]
                    if kept:
                        said = ", ".join(jobs[i].label for i in kept)
                        say(f"{cause}; started new servers, did not re-run: {said}")
                    if not lost:
                        continue  # wait for the rest
                    again = ", ".join(jobs[i].label for i in lost)
                    say(f"{cause}; started new servers and re-ran: {again}")
                else:
                    # No more re-runs, but new servers now: the error says they
                    # run, and the next cell must not find dead ones and replace
                    # them again with a second notice of its own.
                    self.cluster.recover(current)
                    break
                for i, handle in zip(lost, self.submit([jobs[i] for i in lost], deadline)):
                    handles[i] = handle
            finished = True
        finally:
            # A result can arrive before the last of its output (other socket).
            for ar in _unique(handles):
                if ar.ready():
                    ar.wait_for_output(OUTPUT_GRACE)
            self.output.relay(handles)
            self.output.note_outside_python()
            self.output.printer.flush()
            failed = sum(1 for h in handles if h.ready() and h.failed())
            words = [] if finished else ["stopped"]
            words += [f"{failed} failed"] if failed else []
            tracker.finish(handles, ", ".join(words))
        died = self.cluster.last_cause or "its server died"
        outcomes = [
            placed(
                outcome_of(job, h, died, tries.get(i, MAX_RECOVERIES + 1)),
                self.output.info(h.engine_id()),
            )
            for i, (job, h) in enumerate(zip(jobs, handles))
        ]
        self.output.release(handles)
        return outcomes

    def submit(self, jobs: list[Job], deadline: float | None = None) -> list[Handle]:
        """Send the jobs to the servers; one Handle per job.

        Jobs with a target that share one function and arguments (an SPMD cell)
        go out as ONE DirectView apply: serialized once, one AsyncResult.
        """
        self.interrupts.wait_stuck(deadline)
        client = self._ready()
        world = self.cluster.world
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
            # the servers only: not CASA's cube client (rank -1, casa/role.py)
            servers = [eid for eid, info in self.cluster.servers.items() if info.rank >= 0]
            lview = client.load_balanced_view(targets=sorted(servers))
            for i in balanced:
                handles[i] = Handle(lview.apply_async(jobs[i].func, *jobs[i].args))
        for handle in handles:
            if handle is not None:
                handle.world = world
        return [h for h in handles if h is not None]

    def _ready(self) -> Any:
        from casa_kernel.client.progress import wait_ready

        client = wait_ready(self.cluster)
        self.output.known.update(self.cluster.servers)
        for notice in self.cluster.take_notices():
            say(notice)
        return client

    def _engine_of(self, rank: int | None) -> int:
        for eid, info in self.cluster.servers.items():
            if info.rank == rank:
                return eid
        raise ClusterError(f"no server has rank {rank}")

    # -- waiting, never stuck ---------------------------------------------

    def _wait(
        self,
        handles: list[Handle],
        timeout: float | None,
        deadline: float | None,
        tracker: Tracker | None = None,
    ) -> None:
        """Until every job is done, a server died, the timeout or Ctrl-C."""
        pending = [ar for ar in _unique(handles) if not ar.ready()]
        try:
            while pending:
                pending[0].wait(OUTPUT_INTERVAL)
                self.output.relay(handles)
                if tracker is not None:
                    tracker.poll(handles)
                self.cluster.check_alive()  # the controller lost: ClusterLost
                if self._world_lost(handles):
                    return  # the rest would wait for servers that are gone
                pending = [ar for ar in pending if not ar.ready()]
                if pending and deadline is not None and time.monotonic() > deadline:
                    self.interrupts.timed_out(handles, pending, timeout)
        except KeyboardInterrupt:
            self.interrupts.interrupted(handles, pending)
            raise

    def _world_lost(self, handles: list[Handle]) -> bool:
        """A server died: a job failed that way, or servers left the controller."""
        if any(h.kind() in ("died", "unplaced") for h in handles):
            return True
        return self._servers_missing()

    def _servers_missing(self) -> bool:
        """Servers (or CASA's cube client) of the current world left the controller."""
        client = self.cluster.client
        return client is not None and not set(self.cluster.servers) <= set(client.ids)


_said_outside_python = False  # the note on servers' C output: once per session


class ServerOutput:
    """What the servers print, relayed under their names (rank@host)."""

    def __init__(self, cluster: CasaCluster, printer: StreamPrinter | None = None):
        self.cluster = cluster
        self.printer = printer or StreamPrinter()
        self._seen: dict[tuple[str, str], int] = {}  # (msg_id, stream) -> chars relayed
        self.known: dict[int, Any] = {}  # every server seen, so dead ones keep a name

    def relay(self, handles: list[Handle]) -> None:
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
                    self.printer.write(self.label(eid), name, text[done:])
                    self._seen[key] = len(text)

    def release(self, handles: list[Handle]) -> None:
        """Drop relayed output from ipyparallel's metadata, which the client keeps
        for every request of the session (up to 10 MB per server per cell)."""
        for handle in handles:
            md = handle.metadata
            for name in ("stdout", "stderr"):
                if md.get(name):
                    md[name] = ""
                self._seen.pop((handle.msg_id, name), None)

    def note_outside_python(self) -> None:
        """Say ONCE per session that servers wrote outside Python (C code writing
        to fd 1/2), where it is kept, and what it began with. Not relayed: CASA
        echoes there what its log (relayed) already says (cluster/launcher.py)."""
        global _said_outside_python
        if _said_outside_python:
            return
        try:
            text, path, log = self.cluster._engines.unread_output()
        except Exception:  # a note must never fail a cell
            return
        if not text:
            return
        _said_outside_python = True
        first = text.splitlines()[0][:120]
        after = f", and in {log} once these servers stop" if log else ""
        say(
            f"the servers wrote outside Python (C code writing to file descriptors 1 and 2), "
            f"e.g. {first!r}; such output is not shown in cells (said once): it is kept in "
            f"{path}{after}"
        )

    def names(self, eids: set[int]) -> str:
        return ", ".join(self.label(e) for e in sorted(eids))

    def label(self, eid: int | None) -> str:
        info = self.info(eid)
        if info is None:
            return f"engine {eid}"
        return server_label(info.rank, info.host)

    def info(self, eid: int | None) -> Any:
        if eid is None:
            return None
        return self.cluster.servers.get(eid) or self.known.get(eid)


def _unique(handles: list[Handle]) -> list[Any]:
    seen: dict[int, Any] = {}
    for handle in handles:
        seen.setdefault(id(handle.ar), handle.ar)
    return list(seen.values())


__all__ = ["Dispatcher", "Job", "Outcome", "SubMSResults"]
