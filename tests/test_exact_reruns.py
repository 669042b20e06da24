"""A server SIGKILLed in the middle of an in-place task: the re-run is exact.

The NGC5921 chain on casadata's demo data (importuvfits, autocorrelations
flagged, setjy, bandpass, gaincal, fluxscale; ~3 s serially), partitioned by
scan into 7 sub-MSs (~3.5 s). The kernel runs rflag and applycal on a copy
without faults and on a copy where a server is SIGKILLed while it is in the
middle of the task (seen in its CASA log); flags and corrected data must be
EQUAL. NGC5921 fits the budget: the whole module takes ~1 min on 2 cores.

rflag's server is killed when its log says "Writing flags to the MS": the
flags of that sub-MS are (being) written, the task has not returned. Without
the restore, the re-run is rflag on rflagged data, which flags more (checked:
thousands of flags differ).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import threading
import time

import numpy as np
import pytest
from kernels import execute, kernel_env, kernel_pid, running_kernel


@pytest.fixture(scope="module")
def ngc5921(tmp_path_factory, casa_env):
    import casadata
    from casatasks import (
        bandpass,
        flagdata,
        fluxscale,
        gaincal,
        importuvfits,
        partition,
        setjy,
    )

    root = tmp_path_factory.mktemp("ngc5921")
    ms, mms = str(root / "ngc5921.ms"), str(root / "ngc5921.mms")
    importuvfits(fitsfile=os.path.join(casadata.datapath, "demo", "NGC5921.fits"), vis=ms)
    flagdata(vis=ms, mode="manual", autocorr=True, flagbackup=False)
    setjy(vis=ms, field="0", standard="Perley-Butler 2017", usescratch=False)
    bcal, gcal, fcal = (str(root / f"ngc5921.{k}") for k in ("bcal", "gcal", "fcal"))
    bandpass(vis=ms, caltable=bcal, field="0", solint="inf", combine="scan", refant="15")
    gaincal(
        vis=ms, caltable=gcal, field="0,1", solint="inf", refant="15", gaintable=[bcal],
        gaintype="G", calmode="ap",
    )  # fmt: skip
    fluxscale(vis=ms, caltable=gcal, fluxtable=fcal, reference="0", transfer="1")
    partition(vis=ms, outputvis=mms, createmms=True, separationaxis="scan")
    assert len(os.listdir(os.path.join(mms, "SUBMSS"))) == 7
    return root, mms, [fcal, bcal]


@pytest.fixture(scope="module")
def kernel(ngc5921):
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3"), cwd=str(ngc5921[0])) as (km, kc):
        reply = execute(kc, "%casa_cluster status")
        assert reply.status == "ok", reply.error
        kc.km = km
        yield kc


def _copy(mms: str, dst: str) -> str:
    shutil.copytree(mms, dst, symlinks=True)
    return dst


def _columns(mms: str, names: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
    from casatools import table

    tb = table()
    out = {}
    for sub in sorted(glob.glob(os.path.join(mms, "SUBMSS", "*.ms"))):
        tb.open(sub)
        try:
            out[os.path.basename(sub)] = {c: tb.getcol(c) for c in names}
        finally:
            tb.close()
    return out


def _server_pids(kc) -> dict[int, int]:
    reply = execute(kc, "%%casa_parallel\nimport os\nos.getpid()")
    assert reply.status == "ok", reply.error
    return dict(enumerate(eval(reply.result)))


class Killer(threading.Thread):
    """SIGKILL the server whose CASA log shows ``pattern`` (new lines only)."""

    def __init__(
        self, log_dir: str, kernel: int, pids: dict[int, int], pattern: str, delay: float = 0.0
    ):
        super().__init__(daemon=True)
        self.pids, self.pattern, self.delay = pids, re.compile(pattern), delay
        # this kernel's servers' logs: casa-<host>-kernel<pid>-rank<R>.log
        self.files = {
            rank: path
            for rank in pids
            for path in glob.glob(os.path.join(log_dir, f"casa-*-kernel{kernel}-rank{rank}.log"))
        }
        self.offsets = {r: os.path.getsize(p) for r, p in self.files.items()}
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for rank, path in self.files.items():
                with open(path, "rb") as f:
                    f.seek(self.offsets[rank])
                    new = f.read().decode(errors="replace")
                if self.pattern.search(new):
                    time.sleep(self.delay)
                    os.kill(self.pids[rank], signal.SIGKILL)
                    self.killed = rank
                    return
            time.sleep(0.005)


def _faulty(kc, log_dir: str, code: str, pattern: str, delay: float = 0.0):
    killer = Killer(log_dir, kernel_pid(kc.km), _server_pids(kc), pattern, delay)
    assert killer.files, f"no server log in {log_dir}"
    killer.start()
    try:
        reply = execute(kc, code)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "the kill did not happen during the task"
    return reply, killer.killed


def _no_backups_left(mms: str) -> None:
    left = glob.glob(os.path.join(mms, "SUBMSS", "*.flagversions"))
    assert left == [], left


def test_rflag_killed_mid_task_flags_equal_fault_free(ngc5921, kernel, tmp_path, casa_log_dir):
    _, mms, _ = ngc5921
    clean, faulty = _copy(mms, str(tmp_path / "clean.mms")), _copy(mms, str(tmp_path / "f.mms"))
    call = "flagdata(vis={!r}, mode='rflag')"
    reply = execute(kernel, call.format(clean))
    assert reply.status == "ok", reply.error

    pattern = r"Writing flags to the MS"
    reply, rank = _faulty(kernel, str(casa_log_dir), call.format(faulty), pattern)
    assert reply.status == "ok", reply.error
    assert f"server rank {rank} on" in reply.stderr and "died of signal 9" in reply.stderr
    assert "restored the flags of" in reply.stderr, reply.stderr

    want = _columns(clean, ("FLAG", "FLAG_ROW"))
    got = _columns(faulty, ("FLAG", "FLAG_ROW"))
    assert want.keys() == got.keys()
    for sub in want:
        for col in ("FLAG", "FLAG_ROW"):
            assert np.array_equal(want[sub][col], got[sub][col]), f"{sub} {col} differs"
    assert sum(int(w["FLAG"].sum()) for w in want.values()) > 0
    _no_backups_left(faulty)
    _no_backups_left(clean)


def test_applycal_killed_mid_task_equals_fault_free(ngc5921, kernel, tmp_path, casa_log_dir):
    _, mms, gaintable = ngc5921
    clean, faulty = _copy(mms, str(tmp_path / "clean.mms")), _copy(mms, str(tmp_path / "f.mms"))
    call = "applycal(vis={!r}, gaintable=GT, gainfield=['', '0'], calwt=True)"
    call = call.replace("GT", repr(gaintable))
    reply = execute(kernel, call.format(clean))
    assert reply.status == "ok", reply.error

    reply, rank = _faulty(
        kernel, str(casa_log_dir), call.format(faulty), r"Begin Task: applycal", delay=0.05
    )
    assert reply.status == "ok", reply.error
    assert f"server rank {rank} on" in reply.stderr and "re-ran:" in reply.stderr

    cols = ("CORRECTED_DATA", "FLAG", "FLAG_ROW", "WEIGHT")
    want, got = _columns(clean, cols), _columns(faulty, cols)
    assert want.keys() == got.keys()
    for sub in want:
        for col in cols:
            assert np.array_equal(want[sub][col], got[sub][col]), f"{sub} {col} differs"
    _no_backups_left(faulty)
