"""Never stuck: interrupts and timeouts of work on the servers.

Ctrl-C or ``--timeout`` aborts queued work and interrupts the servers running
ours. Servers that do not stop within INTERRUPT_GRACE (a deadlocked collective,
C code that ignores SIGINT, a stopped process) are named; after a timeout they
are replaced at once (kill, new engine set, same controller); after an
interrupt they are marked stuck, and the next cell that needs them waits for
them and replaces them when it is interrupted in turn (or at once on a second
Ctrl-C during the grace period).
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from casa_kernel.client.jobs import Handle
from casa_kernel.cluster.lifecycle import CasaCluster
from casa_kernel.errors import TaskTimeout

# How long the servers get to stop after an interrupt before we call them stuck
# (an interrupted cell returns within this + a little: the issue asks for 5 s).
INTERRUPT_GRACE = 3.0
# How often a wait for stuck servers looks at the clock.
POLL = 0.05


class Interrupts:
    def __init__(self, cluster: CasaCluster, names: Callable[[set[int]], str]):
        self.cluster = cluster
        self.names = names  # "rank 0@vm, rank 1@vm"

    def timed_out(self, handles: list[Handle], pending: list[Any], timeout: float | None) -> None:
        busy = self.busy(handles)
        stuck = self.stop_running(handles, pending)
        names = self.names(busy) or "unknown servers"
        message = f"{len(pending)} task(s) still running after {timeout:g} s on {names}; "
        if stuck:
            self.cluster.replace(f"{self.names(stuck)} did not stop after the timeout")
            message += (
                f"interrupted, but {self.names(stuck)} did not stop within "
                f"{INTERRUPT_GRACE:g} s: the servers were killed and new ones are starting "
                "(%casa_cluster status)"
            )
        else:
            message += "they were interrupted"
        raise TaskTimeout(message)

    def interrupted(self, handles: list[Handle], pending: list[Any]) -> None:
        try:
            stuck = self.stop_running(handles, pending)
        except KeyboardInterrupt:  # a second Ctrl-C: do not wait for them
            stuck = self.busy(handles)
            self.cluster.replace(f"{self.names(stuck)} interrupted twice")
            say(f"{self.names(stuck)} replaced by new servers (interrupted twice)")
            return
        if stuck:
            for eid in stuck:  # the next cell waits for them; status shows them
                self.cluster.stuck.setdefault(eid, []).extend(pending)
            say(
                f"{self.names(stuck)} did not stop within {INTERRUPT_GRACE:g} s of the "
                "interrupt (a blocking MPI call, or C code that ignores Ctrl-C); the next "
                "cell waits for it: interrupt that cell to replace the stuck servers "
                "(or %casa_cluster restart)"
            )

    def stop_running(self, handles: list[Handle], pending: list[Any]) -> set[int]:
        """Abort queued work, interrupt the servers running ours; those that did
        not stop within INTERRUPT_GRACE."""
        client = self.cluster.client
        busy = self.busy(handles)
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
        return self.busy(handles) if any(not ar.ready() for ar in pending) else set()

    def wait_stuck(self, deadline: float | None) -> None:
        """Servers still running an interrupted cell: wait for them, or replace
        them when this cell is interrupted or times out."""
        stuck = {e for e, ars in self.cluster.stuck.items() if any(not a.ready() for a in ars)}
        if not stuck or self.cluster.is_lost():  # (lost: a new cluster starts anyway)
            self.cluster.stuck.clear()
            return
        names = self.names(stuck)
        try:
            # (inside the try: an interrupt that lands while this is printed, as
            # soon as the user sees it, replaces them too)
            say(f"{names} still running an interrupted cell; waiting (interrupt to replace)")
            for ar in {id(a): a for e in stuck for a in self.cluster.stuck.get(e, [])}.values():
                while not ar.wait(POLL):
                    if self.cluster.is_lost():
                        self.cluster.stuck.clear()
                        return
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

    def busy(self, handles: list[Handle]) -> set[int]:
        """Engines running (or holding) the unfinished jobs."""
        client = self.cluster.client
        busy = {h.engine_id() for h in handles if not h.done(client)}
        if None in busy:  # load-balanced and not started: every engine may hold one
            busy = set(client.ids)
        return {e for e in busy if e is not None}


def say(message: str) -> None:
    """A casa-kernel message in the cell (stderr: it is about a problem)."""
    print(f"casa-kernel: {message}", file=sys.stderr, flush=True)
