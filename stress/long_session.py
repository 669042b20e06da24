"""Stress: a long session in one kernel stays flat.

Runs ``--cells`` ``%%casa_parallel`` cells and ``--tasks`` transparent task calls
(flagdata summary on a 4-sub-MS Multi-MS, through CASA's parallel helper and
the servers), interleaved, in ONE kernel with 2 servers. Samples RSS of the
kernel, the controller and each server, their open file descriptors, and the
latency of each cell. Compares the first 10 % of samples with the last 10 %
(means; medians for latencies): every figure must grow by less than ``--limit`` percent (5).

A warm-up (20 cells, 2 task calls: imports, caches) runs before measuring.
Exit status 1 if a figure grew beyond the limit or a cell failed.

    .venv/bin/python stress/long_session.py [--cells 2000] [--tasks 200]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from kernels import (  # noqa: E402
    cluster_processes,
    execute,
    kernel_env,
    kernel_pid,
    make_mms,
    running_kernel,
)

from casa_kernel.casa.config import apply_to_process, casa_environment  # noqa: E402

CELL = "%%casa_parallel\nimport numpy as np\nfloat(comm.allreduce(np.arange(1000).sum()))"


def _procs(kc, km) -> dict[str, psutil.Process]:
    pid = kernel_pid(km)
    procs = {"kernel": psutil.Process(pid)}
    for proc in cluster_processes(pid):
        try:
            if "ipyparallel.controller" in " ".join(proc.cmdline()):
                procs["controller"] = proc
        except psutil.Error:
            continue
    reply = execute(kc, "%%casa_parallel\nimport os\nos.getpid()")
    for rank, spid in enumerate(ast.literal_eval(reply.result)):
        procs[f"server {rank}"] = psutil.Process(spid)
    return procs


def _sample(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, proc in procs.items():
        with proc.oneshot():
            out[f"{name} RSS MiB"] = proc.memory_info().rss / 2**20
            out[f"{name} fds"] = proc.num_fds()
    return out


def _growth(values: list[float], center=statistics.mean) -> tuple[float, float, float]:
    k = max(1, len(values) // 10)
    first, last = center(values[:k]), center(values[-k:])
    return first, last, (last - first) / first * 100 if first else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--limit", type=float, default=5.0, help="allowed growth, percent")
    parser.add_argument("--dump", help="write the raw series (JSON) to this file")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="casa-kernel-long-")
    apply_to_process(casa_environment(os.path.join(work, "logs")))
    _ms, mms = make_mms(work, "s", nant=5, nchan=8, nint=16, nscans=2)
    task = f"flagdata(vis={mms!r}, mode='summary')['total']"

    failures = 0
    cell_ms: list[float] = []
    task_ms: list[float] = []
    samples: list[dict[str, float]] = []
    every = max(1, args.cells // max(1, args.tasks))  # one task call per `every` cells
    sample_every = max(1, args.cells // 200)
    started = time.monotonic()
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3"), cwd=work) as (km, kc):
        for _ in range(20):  # warm-up
            execute(kc, CELL)
        for _ in range(2):
            execute(kc, task)
        procs = _procs(kc, km)
        tasks_done = 0
        for i in range(args.cells):
            t0 = time.perf_counter()
            reply = execute(kc, CELL)
            cell_ms.append((time.perf_counter() - t0) * 1000)
            failures += reply.status != "ok"
            if i % every == every - 1 and tasks_done < args.tasks:
                t0 = time.perf_counter()
                reply = execute(kc, task)
                task_ms.append((time.perf_counter() - t0) * 1000)
                failures += reply.status != "ok"
                tasks_done += 1
            if i % sample_every == 0:
                samples.append(_sample(procs))
        samples.append(_sample(procs))
    took = time.monotonic() - started
    shutil.rmtree(work, ignore_errors=True)
    if args.dump:
        with open(args.dump, "w") as f:
            json.dump({"cell_ms": cell_ms, "task_ms": task_ms, "samples": samples}, f)

    # latencies: medians, so a burst of load from other processes is not a trend
    rows = [
        ("cell latency ms (median)", _growth(cell_ms, statistics.median)),
        ("task call ms (median)", _growth(task_ms, statistics.median)),
    ]
    rows += [(key, _growth([s[key] for s in samples])) for key in samples[0]]
    print(
        f"{args.cells} cells + {len(task_ms)} task calls in {took:.0f} s, "
        f"{failures} failed; first vs last 10 %:"
    )
    bad = failures > 0
    for name, (first, last, pct) in rows:
        # fds are small integers: one more fd is not a 5 % trend
        flat = pct < args.limit or ("fds" in name and last - first < 1)
        bad |= not flat
        print(
            f"  {name:24s} {first:9.1f} -> {last:9.1f}  {pct:+6.1f} %  {'ok' if flat else 'GREW'}"
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
