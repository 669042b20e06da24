"""A cube where gridding counts: casa-kernel vs mpicasa vs serial vs the N-process limit.

Issue 20: the speed figures so far were on small cubes where CASA's client-side
work (restore, primary beam, whole-image reads) was a third of the total. Here
the simulated MS has many visibilities per channel (27 antennas: 351 baselines,
``--nint`` integrations per spw) and the image is small, so gridding, which CASA's
C++ cube parallelism spreads over its workers, dominates; the gridders are
'standard' and 'wproject' (``--wprojplanes``: w-kernels make each visibility
cost more). tclean ``specmode='cube'``, ``niter=0`` (the psf, the dirty cube, the
pb and CASA's client work; no clean budget over the cube, so N processes imaging
1/N of the channels each is the same work: the N-process limit).

For each gridder, serial once, then for each N in ``--servers``:

- limit: N plain processes at once, each 1/N of the channels, cores/N OpenMP
  threads each (the best N workers can do on this box);
- casa-kernel: a real kernel with N servers (``CASA_KERNEL_NPROCS=N+1``): CASA's
  cube client (its own rank) and N workers; wall timed in the cell, CPU of the
  servers, the cube client and the kernel from /proc;
- mpicasa (``--mpicasa``): casampi's client under ``mpiexec -n N+1`` (client and
  N servers), in bench/.venv-mpicasa; CPU of every rank from /proc.

Serial runs with CASA's default OpenMP threads (every core: what a user's serial
CASA takes). Each parallel image is compared with serial's (max |diff| / peak over
image, psf, pb, sumwt). Peak memory (VmHWM) per server is reported. Where the
time goes: the CPU is split into the workers' (the gridding they are given) and
the rest (CASA's client: the cube's setup, gathering, pb, restoring; and the
kernel's dispatch), and the N-process limit shows what the channels cost alone.

    python bench/cube_gridding.py [--servers 2 3 4] [--gridders standard wproject] \
        [--mpicasa [--mpicasa-one-thread]] [--nint 240] [--nchan 16] [--wprojplanes 64]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    BENCH,
    MARK,
    OUT,
    PYTHON,
    TESTS,
    casa_env,
    cpu_seconds,
    fmt,
    loadavg,
    log,
    markdown_table,
    marked_lines,
    mpi_env,
    mpiexec_cmd,
    proc_status,
)

sys.path.insert(0, str(TESTS))

WARMUP = dict(imsize=32, cell="16arcsec", niter=0, spw="0", specmode="mfs")
PRODUCTS = ("image", "psf", "pb", "sumwt")


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _child(spec: dict[str, Any]) -> None:
    """One tclean in this process (after an untimed warm-up); prints wall and CPU."""
    from casatasks import tclean

    os.chdir(spec["cwd"])
    tclean(vis=spec["vis"], imagename=f"warm-{os.getpid()}", **WARMUP)
    for path in Path(".").glob(spec["name"] + ".*"):
        shutil.rmtree(path, ignore_errors=True)
    t0, c0 = time.time(), _cpu_self()
    tclean(vis=spec["vis"], imagename=spec["name"], **spec["params"])
    line = {"start": t0, "end": time.time(), "cpu": _cpu_self() - c0}
    print(MARK + json.dumps(line), flush=True)


def _processes(root: Path, specs: list[dict[str, Any]], threads: int) -> dict[str, float]:
    """Run these children at once; wall from the first start to the last end, CPU summed."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else dict(os.environ)
    procs = [
        subprocess.Popen(
            [PYTHON, __file__, "--child", json.dumps(dict(spec, cwd=str(root)))],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for spec in specs
    ]
    marks = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"a benchmark child failed (rc {proc.returncode})")
        marks += marked_lines(out)
    wall = max(m["end"] for m in marks) - min(m["start"] for m in marks)
    return {"wall": wall, "cpu": sum(m["cpu"] for m in marks)}


def _split(nchan: int, n: int) -> list[tuple[int, int]]:
    """(start, nchan) of n contiguous chunks of the channels."""
    edges = [round(i * nchan / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1] - edges[i]) for i in range(n)]


def _pixels(path: Path) -> Any:
    from casatools import image

    ia = image()
    ia.open(str(path))
    try:
        return ia.getchunk().astype(float)
    finally:
        ia.close()


def _max_rel_diff(root: Path, serial: str, other: str) -> float:
    import numpy as np

    worst = 0.0
    for ext in PRODUCTS:
        a, b = _pixels(root / f"{serial}.{ext}"), _pixels(root / f"{other}.{ext}")
        worst = max(worst, float(np.abs(a - b).max()) / max(float(np.abs(a).max()), 1e-12))
    return worst


def _kernel(root: Path, n: int, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The plain call in a real kernel with n servers (its cube client and n workers)."""
    from kernels import execute, kernel_env, kernel_pid, running_kernel

    with running_kernel(kernel_env(CASA_KERNEL_NPROCS=str(n + 1)), cwd=str(root)) as (km, kc):
        warm = execute(
            kc,
            "import time, shutil, glob, json\n"
            f"tclean(vis='obs.ms', imagename='kw', **{dict(WARMUP, specmode='cube')!r})",
            timeout=900,
        )
        assert warm.status == "ok", warm.error
        pids = execute(
            kc,
            "from casa_kernel.casampi.bridge import _cluster\n"
            "json.dumps({i.rank: i.pid for i in _cluster().servers.values()})",
        )
        ranks = {int(k): v for k, v in json.loads(ast.literal_eval(pids.result)).items()}
        everyone = [kernel_pid(km), *ranks.values()]
        workers = [pid for rank, pid in ranks.items() if rank >= 0]
        c0, w0 = cpu_seconds(everyone), cpu_seconds(workers)
        reply = execute(
            kc,
            f"[shutil.rmtree(p, True) for p in glob.glob('{name}.*')]\n"
            "t0 = time.perf_counter()\n"
            f"tclean(vis='obs.ms', imagename={name!r}, **{params!r})\n"
            "print('@@T', time.perf_counter() - t0)",
            timeout=3600,
        )
        assert reply.status == "ok", reply.error
        cpu, workers_cpu = cpu_seconds(everyone) - c0, cpu_seconds(workers) - w0
        peaks = {rank: proc_status(pid).get("VmHWM", float("nan")) for rank, pid in ranks.items()}
    wall = float(reply.stdout.split("@@T")[-1].split()[0])
    client = peaks.pop(-1, float("nan"))  # CASA's cube client (casa/role.py)
    return {
        "wall": wall,
        "cpu": cpu,
        "workers_cpu": workers_cpu,  # the rest: the cube client's and the kernel's
        "peak_mib": peaks,
        "client_peak_mib": client,
    }


def _mpicasa(
    root: Path, n: int, name: str, params: dict[str, Any], threads: int = 0
) -> dict[str, Any]:
    """The same call by casampi's client under ``mpiexec -n n+1`` (client + n servers);
    ``threads``: OMP_NUM_THREADS for every rank (0: CASA's default, every core)."""
    import mpicasa_env

    mpicasa_env.ensure()
    for path in root.glob(f"{name}.*"):
        shutil.rmtree(path, ignore_errors=True)
    result = root / f"{name}-result.json"
    spec = {
        "repeats": 1,
        "reset": ["tclean", dict(WARMUP, vis="obs.ms", imagename=f"{name}-warm")],
        "steps": [[name, "tclean", dict(params, vis="obs.ms", imagename=name), []]],
        "result": str(result),
    }
    spec_path = root / f"{name}-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = mpi_env()
    env["PATH"] = str(mpicasa_env.VENV / "bin") + os.pathsep + env["PATH"]
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    script = str(BENCH / "mpicasa_script.py")
    cmd = mpiexec_cmd(
        n + 1, mpicasa_env.python(), script, str(spec_path), mpiexec=mpicasa_env.mpiexec()
    )
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=3600)
    (OUT / f"{name}-mpicasa-output.txt").write_text(out.stdout + out.stderr)
    if not result.exists():
        raise RuntimeError(
            f"mpicasa failed (rc {out.returncode}): bench/out/{name}-mpicasa-output.txt"
        )
    res = json.loads(result.read_text())
    servers = res["memory_after"]["servers"]
    return {
        "wall": res["times"][name][0],
        "cpu": res["cpu"][name][0],
        "workers_cpu": res["cpu_servers"][name][0],  # the rest: casampi's client's
        "peak_mib": {r: s.get("VmHWM", float("nan")) for r, s in enumerate(servers)},
        "client_peak_mib": res["memory_after"]["client"].get("VmHWM", float("nan")),
    }


def _row(label: str, run: dict[str, Any], serial: dict[str, Any]) -> list[Any]:
    """A parallel run's table row: against serial, its images' difference, peaks."""
    return [
        label,
        run["wall"],
        run["cpu"],
        run["workers_cpu"],
        serial["wall"] / run["wall"],
        run["diff"],
        max(run["peak_mib"].values()),
        run["client_peak_mib"],
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--gridders", nargs="+", default=["standard", "wproject"])
    ap.add_argument("--nant", type=int, default=27)
    ap.add_argument("--nint", type=int, default=240, help="integrations per spw")
    ap.add_argument("--nchan", type=int, default=16)
    ap.add_argument("--imsize", type=int, default=128)
    ap.add_argument("--wprojplanes", type=int, default=64)
    ap.add_argument("--mpicasa", action="store_true", help="also casampi under mpiexec -n N+1")
    ap.add_argument(
        "--mpicasa-one-thread",
        action="store_true",
        help="with --mpicasa, also with OMP_NUM_THREADS=1 (each rank's share, as the kernel sets)",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return

    casa_env()
    from casa_kernel.casa.simulate import simulate_ms

    root = OUT / f"cube-gridding-{args.nant}-{args.nint}-{args.nchan}"
    if not (root / "obs.ms").is_dir():
        shutil.rmtree(root, ignore_errors=True)
        simulate_ms(root / "obs.ms", nant=args.nant, nchan=args.nchan, nint=args.nint, nscans=2)
    cores = len(os.sched_getaffinity(0))
    rows: list[list[Any]] = []
    record: dict[str, Any] = {"args": vars(args), "cores": cores, "runs": {}}
    for gridder in args.gridders:
        params: dict[str, Any] = dict(
            imsize=args.imsize, cell="8arcsec", specmode="cube", spw="0", niter=0, gridder=gridder
        )
        if gridder == "wproject":
            params["wprojplanes"] = args.wprojplanes
        log(f"{gridder}: serial (load {loadavg()[0]:.1f})")
        serial = _processes(root, [{"vis": "obs.ms", "name": f"s_{gridder}", "params": params}], 0)
        runs = record["runs"][gridder] = {"serial": serial}
        rows.append([f"{gridder}: serial", serial["wall"], serial["cpu"], "", "", "", "", ""])
        for n in args.servers:
            chunks = [
                {
                    "vis": "obs.ms",
                    "name": f"l{n}_{i}_{gridder}",
                    "params": dict(params, start=s, nchan=c),
                }
                for i, (s, c) in enumerate(_split(args.nchan, n))
            ]
            log(f"{gridder}: {n}-process limit")
            limit = _processes(root, chunks, max(1, cores // n))
            log(f"{gridder}: casa-kernel, {n} servers")
            kernel = _kernel(root, n, f"k{n}_{gridder}", params)
            kernel["diff"] = _max_rel_diff(root, f"s_{gridder}", f"k{n}_{gridder}")
            runs[f"limit {n}"], runs[f"kernel {n}"] = limit, kernel
            rows.append(
                [
                    f"{gridder}: {n}-process limit",
                    limit["wall"],
                    limit["cpu"],
                    limit["cpu"],
                    serial["wall"] / limit["wall"],
                    "",
                    "",
                    "",
                ]
            )
            rows.append(_row(f"{gridder}: casa-kernel, {n} servers", kernel, serial))
            if args.mpicasa:
                log(f"{gridder}: mpicasa -n {n + 1}")
                mpicasa = _mpicasa(root, n, f"m{n}_{gridder}", params)
                mpicasa["diff"] = _max_rel_diff(root, f"s_{gridder}", f"m{n}_{gridder}")
                runs[f"mpicasa {n}"] = mpicasa
                rows.append(_row(f"{gridder}: mpicasa -n {n + 1}", mpicasa, serial))
            if args.mpicasa and args.mpicasa_one_thread:
                log(f"{gridder}: mpicasa -n {n + 1}, OMP_NUM_THREADS=1")
                one = _mpicasa(root, n, f"m{n}t1_{gridder}", params, threads=1)
                one["diff"] = _max_rel_diff(root, f"s_{gridder}", f"m{n}t1_{gridder}")
                runs[f"mpicasa {n} one thread"] = one
                rows.append(_row(f"{gridder}: mpicasa -n {n + 1}, 1 thread", one, serial))
    print(
        f"\nMS: {args.nant} antennas, {args.nint} integrations x 2 spw x {args.nchan} ch; "
        f"cube {args.imsize}^2 niter=0; {cores} cores; load after: {loadavg()[0]:.1f}\n"
    )
    headers = [
        "run",
        "wall s",
        "CPU s",
        "of it, workers' CPU s",
        "speed-up vs serial",
        "max |diff|/peak",
        "peak MiB, servers' max",
        "peak MiB, cube client",
    ]
    print(
        markdown_table(headers, [[r[0], *(fmt(v) if v != "" else "" for v in r[1:])] for r in rows])
    )
    (OUT / "cube-gridding.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
