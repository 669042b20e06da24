"""mtmfs with ``parallel=True``: casa-kernel and mpicasa against serial, product by product.

Not a speed benchmark: CASA's parallel continuum imager sums the servers' partial
grids in another order than serial, and the Taylor-term solve of mtmfs amplifies
that in the tt1 products. This measures how much, for casa-kernel (a real kernel,
3 servers) and for mpicasa (casampi 0.6.0 under ``mpiexec -n 3``) on the same MS
and call, and how far the two parallel runs are from each other. One simulated MS
(tests/test_imaging.py's: 8 antennas, 2 spw x 8 channels), 64x64, niter=60.

    python bench/imaging_mtmfs.py
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from common import BENCH, OUT, TESTS, casa_env, log, mpi_env, mpiexec_cmd

sys.path.insert(0, str(TESTS))

CALL = dict(
    imsize=64,
    cell="16arcsec",
    gridder="standard",
    threshold="0mJy",
    specmode="mfs",
    deconvolver="mtmfs",
    nterms=2,
    niter=60,
)
WARMUP = dict(imsize=32, cell="16arcsec", niter=0, specmode="mfs")


def _pixels(path: str):
    from casatools import image

    ia = image()
    ia.open(path)
    try:
        return ia.getchunk().astype(float)
    finally:
        ia.close()


def _mpicasa(root: Path) -> None:
    import mpicasa_env

    mpicasa_env.ensure()
    spec = {
        "repeats": 1,
        "reset": ["tclean", dict(WARMUP, vis="obs.ms", imagename="mw")],
        "steps": [["m", "tclean", dict(CALL, parallel=True, vis="obs.ms", imagename="m"), []]],
        "result": str(root / "mpicasa-result.json"),
    }
    (root / "spec.json").write_text(json.dumps(spec))
    env = mpi_env()
    env["PATH"] = str(mpicasa_env.VENV / "bin") + os.pathsep + env["PATH"]
    cmd = mpiexec_cmd(
        3,
        mpicasa_env.python(),
        str(BENCH / "mpicasa_script.py"),
        str(root / "spec.json"),
        mpiexec=mpicasa_env.mpiexec(),
    )
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    if not (root / "mpicasa-result.json").exists():
        raise RuntimeError(f"mpicasa failed (rc {out.returncode}): {out.stderr[-2000:]}")


def main() -> None:
    casa_env()
    from casa_kernel.casa.simulate import simulate_ms

    root = OUT / "imaging-mtmfs"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    simulate_ms(root / "obs.ms", nant=8, nchan=8, nint=40, nscans=2)
    os.chdir(root)

    from casatasks import tclean

    log("serial")
    tclean(vis="obs.ms", imagename="s", **CALL)

    from kernels import execute, kernel_env, running_kernel

    log("casa-kernel, 3 servers")
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="4"), cwd=str(root)) as (_km, kc):
        reply = execute(
            kc, f"tclean(vis='obs.ms', imagename='k', parallel=True, **{CALL!r})", timeout=900
        )
        assert reply.status == "ok", reply.error
    log("mpicasa, mpiexec -n 3")
    _mpicasa(root)

    peak = float(abs(_pixels("s.image.tt0")).max())
    source = abs(_pixels("s.image.tt0")) > 0.1 * peak
    print(f"\nserial .image.tt0 peak {peak:.4g}; max |diff| / that peak (alpha: absolute,")
    print("where tt0 > 10 % of peak)\n")
    print("| product | casa-kernel vs serial | mpicasa vs serial | casa-kernel vs mpicasa |")
    print("|---|---|---|---|")
    for path in sorted(glob.glob("s.*")):
        ext = path[1:]
        if not os.path.exists(f"k{ext}") or not os.path.exists(f"m{ext}"):
            continue
        s, k, m = (_pixels(f"{p}{ext}") for p in "skm")
        if ext.startswith(".alpha"):
            cells = [float(abs(a - b)[source].max()) for a, b in ((k, s), (m, s), (k, m))]
        else:
            cells = [float(abs(a - b).max()) / peak for a, b in ((k, s), (m, s), (k, m))]
        print(f"| {ext} | " + " | ".join(f"{c:.2e}" for c in cells) + " |")


if __name__ == "__main__":
    main()
