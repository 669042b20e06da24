"""Simulated VLA data, made offline with casatools, for demos and tests.

Point sources near the phase centre, a compact VLA-like Y array (local offsets
around the VLA's position), two spectral windows of 1 MHz channels with the four
circular correlations, ``nscans`` scans each observing both spws, no
autocorrelations, 0.05 Jy of thermal noise.  The Measurement Set has
``nant * (nant - 1) / 2 * nint * 2`` rows; with ``nscans >= 2`` it has at least four
(scan, spw) pairs, so ``partition(createmms=True, numsubms=4,
separationaxis='auto')`` gives four sub-MSs.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace

from casa_kernel.casa import loading

__all__ = ["SIZES", "Preset", "expected_rows", "simulate_ms"]

SPW_COUNT = 2
INTEGRATION_S = 10
SCAN_GAP_S = 30  # slew/setup time between scans, as in a real schedule
ANTENNA_PREFIX = "ea"  # VLA names: ea01, ea02, ...


@dataclass(frozen=True)
class Preset:
    """Shape of a simulated MS: antennas, channels per spw, integrations per spw, scans."""

    nant: int
    nchan: int
    nint: int
    nscans: int


# Sizes and times measured with casatools 6.7.0.31 on a 2-core machine (disk use is
# ~100-145 bytes per row and channel: DATA, MODEL_DATA, CORRECTED_DATA, FLAG, ...).
SIZES: dict[str, Preset] = {
    # Smallest that still gives four (scan, spw) pairs: 96 rows, 0.7 MB, ~0.15 s.
    "tiny": Preset(nant=4, nchan=4, nint=8, nscans=2),
    # 9000 rows, 55 MB, ~1 s.
    "small": Preset(nant=10, nchan=64, nint=100, nscans=4),
    # 15840 rows, ~300 MB, ~5 s.
    "medium": Preset(nant=12, nchan=128, nint=120, nscans=6),
    # 48000 rows, 890 MB, ~7 s.
    "large": Preset(nant=16, nchan=128, nint=200, nscans=8),
}

# J2000 RA, Dec (deg) of 19h59m28.5s +40d44m01.5s: high in the VLA's sky at
# transit (latitude +34), so no elevation limit drops integrations.
PHASE_CENTRE_DEG = (299.86875, 40.73375)
# (flux in Jy, RA offset in arcsec, Dec offset in arcsec)
SOURCES = ((1.0, 0.0, 0.0), (0.5, 40.0, 25.0), (0.2, -60.0, -35.0))
FIRST_FREQ_HZ = 1.4e9
CHANNEL_WIDTH_HZ = 1e6
REFERENCE_TIME = "2024/01/01/00:00:00"


def expected_rows(nant: int, nint: int, nspw: int = SPW_COUNT) -> int:
    """Rows of a simulated MS: cross-correlations only, every integration, every spw."""
    return nant * (nant - 1) // 2 * nint * nspw


def _antenna_offsets(nant: int) -> tuple[list[float], list[float], list[float]]:
    """East, north, up offsets (m) of a VLA-like Y: arms at 5, 125 and 245 degrees.

    Stations along each arm follow the VLA's power law (r ~ n**1.716), here at the
    scale of the D configuration; the closest pair is ~70 m apart, so 25 m dishes
    are never shadowed near transit.
    """
    east: list[float] = []
    north: list[float] = []
    for i in range(nant):
        azimuth = math.radians(5.0 + 120.0 * (i % 3))
        radius = 40.0 * (i // 3 + 1) ** 1.716
        east.append(radius * math.sin(azimuth))
        north.append(radius * math.cos(azimuth))
    return east, north, [0.0] * nant


def _scan_lengths(nint: int, nscans: int) -> list[int]:
    """Integrations per scan: ``nint`` spread as evenly as possible."""
    base, extra = divmod(nint, nscans)
    return [base + (1 if k < extra else 0) for k in range(nscans)]


def _check(ok: object, what: str) -> None:
    # casatools methods report many failures by returning False, not by raising.
    if ok is False:
        raise RuntimeError(f"casatools {what} failed (see the CASA log)")


def _source_direction(ra_offset_arcsec: float, dec_offset_arcsec: float) -> str:
    """J2000 direction string of a source offset from the phase centre."""
    dec = PHASE_CENTRE_DEG[1] + dec_offset_arcsec / 3600.0
    ra = PHASE_CENTRE_DEG[0] + ra_offset_arcsec / 3600.0 / math.cos(math.radians(dec))
    return f"J2000 {ra:.8f}deg {dec:.8f}deg"


_tool_logs_routed = False


def _log_to_casa_logfile() -> None:
    """Send the tools' messages to CASA's log file, as ``import casatasks`` does.

    Until casatasks makes its ``casalog`` the global sink, messages of casatools'
    C++ tools go to stderr only, INFO included: a simulation would print dozens of
    lines into the notebook (ipykernel forwards fd 2) and none into the log file.
    Done at most once per process: a second ``setglobal(True)`` on the same sink
    crashes the process (segmentation fault, casatools 6.7.0.31).  casatasks
    imported later makes its own sink global, which is safe.
    """
    global _tool_logs_routed
    import sys

    import casatools

    logger = getattr(casatools, "logger", None)  # the logsink on config.logfile
    if _tool_logs_routed or "casatasks" in sys.modules or logger is None:
        return
    logger.setglobal(True)
    _tool_logs_routed = True


def _simulate(ms_path: str, cl_path: str, p: Preset, seed: int) -> None:
    """Write the MS at ``ms_path`` (and its component list at ``cl_path``)."""
    import casatools

    _log_to_casa_logfile()
    cl = casatools.componentlist()
    try:
        for flux, dra, ddec in SOURCES:
            _check(
                cl.addcomponent(
                    flux=flux,
                    fluxunit="Jy",
                    shape="point",
                    dir=_source_direction(dra, ddec),
                    freq=f"{FIRST_FREQ_HZ}Hz",
                ),
                "componentlist.addcomponent",
            )
        _check(cl.rename(cl_path, log=False), "componentlist.rename")
    finally:
        # close(log=False): the default posts a WARN "componentlist closed".
        cl.close(log=False)
        cl.done()

    sm = casatools.simulator()
    me = casatools.measures()
    try:
        _check(sm.open(ms_path), "simulator.open")
        east, north, up = _antenna_offsets(p.nant)
        _check(
            sm.setconfig(
                telescopename="VLA",
                x=east,
                y=north,
                z=up,
                dishdiameter=[25.0] * p.nant,
                mount=["alt-az"] * p.nant,
                antname=[f"{ANTENNA_PREFIX}{i + 1:02d}" for i in range(p.nant)],
                padname=[f"P{i + 1:02d}" for i in range(p.nant)],
                coordsystem="local",
                referencelocation=me.observatory("VLA"),
            ),
            "simulator.setconfig",
        )
        for spw in range(SPW_COUNT):
            # Contiguous spws: spw k starts where spw k-1 ends.
            start_hz = FIRST_FREQ_HZ + spw * p.nchan * CHANNEL_WIDTH_HZ
            _check(
                sm.setspwindow(
                    spwname=f"spw{spw}",
                    freq=f"{start_hz}Hz",
                    deltafreq=f"{CHANNEL_WIDTH_HZ}Hz",
                    freqresolution=f"{CHANNEL_WIDTH_HZ}Hz",
                    nchannels=p.nchan,
                    stokes="RR RL LR LL",
                ),
                "simulator.setspwindow",
            )
        _check(sm.setfeed(mode="perfect R L"), "simulator.setfeed")
        _check(
            sm.setfield(
                sourcename="target",
                sourcedirection=me.direction(
                    "J2000", f"{PHASE_CENTRE_DEG[0]}deg", f"{PHASE_CENTRE_DEG[1]}deg"
                ),
            ),
            "simulator.setfield",
        )
        _check(sm.setlimits(shadowlimit=0.001, elevationlimit="8deg"), "simulator.setlimits")
        _check(sm.setauto(autocorrwt=0.0), "simulator.setauto")
        _check(
            sm.settimes(
                integrationtime=f"{INTEGRATION_S}s",
                usehourangle=True,
                referencetime=me.epoch("UTC", REFERENCE_TIME),
            ),
            "simulator.settimes",
        )
        start = 0
        for length in _scan_lengths(p.nint, p.nscans):
            stop = start + length * INTEGRATION_S
            for spw in range(SPW_COUNT):
                _check(
                    sm.observe(
                        sourcename="target",
                        spwname=f"spw{spw}",
                        starttime=f"{start}s",
                        stoptime=f"{stop}s",
                    ),
                    "simulator.observe",
                )
            start = stop + SCAN_GAP_S
        _check(sm.predict(complist=cl_path), "simulator.predict")
        _check(sm.setseed(seed), "simulator.setseed")
        _check(sm.setnoise(mode="simplenoise", simplenoise="0.05Jy"), "simulator.setnoise")
        _check(sm.corrupt(), "simulator.corrupt")
    finally:
        sm.done()
        me.done()

    _renumber_scans(ms_path)


def _renumber_scans(ms_path: str) -> None:
    """One scan number per time window, shared by both spws, as a real VLA scan.

    The simulator starts a new scan at every ``observe`` call, i.e. per spw.
    """
    import casatools

    tb = casatools.table()
    try:
        _check(tb.open(ms_path, nomodify=False), "table.open")
        scans = tb.getcol("SCAN_NUMBER")
        tb.putcol("SCAN_NUMBER", (scans - 1) // SPW_COUNT + 1)
    finally:
        tb.close()
        tb.done()


def _count_rows(ms_path: str) -> int:
    import casatools

    ms = casatools.ms()
    try:
        _check(ms.open(ms_path), "ms.open")
        return int(ms.nrow())
    finally:
        ms.close()
        ms.done()


def simulate_ms(
    path: str | os.PathLike[str],
    *,
    size: str = "small",
    nant: int | None = None,
    nchan: int | None = None,
    nint: int | None = None,
    nscans: int | None = None,
    seed: int = 42,
) -> str:
    """Simulate a VLA Measurement Set at ``path``; return its absolute path.

    ``size`` is one of ``"tiny"`` (96 rows, < 1 MB), ``"small"`` (9000 rows, ~55 MB),
    ``"medium"`` (~300 MB) or ``"large"`` (~0.9 GB); ``nant`` (antennas, 2-27),
    ``nchan`` (channels per spw), ``nint`` (10 s integrations per spw, over all
    scans) and ``nscans`` override the preset.  Rows: ``nant*(nant-1)/2 * nint * 2``.
    ``seed`` seeds the noise, so equal arguments give equal data.

    Refuses to overwrite: raises ``FileExistsError`` if ``path`` exists.  The MS is
    built under a hidden temporary name in the same folder and renamed at the end,
    so an interrupted or failed simulation leaves nothing that looks like an MS.
    The parent folder is created if missing.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, not {size!r}")
    preset = SIZES[size]
    overrides = {"nant": nant, "nchan": nchan, "nint": nint, "nscans": nscans}
    preset = replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    if not 2 <= preset.nant <= 27:
        raise ValueError(f"nant must be between 2 and 27 (the VLA), not {preset.nant}")
    if preset.nchan < 1 or preset.nscans < 1:
        raise ValueError("nchan and nscans must be at least 1")
    if preset.nint < preset.nscans:
        raise ValueError(f"nint ({preset.nint}) must be at least nscans ({preset.nscans})")

    target = os.path.abspath(os.fspath(path))
    if os.path.lexists(target):
        raise FileExistsError(f"refusing to overwrite existing path: {target}")
    loading.wait_if_loading()  # casatools beside CASA's import in another thread: a crash
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)

    # Same folder, hence same file system: the final rename is atomic.
    workdir = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        ms_path = os.path.join(workdir, name)
        _simulate(ms_path, os.path.join(workdir, "sources.cl"), preset, seed)
        rows = _count_rows(ms_path)
        want = expected_rows(preset.nant, preset.nint)
        if rows != want:
            raise RuntimeError(f"simulated MS has {rows} rows, expected {want}")
        if os.path.lexists(target):  # appeared while we were simulating
            raise FileExistsError(f"refusing to overwrite existing path: {target}")
        os.rename(ms_path, target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return target
