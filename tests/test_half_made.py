"""Nothing half-made: a failed task leaves no output, flag versions or ``<output>.data``.

casatasks' ParallelDataHelper makes ``<dir>/<base>.data`` for the sub-MS outputs
before any job runs; a split into a bad selection used to leave it behind.
"""

from __future__ import annotations

import os

import pytest
from kernels import execute, kernel_env, running_kernel

from casa_kernel.casa.outputs import partial_outputs
from casa_kernel.casa.tasks import CasaTask


@pytest.mark.parametrize(
    "outputvis, expected",
    [
        ("/d/out.mms", ["/d/out.mms", "/d/out.mms.flagversions", "/d/out.mms.data"]),
        ("/d/out.mms/", ["/d/out.mms", "/d/out.mms.flagversions", "/d/out.mms.data"]),
        ("/d/out.", ["/d/out.", "/d/out..flagversions", "/d/out.data"]),
        ("", []),
        (None, []),
        (["a", "b"], []),
    ],
)
def test_partial_outputs(outputvis, expected):
    assert partial_outputs(outputvis) == expected


def _leftovers(folder) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.startswith("bad"))


def test_failed_split_leaves_nothing_serial(tiny_mms, tmp_path):
    split = CasaTask("split")
    # No cluster: casatasks runs every sub-MS job here, logs "no subMSs were
    # successfully created" and returns; its .data folder was left behind.
    split(vis=tiny_mms, outputvis=str(tmp_path / "bad.mms"), spw="99")
    split(tiny_mms, str(tmp_path / "bad2.mms"), spw="99")  # outputvis by position
    assert _leftovers(tmp_path) == []


def test_failed_split_leaves_nothing_on_a_cluster(tiny_mms, tmp_path):
    keep = tmp_path / "bad-existing.mms"
    keep.mkdir()  # an output that exists is CASA's error, and is not ours to remove
    (keep / "mine").write_text("x")
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3"), cwd=str(tmp_path)) as (_km, kc):
        for code in (
            f"split(vis={tiny_mms!r}, outputvis='bad1.mms', spw='99')",
            f"split(vis={tiny_mms!r}, outputvis='bad2.mms', field='nosuch')",
            f"mstransform(vis={tiny_mms!r}, outputvis='bad3.mms', spw='7~9', datacolumn='data')",
            f"split(vis={tiny_mms!r}, outputvis='bad-existing.mms', spw='0')",
        ):
            reply = execute(kc, code)
            assert reply.status == "error", code
        # a good split still works, and leaves no .data folder either
        reply = execute(
            kc, f"split(vis={tiny_mms!r}, outputvis='good.mms', spw='0', datacolumn='data')"
        )
        assert reply.status == "ok", reply.error
    assert _leftovers(tmp_path) == ["bad-existing.mms"]
    assert (keep / "mine").read_text() == "x"
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("good")) == ["good.mms"]
