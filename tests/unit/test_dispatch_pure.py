"""Dispatch's pure parts and the remote exceptions, by tables (no cluster started)."""

from __future__ import annotations

import pytest
from ipyparallel import error as ipp_error

from casa_kernel.client.jobs import (
    Job,
    classify,
    failure_from,
    is_lost,
    shared_apply,
    trim_traceback,
    world_ended,
)
from casa_kernel.errors import CasaKernelError, RemoteError, ServerFailure, server_failure

CELL_TB = """\
---------------------------------------------------------------------------
ZeroDivisionError                         Traceback (most recent call last)
File /venv/lib/python3.11/site-packages/ipyparallel/engine/kernel.py:123, in do_apply
    exec(code, self.shell.user_global_ns, self.shell.user_ns)
File /venv/lib/python3.11/site-packages/casa_kernel/server/engine.py:84, in run_cell
    exec(body, ns)
File <casa_parallel cell 3>:2
      1 x = 1
----> 2 x / 0
ZeroDivisionError: division by zero"""

TASK_TB = """\
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/ipyparallel/engine/kernel.py", line 123, in do_apply
    exec(code)
  File "/venv/lib/python3.11/site-packages/casa_kernel/server/engine.py", line 112, in run_casa_task
    return task(**parameters)
  File "/venv/lib/python3.11/site-packages/casatasks/flagdata.py", line 10, in __call__
    raise RuntimeError("bad mode")
RuntimeError: bad mode"""


@pytest.mark.parametrize(
    "tb, kept, dropped",
    [
        (CELL_TB, ["<casa_parallel cell 3>:2", "x / 0", "ZeroDivisionError: division by"], []),
        (CELL_TB, [], ["ipyparallel", "engine.py", "exec(body"]),
        (TASK_TB, [], ["ipyparallel", "engine.py", "flagdata", "RuntimeError"]),
        ("", [], []),
    ],
)
def test_trim_traceback_keeps_the_users_part(tb, kept, dropped):
    trimmed = trim_traceback(tb)
    if "<casa_parallel cell" not in tb:  # no user frame: the headline says it all
        assert trimmed == ""
    for text in kept:
        assert text in trimmed
    for text in dropped:
        assert text not in trimmed


def _remote(ename: str, evalue: str = "x") -> ipp_error.RemoteError:
    return ipp_error.RemoteError(ename, evalue, "tb", {"engine_id": 1})


@pytest.mark.parametrize(
    "exc, kind",
    [
        (_remote("EngineError"), "died"),
        (ipp_error.EngineError("Engine 1 died while running task"), "died"),
        (_remote("TaskAborted"), "aborted"),
        (ipp_error.TaskAborted("aborted"), "aborted"),
        (_remote("ZeroDivisionError"), "failed"),
        (ValueError("local"), "failed"),
        # the type decides, not the words
        (_remote("ValueError", "Engine 3 died while running task"), "failed"),
    ],
)
def test_classify_by_type(exc, kind):
    assert classify(exc) == kind


@pytest.mark.parametrize(
    "kind, engine, engines, lost",
    [
        ("died", 0, {0, 1}, True),  # died with its server
        ("ok", 0, {0, 1}, False),  # finished before the death: never re-run
        ("failed", 1, {0, 1}, False),  # the user's error: not ours to re-run
        ("aborted", 1, {0, 1}, False),
        (None, 1, {0, 1}, True),  # was running in the world that ended
        (None, None, {0, 1}, False),  # queued in the load-balancer: flows to new servers
        (None, 5, {0, 1}, False),  # already running on a new server
    ],
)
def test_lost_jobs(kind, engine, engines, lost):
    assert is_lost(kind, engine, engines) is lost


def test_a_running_job_is_not_lost_while_its_world_goes_on():
    assert is_lost(None, 1, {0, 1}, ended=False) is False
    assert is_lost("died", 7, {0, 1}, ended=False) is True  # it, alone, runs again


@pytest.mark.parametrize(
    "died_in, current, missing, ended",
    [
        ([3], 3, False, True),  # a job sent to this world died: it ended
        ([2], 3, False, False),  # sent to the world replaced before: late news
        ([], 3, True, True),  # a server left the controller
        ([], 3, False, False),  # nothing died
        ([2, 3], 3, False, True),  # late news AND this world ended
    ],
)
def test_world_ended(died_in, current, missing, ended):
    assert world_ended(died_in, current, missing) is ended


def _f() -> None:
    pass


def _g() -> None:
    pass


ARGS = ("code",)


@pytest.mark.parametrize(
    "jobs, together",
    [
        ([Job("rank 0", _f, ARGS, 0), Job("rank 1", _f, ARGS, 1)], [0, 1]),  # SPMD
        ([Job("rank 0", _f, ARGS, 0)], []),  # one job: a plain apply
        ([Job("a", _f, ARGS), Job("b", _f, ARGS)], []),  # load-balanced
        ([Job("rank 0", _f, ARGS, 0), Job("rank 1", _g, ARGS, 1)], []),  # two functions
        ([Job("rank 0", _f, tuple("a"), 0), Job("rank 1", _f, tuple("a"), 1)], []),  # two tuples
        ([Job("s", _f, ARGS), Job("r0", _f, ARGS, 0), Job("r1", _f, ARGS, 1)], [1, 2]),
    ],
)
def test_jobs_that_go_out_as_one_apply(jobs, together):
    assert shared_apply(jobs) == together


@pytest.mark.parametrize(
    "ename, builtin",
    [
        ("FileNotFoundError", FileNotFoundError),
        ("ZeroDivisionError", ZeroDivisionError),
        ("KeyError", KeyError),
        ("RuntimeError", RuntimeError),
    ],
)
def test_remote_failure_keeps_the_remote_type(ename, builtin):
    failure = failure_from(_remote(ename, "no such sub-MS"))
    assert isinstance(failure, builtin)
    assert isinstance(failure, ServerFailure) and isinstance(failure, CasaKernelError)
    failure.rank, failure.host, failure.submms = 1, "orion", "/d/x.mms/SUBMSS/x.0001.ms"
    assert str(failure) == (
        f"[server rank 1 on orion] sub-MS /d/x.mms/SUBMSS/x.0001.ms: {ename}: no such sub-MS"
    )
    with pytest.raises(builtin):
        raise failure


def test_unknown_or_dangerous_remote_types_stay_plain():
    assert type(server_failure(0, "h", "MyOwnError", "x")) is ServerFailure
    assert type(server_failure(0, "h", "KeyboardInterrupt", "x")) is ServerFailure
    assert type(server_failure(0, "h", "__import__", "x")) is ServerFailure


def test_remote_error_prints_one_traceback_for_identical_failures():
    same = [
        server_failure(r, "vm", "ZeroDivisionError", "division by zero", "TB-TEXT") for r in (0, 1)
    ]
    text = str(RemoteError(same))
    assert text.count("TB-TEXT") == 1
    assert "[server rank 0 on vm]" in text and "[server rank 1 on vm]" in text
    one = str(RemoteError(same[:1]))
    assert one.count("TB-TEXT") == 1 and "task(s) failed" not in one
