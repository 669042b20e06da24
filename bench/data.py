"""The P1 data: a simulated MS, its 4-sub-MS Multi-MS and a serial gaincal table.

Made once per size under bench/out/data-<size>/ (gitignored) and reused by later
runs; a marker file records how it was made, so a changed recipe remakes it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass

from common import OUT, log

# "a few hundred MB partitioned into 4 sub-MSs" (full run); --quick uses "small".
SIZES = {"full": "medium", "quick": "small"}
RECIPE = 3  # bump when the recipe below changes


@dataclass
class Data:
    size: str
    root: str
    ms: str  # pristine copy; serial work happens on serial.ms
    serial_ms: str
    mms: str
    submms: list[str]
    caltable: str
    ms_bytes: int
    mms_bytes: int
    rows: int
    make_seconds: dict[str, float]


def _du(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total


def prepare(size: str) -> Data:
    """Simulate + partition + gaincal (cached)."""
    root = OUT / f"data-{size}"
    marker = root / "data.json"
    if marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("recipe") == RECIPE and all(
            os.path.isdir(p) for p in (saved["ms"], saved["mms"], saved["caltable"])
        ):
            saved.pop("recipe")
            return Data(**saved)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    from casatasks import gaincal, partition
    from casatools import ms as mstool

    from casa_kernel.casa.simulate import simulate_ms

    seconds = {}
    t0 = time.perf_counter()
    ms = simulate_ms(root / "orig.ms", size=size)
    seconds["simulate"] = time.perf_counter() - t0
    log(f"simulated {size} MS in {seconds['simulate']:.1f} s")

    t0 = time.perf_counter()
    caltable = str(root / "orig.G")
    # A serial gaincal on the untouched MS: one amplitude+phase solution per scan.
    gaincal(vis=ms, caltable=caltable, solint="inf", refant="ea01", gaintype="G", calmode="ap")
    seconds["gaincal"] = time.perf_counter() - t0
    if not os.path.isdir(caltable):
        raise RuntimeError("gaincal made no table")

    t0 = time.perf_counter()
    mms = str(root / "work.mms")
    partition(
        vis=ms, outputvis=mms, createmms=True, separationaxis="auto", numsubms=4, flagbackup=False
    )
    seconds["partition"] = time.perf_counter() - t0
    tool = mstool()
    tool.open(mms)
    submms = [os.path.abspath(p) for p in tool.getreferencedtables()]
    tool.close()
    tool.open(ms)
    rows = int(tool.nrow())
    tool.close()
    tool.done()
    if len(submms) != 4:
        raise RuntimeError(f"partition made {len(submms)} sub-MSs, not 4")

    serial_ms = str(root / "serial.ms")
    shutil.copytree(ms, serial_ms, symlinks=True)
    data = Data(
        size=size,
        root=str(root),
        ms=ms,
        serial_ms=serial_ms,
        mms=mms,
        submms=submms,
        caltable=caltable,
        ms_bytes=_du(ms),
        mms_bytes=_du(mms),
        rows=rows,
        make_seconds=seconds,
    )
    marker.write_text(json.dumps({**asdict(data), "recipe": RECIPE}, indent=1))
    log(f"data ready: {data.ms_bytes / 1e6:.0f} MB MS, {rows} rows, 4 sub-MSs")
    return data
