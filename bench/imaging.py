"""Imaging: tclean from the kernel with 2 servers vs serial, vs the 2-process limit.

One run, one simulated MS (12 antennas, 2 spw x NCHAN channels), the same calls:

- serial: a plain process runs tclean (mfs over both spws; cube over spw 0);
- limit (cube): two plain concurrent processes each image half of the cube's
  channels (tclean with ``start``/``nchan``); the wall time from the first start
  to the last end is the best 2 servers can do on this box;
- casa-kernel: a real kernel (``--servers``, default 2; cubes go to CASA's C++
  path from 3 servers on) runs the plain call (``parallel=True``
  for mfs; cubes go parallel by themselves); timed inside the cell;
- mpicasa (``--mpicasa``): casampi under ``mpiexec -n 3`` in bench/.venv-mpicasa.

Every process imports CASA and images a tiny warm-up first, untimed. Each
product of the kernel's images is compared with serial's (max |diff| / peak).

    python bench/imaging.py [--nchan 24] [--imsize 256] [--niter 200] [--mpicasa]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import MARK, OUT, PYTHON, TESTS, casa_env, fmt, log, markdown_table, marked_lines

sys.path.insert(0, str(TESTS))

# a process's peak resident memory (VmHWM) in MiB, as an expression for a cell
PEAK_EXPR = (
    "[int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]"
)
WARMUP = dict(imsize=32, cell="16arcsec", niter=0, spw="0", specmode="mfs")


def _child(spec: dict[str, Any]) -> None:
    """Run tclean calls of SPEC serially in this process; print their timings."""
    from casatasks import tclean

    os.chdir(spec["cwd"])
    tclean(vis=spec["vis"], imagename=f"warm-{os.getpid()}", **WARMUP)
    for name, params in spec["calls"]:
        for path in glob.glob(name + ".*"):  # else tclean restarts from them
            shutil.rmtree(path, ignore_errors=True)
        t0 = time.time()
        tclean(vis=spec["vis"], imagename=name, **params)
        print(MARK + json.dumps({"name": name, "start": t0, "end": time.time()}), flush=True)
    print(MARK + json.dumps({"name": "peak_mib", "value": _peak_mib()}), flush=True)


def _peak_mib() -> float:
    """This process's peak resident memory (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _spawn(spec: dict[str, Any], threads: int | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if threads:  # the limit's processes share the cores as the servers do
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen(
        [PYTHON, __file__, "--child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def _finish(proc: subprocess.Popen) -> list[dict[str, Any]]:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed (rc {proc.returncode})")
    return marked_lines(out)


def _pixels(path: str) -> Any:
    from casatools import image

    ia = image()
    ia.open(path)
    try:
        return ia.getchunk().astype(float)
    finally:
        ia.close()


def _max_rel_diff(root: Path, serial: str, other: str) -> float:
    import numpy as np

    worst = 0.0
    peak = float(np.abs(_pixels(str(root / f"{serial}.image"))).max())
    for ext in ("image", "residual", "model", "psf", "pb"):
        a, b = _pixels(str(root / f"{serial}.{ext}")), _pixels(str(root / f"{other}.{ext}"))
        scale = peak if ext in ("residual", "model") else float(np.abs(a).max())
        worst = max(worst, float(np.abs(a - b).max()) / max(scale, 1e-12))
    return worst


def _mpicasa(root: Path, calls: dict[str, Any]) -> dict[str, list[float]]:
    """The same tclean calls by casampi's client under ``mpiexec -n 3``."""
    import mpicasa_env
    from common import BENCH, mpi_env, mpiexec_cmd

    mpicasa_env.ensure()
    for name in calls:
        for p in root.glob(f"{name}.*"):
            shutil.rmtree(p, ignore_errors=True)
    result = root / "mpicasa-result.json"
    spec = {
        "repeats": 1,  # its script cleans only after a repeat: a 2nd would restart
        "reset": ["tclean", dict(WARMUP, vis="obs.ms", imagename="mw")],
        "steps": [[n, "tclean", dict(c, vis="obs.ms", imagename=n), []] for n, c in calls.items()],
        "result": str(result),
    }
    spec_path = root / "mpicasa-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = mpi_env()
    env["PATH"] = str(mpicasa_env.VENV / "bin") + os.pathsep + env["PATH"]
    cmd = mpiexec_cmd(
        3,
        mpicasa_env.python(),
        str(BENCH / "mpicasa_script.py"),
        str(spec_path),
        mpiexec=mpicasa_env.mpiexec(),
    )
    log("mpicasa:", " ".join(cmd))
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    (OUT / "imaging-mpicasa-output.txt").write_text(out.stdout + out.stderr)
    if not result.exists():
        raise RuntimeError(
            f"mpicasa failed (rc {out.returncode}): bench/out/imaging-mpicasa-output.txt"
        )
    res = json.loads(result.read_text())
    return res["times"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nchan", type=int, default=24)
    ap.add_argument("--imsize", type=int, default=256)
    ap.add_argument("--niter", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--mpicasa", action="store_true", help="also casampi under mpiexec -n 3")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return

    casa_env()
    from casa_kernel.casa.simulate import simulate_ms

    root = OUT / f"imaging-{args.nchan}"
    vis = root / "obs.ms"
    if not vis.is_dir():
        shutil.rmtree(root, ignore_errors=True)
        simulate_ms(vis, nant=12, nchan=args.nchan, nint=120, nscans=4)
    for p in root.iterdir():
        if p.name != "obs.ms":
            shutil.rmtree(p, ignore_errors=True)
    image = dict(imsize=args.imsize, cell="8arcsec", niter=args.niter, threshold="0mJy")
    mfs = dict(image, specmode="mfs")
    cube = dict(image, specmode="cube", spw="0")
    # gridding only: the one case where channel chunks are the same work as the
    # whole cube (niter is a budget over the whole cube), so the limit is fair
    cube0 = dict(cube, niter=0)
    half = args.nchan // 2
    times: dict[str, list[float]] = {}
    memory: dict[str, Any] = {}

    for r in range(args.repeat):
        log(f"repeat {r + 1}: serial mfs + cube")
        spec = {
            "cwd": str(root),
            "vis": "obs.ms",
            "calls": [("s_mfs", mfs), ("s_cube", cube), ("s_cube0", cube0)],
        }
        for m in _finish(_spawn(spec)):
            if m["name"] == "peak_mib":
                memory["serial process"] = m["value"]
                continue
            times.setdefault(m["name"], []).append(m["end"] - m["start"])
        log("2-process limit: two halves of the cube at once")
        procs = [
            _spawn(
                {"cwd": str(root), "vis": "obs.ms", "calls": [(f"l{i}", c)]},
                threads=max(1, (os.cpu_count() or 2) // 2),
            )
            for i, c in enumerate(
                [dict(cube0, start=0, nchan=half), dict(cube0, start=half, nchan=args.nchan - half)]
            )
        ]
        marks = [m for p in procs for m in _finish(p) if m["name"] != "peak_mib"]
        limit = max(m["end"] for m in marks) - min(m["start"] for m in marks)
        times.setdefault("limit_cube0", []).append(limit)

    from kernels import execute, kernel_env, running_kernel

    log(f"casa-kernel: {args.servers} servers")
    kenv = kernel_env(CASA_KERNEL_NPROCS=str(args.servers + 1))
    with running_kernel(kenv, cwd=str(root)) as (_km, kc):
        warm = execute(
            kc,
            "import time, shutil\n"
            f"tclean(vis='obs.ms', imagename='kw1', parallel=True, **{WARMUP!r})\n"
            f"tclean(vis='obs.ms', imagename='kw2', **{dict(WARMUP, specmode='cube')!r})",
            timeout=600,
        )
        assert warm.status == "ok", warm.error
        for _ in range(args.repeat):
            for name, params in (
                ("k_mfs", dict(mfs, parallel=True)),
                ("k_cube", cube),
                ("k_cube0", cube0),
            ):
                reply = execute(
                    kc,
                    f"[shutil.rmtree(p, True) for p in __import__('glob').glob('{name}.*')]\n"
                    "t0 = time.perf_counter()\n"
                    f"tclean(vis='obs.ms', imagename={name!r}, **{params!r})\n"
                    "print('@@T', time.perf_counter() - t0)",
                    timeout=1200,
                )
                assert reply.status == "ok", reply.error
                t = float(reply.stdout.split("@@T")[-1].split()[0])
                times.setdefault(name, []).append(t)
                log(f"{name}: {t:.1f} s")
        peaks = execute(
            kc,
            "%%casa_parallel\n" + PEAK_EXPR,
        )
        assert peaks.status == "ok", peaks.error
        memory["servers"] = json.loads(peaks.result)
        kpeak = execute(kc, PEAK_EXPR)
        memory["kernel"] = float(kpeak.result)

    if args.mpicasa:
        calls = {"m_mfs": dict(mfs, parallel=True), "m_cube": cube, "m_cube0": cube0}
        for name, values in _mpicasa(root, calls).items():
            times[name] = values

    extra_rows: list[list[Any]] = []
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    diffs = {k: _max_rel_diff(root, f"s_{k}", f"k_{k}") for k in ("mfs", "cube", "cube0")}
    if args.mpicasa:
        for k in ("mfs", "cube", "cube0"):
            diffs[f"m_{k}"] = _max_rel_diff(root, f"s_{k}", f"m_{k}")
            rows_m = [f"{k} mpicasa", med[f"m_{k}"], med[f"s_{k}"] / med[f"m_{k}"], diffs[f"m_{k}"]]
            extra_rows.append(rows_m)
    rows = [
        ["mfs serial", med["s_mfs"], "", ""],
        ["mfs casa-kernel parallel=True", med["k_mfs"], med["s_mfs"] / med["k_mfs"], diffs["mfs"]],
        [f"cube niter={args.niter} serial", med["s_cube"], "", ""],
        [
            f"cube niter={args.niter} casa-kernel",
            med["k_cube"],
            med["s_cube"] / med["k_cube"],
            diffs["cube"],
        ],
        ["cube niter=0 serial", med["s_cube0"], "", ""],
        [
            "cube niter=0 2-process limit",
            med["limit_cube0"],
            med["s_cube0"] / med["limit_cube0"],
            "",
        ],
        [
            "cube niter=0 casa-kernel",
            med["k_cube0"],
            med["s_cube0"] / med["k_cube0"],
            diffs["cube0"],
        ],
    ]
    print(
        f"\nMS: 12 antennas, 2 spw x {args.nchan} ch; image {args.imsize}^2, niter "
        f"{args.niter}; medians of {args.repeat}\n"
    )
    print(
        markdown_table(
            ["call", "wall s", "speed-up vs serial", "max |diff|/peak"], rows + extra_rows
        )
    )
    if args.mpicasa:
        for k in ("mfs", "cube", "cube0"):
            print(f"{k}: casa-kernel / mpicasa time = {fmt(med[f'k_{k}'] / med[f'm_{k}'])}")
    print(
        f"\ncube (niter=0) casa-kernel vs 2-process limit: "
        f"{fmt(med['limit_cube0'] / med['k_cube0'])} (target >= 0.90); "
        f"mfs parallel vs serial: {fmt(med['s_mfs'] / med['k_mfs'])}x (target >= 1.5)"
    )
    print(f"peak memory (VmHWM, MiB): {json.dumps({k: v for k, v in memory.items()})}")
    (OUT / "imaging.json").write_text(
        json.dumps({"times": times, "diffs": diffs, "memory": memory}, indent=1)
    )


if __name__ == "__main__":
    main()
