"""The server side of exact re-runs (casa_kernel/casa/rerun.py), on a real sub-MS.

Each attempt is run here as the server runs it; a "death" is an attempt whose
task raises KeyboardInterrupt after changing the flags (what a killed or
stopped server leaves: a half-changed sub-MS and the backup).
"""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest

from casa_kernel.casa import rerun


@pytest.mark.parametrize(
    "task, params, expected",
    [
        ("flagdata", {"mode": "rflag"}, True),
        ("flagdata", {"mode": "tfcrop"}, True),
        ("flagdata", {"mode": "extend"}, True),
        ("flagdata", {"mode": "list", "inpfile": ["mode='rflag'"]}, True),
        ("flagdata", {"mode": "clip", "timeavg": True}, True),
        ("flagdata", {"mode": "quack", "quackincrement": True}, True),
        ("flagdata", {"mode": "quack"}, False),
        ("flagdata", {"mode": "manual"}, False),
        ("flagdata", {}, False),  # manual is flagdata's default mode
        ("flagdata", {"mode": "unflag"}, False),
        ("flagdata", {"mode": "shadow"}, False),
        ("flagdata", {"mode": "summary"}, False),
        ("flagdata", {"mode": "rflag", "action": "calculate"}, False),
        ("flagdata", {"mode": "rflag", "writeflags": False}, False),
        ("applycal", {"applymode": "calflag"}, False),
        ("setjy", {}, False),
        ("split", {"outputvis": "x.ms"}, False),
    ],
)
def test_which_jobs_keep_flags(task, params, expected):
    assert rerun.needs_flag_backup(task, params) is expected


@pytest.fixture
def sub(tiny_mms, tmp_path):
    mms = shutil.copytree(tiny_mms, tmp_path / "t.mms", symlinks=True)
    return sorted(glob.glob(os.path.join(mms, "SUBMSS", "*.ms")))[0]


def _flags(vis: str) -> np.ndarray:
    from casatools import table

    tb = table()
    tb.open(vis)
    try:
        return tb.getcol("FLAG")
    finally:
        tb.close()


def _flag_some(vis: str, channels: str) -> None:
    from casatasks import flagdata

    flagdata(vis=vis, mode="manual", spw=f"*:{channels}", flagbackup=False)


class Died(KeyboardInterrupt):
    """Stands for the server being stopped mid-task."""


def test_attempt_after_a_death_starts_from_the_flags_before(sub, capsys):
    before = _flags(sub)
    calls = []

    def dying(**params):
        calls.append("dying")
        _flag_some(params["vis"], "0~1")
        raise Died

    def task(**params):
        calls.append("task")
        assert np.array_equal(_flags(params["vis"]), before)  # restored first
        _flag_some(params["vis"], "2")
        return {"ok": 1}

    params = {"vis": sub, "mode": "rflag"}
    with pytest.raises(Died):
        rerun.run_guarded(dying, "flagdata", params, "tok", "rank 0 on h")
    assert not np.array_equal(_flags(sub), before)
    assert rerun.run_guarded(task, "flagdata", params, "tok", "rank 1 on h") == {"ok": 1}
    assert "restored the flags of" in capsys.readouterr().err

    # finished, but the reply was lost with the world: not run a third time
    def never(**params):
        raise AssertionError("ran again")

    after = _flags(sub)
    assert rerun.run_guarded(never, "flagdata", params, "tok", "rank 0 on h") == {"ok": 1}
    assert np.array_equal(_flags(sub), after)
    assert calls == ["dying", "task"]

    rerun.forget(sub, "tok")  # the kernel, once the call has its replies
    assert not os.path.exists(sub + ".flagversions")


def test_failed_task_drops_its_backup_and_keeps_existing_versions(sub):
    from casatools import agentflagger

    af = agentflagger()
    af.open(sub)
    af.saveflagversion(versionname="mine", comment="user's", merge="replace")
    af.done()

    def failing(**params):
        raise RuntimeError("bad selection")

    with pytest.raises(RuntimeError):
        rerun.run_guarded(failing, "flagdata", {"vis": sub, "mode": "tfcrop"}, "t2", "r")
    listing = open(os.path.join(sub + ".flagversions", "FLAG_VERSION_LIST")).read()
    assert "mine" in listing and "casa_kernel_rerun" not in listing
    assert sorted(os.listdir(sub + ".flagversions")) == ["FLAG_VERSION_LIST", "flags.mine"]


def test_backup_of_a_call_that_never_ended_is_removed_by_the_next(sub):
    def dying(**params):
        raise Died

    with pytest.raises(Died):
        rerun.run_guarded(dying, "flagdata", {"vis": sub, "mode": "rflag"}, "old", "r")
    assert glob.glob(os.path.join(sub + ".flagversions", "*old*"))
    rerun.run_guarded(lambda **p: None, "flagdata", {"vis": sub, "mode": "rflag"}, "new", "r")
    rerun.forget(sub, "new")
    assert not os.path.exists(sub + ".flagversions")


def test_read_only_and_idempotent_jobs_keep_nothing(sub):
    rerun.run_guarded(lambda **p: 1, "flagdata", {"vis": sub, "mode": "summary"}, "t", "r")
    rerun.run_guarded(lambda **p: 1, "applycal", {"vis": sub}, "t", "r")
    assert not os.path.exists(sub + ".flagversions")


def test_call_forgotten_by_the_kernel_while_its_job_runs_leaves_nothing(sub):
    def task(**params):  # the kernel's Ctrl-C: it forgets the call, the job goes on
        rerun.forget(params["vis"], "t3")
        return 1

    assert rerun.run_guarded(task, "flagdata", {"vis": sub, "mode": "rflag"}, "t3", "r") == 1
    assert not os.path.exists(sub + ".flagversions")
