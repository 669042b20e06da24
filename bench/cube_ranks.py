"""CASA's C++ cube parallelism by itself: where a cube's time goes, per rank.

No kernel: the same cube (tclean specmode='cube', niter=0: gridding only, the
case where the 2-process limit is the same work) run, in turns, as

- serial: one plain process, 1 OpenMP thread;
- limit: two plain processes at once, each half of the channels (the best 2
  workers can do on this box);
- client+1, client+2: ``mpiexec -n 2`` / ``-n 3``, rank 0 CASA's cube client
  (casampi stand-in, as casa_kernel/casampi/cube.py does on the servers), the
  others ``synthesisimager().initmpi()``;
- the same with the launcher's SLEEP_WHEN_IDLE (waiting ranks sleep instead of
  polling: casa_kernel/config/mpiexec.py).

Prints wall time and CPU seconds (user+sys) of every rank: CPU a rank spends
waiting shows up as CPU the working ranks did not get.

    python bench/cube_ranks.py [--nchan 24] [--imsize 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import time
import types
from pathlib import Path
from typing import Any

from common import MARK, OUT, PYTHON, casa_env, log, markdown_table, marked_lines, med, mpi_env
from common import mpiexec_cmd as _mpiexec_cmd

WARMUP = dict(imsize=32, cell="16arcsec", niter=0, spw="0", specmode="mfs")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _report(name: str, t0: float, c0: float) -> None:
    line = {"name": name, "start": t0, "end": time.time(), "cpu": _cpu() - c0}
    print(MARK + json.dumps(line), flush=True)


def _clean(name: str) -> None:
    for p in Path(".").glob(f"{name}.*"):
        shutil.rmtree(p, ignore_errors=True)


def _serial(spec: dict[str, Any]) -> None:
    from casatasks import tclean

    tclean(vis=spec["cube"]["vis"], imagename=f"w{os.getpid()}", **WARMUP)
    _clean(spec["name"])
    t0, c0 = time.time(), _cpu()
    tclean(imagename=spec["name"], **spec["cube"])
    _report("rank 0", t0, c0)


def _mpi(spec: dict[str, Any]) -> None:
    from mpi4py import MPI  # first, as on the servers: casatools then uses its libmpi

    comm = MPI.COMM_WORLD
    from casatasks import tclean

    if comm.rank == 0:
        tclean(vis=spec["cube"]["vis"], imagename=f"w{os.getpid()}", **WARMUP)
    comm.Barrier()
    if comm.rank != 0:
        comm.bcast(None, root=0)
        from casatools import synthesisimager

        si = synthesisimager()
        t0, c0 = time.time(), _cpu()
        si.initmpi()  # until the client's releasempi()
        si.done()
        _report(f"rank {comm.rank}", t0, c0)
        return
    import casatasks.private.task_tclean as task

    class _Core:
        def pgc(self, command: str, block: bool = True) -> None:
            if "initmpi" in command:
                comm.bcast("go", root=0)

    class _Interface:
        _cluster = _Core()

        @staticmethod
        def getCluster() -> Any:
            return _Interface

    class _Environment:
        is_mpi_enabled = True
        is_mpi_client = True

    task.mpi_available = True
    task.MPIEnvironment = _Environment
    task.MPIInterface = types.SimpleNamespace(MPIInterface=_Interface)
    _clean(spec["name"])
    t0, c0 = time.time(), _cpu()
    tclean(imagename=spec["name"], **spec["cube"])
    _report("rank 0", t0, c0)


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> list[dict[str, Any]]:
    out = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=3600)
    marks = marked_lines(out.stdout)
    if out.returncode != 0 or not marks:
        raise RuntimeError(f"{' '.join(argv[:6])}... failed (rc {out.returncode}):\n{out.stderr}")
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nchan", type=int, default=24)
    ap.add_argument("--imsize", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mpi-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child or args.mpi_child:
        (_serial if args.child else _mpi)(json.loads(args.child or args.mpi_child))
        return

    casa_env()
    from casa_kernel.casa.simulate import simulate_ms
    from casa_kernel.config.mpiexec import SLEEP_WHEN_IDLE

    root = OUT / f"cube-ranks-{args.nchan}"
    if not (root / "obs.ms").is_dir():
        shutil.rmtree(root, ignore_errors=True)
        simulate_ms(root / "obs.ms", nant=12, nchan=args.nchan, nint=120, nscans=4)
    cube = dict(vis="obs.ms", imsize=args.imsize, cell="8arcsec", niter=0, specmode="cube", spw="0")
    base = mpi_env()
    base["OMP_NUM_THREADS"] = "1"  # a 2-core box's share (casampi/cube.py share_cores)
    for name in SLEEP_WHEN_IDLE:
        base.pop(name, None)
    sleeping = {**base, **SLEEP_WHEN_IDLE}

    def serial() -> list[dict[str, Any]]:
        spec = json.dumps({"name": "serial", "cube": cube})
        return _run([PYTHON, __file__, "--child", spec], base, root)

    def limit() -> list[dict[str, Any]]:
        half = args.nchan // 2
        procs = []
        for i, (start, n) in enumerate(((0, half), (half, args.nchan - half))):
            spec = json.dumps({"name": f"half{i}", "cube": dict(cube, start=start, nchan=n)})
            procs.append(
                subprocess.Popen(
                    [PYTHON, __file__, "--child", spec],
                    env=base,
                    cwd=root,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            )
        marks = []
        for i, p in enumerate(procs):
            for m in marked_lines(p.communicate()[0]):
                marks.append(dict(m, name=f"half {i}"))
        return marks

    def mpi(n: int, env: dict[str, str]) -> Any:
        def run() -> list[dict[str, Any]]:
            spec = json.dumps({"name": f"mpi{n}", "cube": cube})
            return _run(_mpiexec_cmd(n, PYTHON, __file__, "--mpi-child", spec), env, root)

        return run

    cases = {
        "serial": serial,
        "2-process limit": limit,
        "client+1 worker": mpi(2, base),
        "client+1 worker, sleep when idle": mpi(2, sleeping),
        "client+2 workers": mpi(3, base),
        "client+2 workers, sleep when idle": mpi(3, sleeping),
    }
    walls: dict[str, list[float]] = {k: [] for k in cases}
    cpus: dict[str, list[dict[str, float]]] = {k: [] for k in cases}
    loads: list[float] = []
    for r in range(args.repeat):
        for name, fn in cases.items():  # in turns: drift in the box's load hits all alike
            marks = fn()
            walls[name].append(max(m["end"] for m in marks) - min(m["start"] for m in marks))
            cpus[name].append({m["name"]: m["cpu"] for m in marks})
            loads.append(os.getloadavg()[0])
            log(f"repeat {r + 1} {name}: {walls[name][-1]:.1f} s, cpu {cpus[name][-1]}")

    rows = []
    for name in cases:
        ranks = sorted(cpus[name][0])
        per_rank = ", ".join(f"{k} {med([c.get(k, 0.0) for c in cpus[name]]):.1f}" for k in ranks)
        total = med([sum(c.values()) for c in cpus[name]])
        rows.append(
            [
                name,
                med(walls[name]),
                med(walls["serial"]) / med(walls[name]),
                med(walls["2-process limit"]) / med(walls[name]),
                total,
                per_rank,
            ]
        )
    print(
        f"\ncube {args.nchan} ch, {args.imsize}^2, niter=0; medians of {args.repeat}; "
        f"load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores\n"
    )
    print(
        markdown_table(
            ["run", "wall s", "vs serial", "vs limit", "CPU s (all ranks)", "CPU s per rank"],
            rows,
        )
    )
    (OUT / f"cube-ranks-{args.nchan}.json").write_text(
        json.dumps({"walls": walls, "cpus": cpus, "loads": loads}, indent=1)
    )


if __name__ == "__main__":
    main()
