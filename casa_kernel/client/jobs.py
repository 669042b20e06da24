"""Dispatch's pure parts: jobs, handles on their results, and the rules for them.

How a job ended (by the remote exception's type), which jobs to run again after
a server death, which jobs go out as one apply, and what of a server traceback
the user sees -- all without a cluster, so tests check them by tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from casa_kernel.display import clean_text
from casa_kernel.errors import ServerFailure, server_failure


@dataclass
class Job:
    """One unit of work: where its result goes (label) and how to run it."""

    label: str  # sub-MS path, or "rank R"
    func: Any
    args: tuple[Any, ...]
    target: int | None = None  # server rank for SPMD; None = load-balanced
    # Run again on new servers when its server died under it. Not for work that
    # changed files before it died, and cannot start over from where it was
    # (assembling a Multi-MS moves its sub-MSs in).
    rerun: bool = True


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
    # the cluster's world it was sent to: engine ids are MPI ranks, the same in
    # every world, so they cannot tell a job of the servers replaced before
    world: int = 0

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

    def ready(self) -> bool:
        return self.ar.ready()

    def failed(self) -> bool:
        """Finished with an exception (call only when ready)."""
        return self.kind() not in (None, "ok")

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


def classify(exc: BaseException) -> str:
    """How a job ended, by the remote exception's type: died | aborted | unplaced | failed.

    ipyparallel reports a server that died under a running task as an
    ``EngineError`` (wrapped in a RemoteError carrying its type name).
    """
    ename = getattr(exc, "ename", None) or type(exc).__name__
    if ename == "EngineError":
        return "died"
    if ename == "ImpossibleDependency":
        # load-balanced to servers that were replaced before one took it (the
        # view names its servers, to keep CASA's cube client out): send it again
        return "unplaced"
    if ename == "TaskAborted":
        return "aborted"
    return "failed"


def is_lost(kind: str | None, engine: int | None, engines: set[int], ended: bool = True) -> bool:
    """A job to run again: it died with its server, or was running on one of
    ``engines`` (the current MPI world's servers) when that world ended
    (``ended``). Jobs queued in the load-balancer (no engine yet) are not lost:
    they go to the new servers by themselves."""
    if kind is not None:
        return kind == "died"
    return ended and engine is not None and engine in engines


def world_ended(died_in: list[int], current: int, missing: bool) -> bool:
    """Did the current MPI world (``current``: the cluster's ``world`` number) end?
    Servers of it left the controller (``missing``), or a job sent to it died
    (``died_in``: the worlds the dead jobs were sent to). A job that died in a
    world replaced since (its EngineError can come after the recovery) ends
    nothing: the jobs running on the new servers go on."""
    return missing or current in died_in


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

    A traceback that never reached a cell (a CASA task run for a transparent
    call) has no frame of the user's: it is dropped, the failure's headline
    (type and message, rank, host, sub-MS) says it all and CASA's log has the rest.
    """
    lines = tb.splitlines()
    for i, line in enumerate(lines):
        if "<casa_parallel cell" in line:
            return "\n".join(["Traceback (most recent call last):", *lines[i:]])
    return ""


def failure_from(exc: BaseException) -> ServerFailure:
    """A ServerFailure of the remote type (rank/host filled by the caller)."""
    ename = getattr(exc, "ename", None) or type(exc).__name__
    evalue = getattr(exc, "evalue", None)
    evalue = str(exc) if evalue is None else evalue
    tb = getattr(exc, "traceback", "") or ""
    if isinstance(tb, list):
        tb = "\n".join(tb)
    return server_failure(
        None, None, clean_text(ename), clean_text(evalue), clean_text(trim_traceback(tb))
    )


def outcome_of(job: Job, handle: Handle, died: str, tries: int) -> Outcome:
    """A finished job's value or failure. A job lost with its server on every
    one of ``tries`` runs fails as ServerDied, with ``died`` (why the servers
    were last replaced) as the cause: never ipyparallel's words."""
    outcome = Outcome(job)
    if not handle.ready():
        # still "running" on a world that ended after the last allowed
        # recovery: its result will never come (never "Result not ready")
        outcome.failure = server_failure(
            None, None, "ServerDied", f"{died} while running it{_each(tries)}"
        )
        return outcome
    try:
        outcome.value = handle.value()
    except Exception as exc:
        outcome.failure = failure_from(exc)
        if classify(exc) == "died":
            outcome.failure = server_failure(
                None,
                None,
                "ServerDied",
                f"{died} while running it{_each(tries)}; new servers are running",
            )
    return outcome


def _each(tries: int) -> str:
    return f", each of {tries} times" if tries > 1 else ""


def placed(outcome: Outcome, info: Any) -> Outcome:
    """The outcome with the rank and host of its server (``info``, None if unknown)."""
    if info is not None:
        outcome.rank, outcome.host = info.rank, info.host
        if outcome.failure is not None:
            outcome.failure.rank, outcome.failure.host = info.rank, info.host
    return outcome
