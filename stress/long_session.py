"""Stress: a long session in one kernel stays flat.

Runs ``--cells`` ``%%casa_parallel`` cells and ``--tasks`` transparent task calls
(flagdata summary on a 4-sub-MS Multi-MS, through CASA's parallel helper and
the servers), interleaved, in ONE kernel with 2 servers. Samples RSS of the
kernel, the controller and each server, their open file descriptors, and the
latency of each cell. Compares the first 10 % of samples with the last 10 %
(means; medians for latencies): every figure must grow by less than ``--limit`` percent (5).

A warm-up (20 cells, CASA imported on every process, 2 task calls) runs before
measuring.

Latency on a shared machine follows the machine's load more than the session's
age: the first and last 10 % are a minute apart, and the load of other work
changes in a minute. So the session's latency is also compared with a FRESH
kernel's (same warm-up, then 100 cells), measured interleaved at the end --
aged cell, fresh cell, aged cell... -- so both see the same load
(``--reference`` cells, one task call per 10; 0 skips it). With a reference, the
latency verdict is aged vs fresh; memory and fds are always first vs last.
Exit status 1 if a figure grew beyond the limit or a cell failed.

    .venv/bin/python stress/long_session.py [--cells 2000] [--tasks 200] [--reference 400]
    .venv/bin/python stress/long_session.py --quick     # 300 cells, 30 task calls
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


def _warm_up(kc, task: str) -> None:
    """Imports and caches done before anything is measured (CASA on every process:
    the kernel's and the servers' background imports would otherwise share the
    CPU with the first cells)."""
    for _ in range(20):
        execute(kc, CELL)
    execute(kc, "import casatasks")
    execute(kc, "%%casa_parallel\nimport casatasks")
    for _ in range(2):
        execute(kc, task)


def _timed(kc, code: str) -> tuple[float, bool]:
    t0 = time.perf_counter()
    reply = execute(kc, code)
    return (time.perf_counter() - t0) * 1000, reply.status == "ok"


def _aged_vs_fresh(kc_aged, kc_fresh, task: str, n: int) -> dict[str, list[float]]:
    """Cells (and one task call per 10) alternating between the two kernels, the
    order flipped every round, so load from other work falls on both alike."""
    series: dict[str, list[float]] = {
        "aged cell": [],
        "fresh cell": [],
        "aged task": [],
        "fresh task": [],
    }
    failed = 0
    for i in range(n):
        pair = [("aged", kc_aged), ("fresh", kc_fresh)]
        if i % 2:
            pair.reverse()
        for name, kc in pair:
            ms, ok = _timed(kc, CELL)
            series[f"{name} cell"].append(ms)
            failed += not ok
        if i % 10 == 9:
            for name, kc in pair:
                ms, ok = _timed(kc, task)
                series[f"{name} task"].append(ms)
                failed += not ok
    series["failed"] = [failed]
    return series


def _growth(values: list[float], center=statistics.mean) -> tuple[float, float, float]:
    k = max(1, len(values) // 10)
    first, last = center(values[:k]), center(values[-k:])
    return first, last, (last - first) / first * 100 if first else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--limit", type=float, default=5.0, help="allowed growth, percent")
    parser.add_argument(
        "--reference",
        type=int,
        default=400,
        help="cells run interleaved with a fresh kernel at the end (0: none)",
    )
    parser.add_argument("--quick", action="store_true", help="300 cells, 30 task calls")
    parser.add_argument("--dump", help="write the raw series (JSON) to this file")
    args = parser.parse_args()
    if args.quick:
        args.cells, args.tasks, args.reference = 300, 30, min(args.reference, 200)
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
    load_before = os.getloadavg()[0]
    reference: dict[str, list[float]] = {}
    env = kernel_env(CASA_KERNEL_NPROCS="3")
    with running_kernel(env, cwd=work) as (km, kc):
        _warm_up(kc, task)
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
        load_after = os.getloadavg()[0]
        if args.reference > 0:
            with running_kernel(env, cwd=work) as (_km2, kc_fresh):
                _warm_up(kc_fresh, task)
                for _ in range(100):
                    execute(kc_fresh, CELL)
                reference = _aged_vs_fresh(kc, kc_fresh, task, args.reference)
            failures += int(reference.pop("failed")[0])
    shutil.rmtree(work, ignore_errors=True)
    if args.dump:
        with open(args.dump, "w") as f:
            json.dump({"cell_ms": cell_ms, "task_ms": task_ms, "samples": samples, **reference}, f)

    # latencies: medians, so a burst of load from other processes is not a trend
    latency = [
        ("cell latency ms (median)", _growth(cell_ms, statistics.median)),
        ("task call ms (median)", _growth(task_ms, statistics.median)),
    ]
    rows = [(key, _growth([s[key] for s in samples])) for key in samples[0]]
    print(
        f"{args.cells} cells + {len(task_ms)} task calls in {took:.0f} s, {failures} failed; "
        f"load average {load_before:.1f} at the start, {load_after:.1f} at the end "
        f"({os.cpu_count()} cores)"
    )
    bad = failures > 0
    print("first vs last 10 %" + (" (latency: load, judged below)" if reference else "") + ":")
    for name, (first, last, pct) in latency + rows:
        # fds are small integers: one more fd is not a 5 % trend
        flat = pct < args.limit or ("fds" in name and last - first < 1)
        judged = not (reference and "ms (median)" in name)
        bad |= judged and not flat
        _row(name, first, last, pct, ("ok" if flat else "GREW") if judged else "-")
    if reference:
        n_cells, n_tasks = len(reference["aged cell"]), len(reference["aged task"])
        print(f"fresh kernel vs this session, interleaved ({n_cells} cells, {n_tasks} task calls):")
        for what, name in (("cell", "cell latency ms (median)"), ("task", "task call ms (median)")):
            fresh = statistics.median(reference[f"fresh {what}"])
            aged = statistics.median(reference[f"aged {what}"])
            pct = (aged - fresh) / fresh * 100
            bad |= pct >= args.limit
            _row(name, fresh, aged, pct, "ok" if pct < args.limit else "GREW")
    return 1 if bad else 0


def _row(name: str, before: float, after: float, pct: float, verdict: str) -> None:
    print(f"  {name:28s} {before:9.1f} -> {after:9.1f}  {pct:+6.1f} %  {verdict}")


if __name__ == "__main__":
    sys.exit(main())
