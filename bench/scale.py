"""Scale: start time and no-op dispatch time for N = 2, 8, 32, 64 servers (oversubscribed).

For each N, in the same run: casa-kernel's cluster (``CasaCluster``, the code the
kernel runs, in this process), a raw ipyparallel cluster with the same settings,
and the MPI floors (``mpiexec -n N python -c 'from mpi4py import MPI'``; mpi4py
bcast/gather with N+1 ranks). Dispatch is ``Dispatcher.spmd("pass")`` against
``DirectView.apply_sync(noop)`` on the same servers. The curves go to
bench/scale.png; the growth exponent (log-log slope) between the two largest N
says what grows faster than linearly.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import raw_ipp
from common import (
    BENCH,
    OUT,
    interleaved,
    log,
    med,
    proc_status,
    py_spy_record,
    summarize_collapsed,
)
from p2_dispatch import mpi_floor
from p3_start import mpiexec_floor


def casa_kernel_at(n: int, repeats: int, profile: bool) -> dict[str, Any]:
    from casa_kernel.client.dispatch import Dispatcher
    from casa_kernel.cluster.lifecycle import CasaCluster
    from casa_kernel.config.settings import ClusterConfig

    cluster = CasaCluster(ClusterConfig.from_options(nprocs=n + 1, start_timeout=900))
    result: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        cluster.start()
        client = cluster.wait_ready()
        result["start_s"] = time.perf_counter() - t0
        disp = Dispatcher(cluster)
        dv = client[:]
        times = interleaved(
            {
                "casa_parallel": lambda: disp.spmd("pass"),
                "apply_sync": lambda: dv.apply_sync(raw_ipp.noop),
            },
            repeats,
            warmup=2,
        )
        result["dispatch_s"] = times
        servers = [proc_status(s.pid) for s in cluster.servers.values()]
        result["server_memory_mib"] = sorted(s.get("VmHWM", 0.0) for s in servers)
        if profile:
            # every process of the cluster (controller, mpiexec, engines) descends from us
            spy_out = OUT / "profiles" / f"scale_dispatch_n{n}_pyspy.txt"
            with py_spy_record(os.getpid(), spy_out, rate=50):
                for _ in range(20):
                    disp.spmd("pass")
            result["dispatch_profile"] = summarize_collapsed(spy_out, top=40)
            spy_out.with_suffix(".summary.txt").write_text(result["dispatch_profile"])
    finally:
        t1 = time.perf_counter()
        cluster.close()
        result["stop_s"] = time.perf_counter() - t1
    return result


def raw_at(n: int, repeats: int) -> dict[str, Any]:
    with raw_ipp.raw_cluster(n, timeout=900) as (client, start):
        dv = client[:]
        times = interleaved({"apply_sync": lambda: dv.apply_sync(raw_ipp.noop)}, repeats, warmup=2)
        pids = dv.apply_sync(raw_ipp.engine_pid)
        mem = sorted(proc_status(p).get("VmHWM", 0.0) for p in pids)
    return {
        "start_s": start["ready_s"],
        "registered_s": start["registered_s"],
        "dispatch_s": times,
        "engine_memory_mib": mem,
    }


def slope(xs: list[int], ys: list[float]) -> float:
    """Log-log slope between the two largest N: 1 = linear, > 1 = faster than linear."""
    if len(xs) < 2 or ys[-1] <= 0 or ys[-2] <= 0:
        return float("nan")
    return math.log(ys[-1] / ys[-2]) / math.log(xs[-1] / xs[-2])


def run(ns: list[int], repeats: int) -> dict[str, Any]:
    rows = []
    for n in ns:
        log(f"scale N={n}: casa-kernel ...")
        ck = casa_kernel_at(n, repeats, profile=(n == ns[-1]))
        log(f"scale N={n}: raw ipyparallel ...")
        raw = raw_at(n, repeats)
        log(f"scale N={n}: MPI floors ...")
        floor = mpiexec_floor(n, 1)
        rt = mpi_floor(n + 1, rounds=20)
        rows.append(
            {
                "n": n,
                "casa_kernel": ck,
                "raw_ipp": raw,
                "mpiexec_floor_s": floor[0],
                "mpi4py_roundtrip_s": med(rt["roundtrip_s"]),
            }
        )
        log(
            f"scale N={n}: start {ck['start_s']:.1f} s "
            f"(raw {raw['start_s']:.1f}, floor {floor[0]:.1f}); "
            f"dispatch {med(ck['dispatch_s']['casa_parallel']) * 1e3:.1f} ms "
            f"(apply_sync {med(ck['dispatch_s']['apply_sync']) * 1e3:.1f})"
        )
    curves = curves_of(rows)
    result = {
        "ns": ns,
        "repeats": repeats,
        "rows": rows,
        "curves": curves,
        "growth_exponent": {name: slope(ns, ys) for name, ys in curves.items()},
    }
    plot(ns, curves, BENCH / "scale.png")
    return result


def curves_of(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    return {
        "start: casa-kernel": [r["casa_kernel"]["start_s"] for r in rows],
        "start: raw ipyparallel": [r["raw_ipp"]["start_s"] for r in rows],
        "start: mpiexec floor": [r["mpiexec_floor_s"] for r in rows],
        "dispatch: casa-kernel %%casa_parallel": [
            med(r["casa_kernel"]["dispatch_s"]["casa_parallel"]) for r in rows
        ],
        "dispatch: apply_sync (same cluster)": [
            med(r["casa_kernel"]["dispatch_s"]["apply_sync"]) for r in rows
        ],
        "dispatch: apply_sync (raw cluster)": [
            med(r["raw_ipp"]["dispatch_s"]["apply_sync"]) for r in rows
        ],
        "dispatch: mpi4py bcast+gather": [r["mpi4py_roundtrip_s"] for r in rows],
    }


def plot(ns: list[int], curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, prefix, unit, scale in ((axes[0], "start", "s", 1.0), (axes[1], "dispatch", "ms", 1e3)):
        for name, ys in curves.items():
            if not name.startswith(prefix):
                continue
            ax.plot(ns, [y * scale for y in ys], marker="o", label=name.split(": ", 1)[1])
        # a linear reference through casa-kernel's first point
        first = next(ys for name, ys in curves.items() if name.startswith(prefix))
        ref = [first[0] * scale * n / ns[0] for n in ns]
        ax.plot(ns, ref, linestyle=":", color="grey", label="linear in N (reference)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.set_xlabel("servers N (2 cores: oversubscribed above 2)")
        ax.set_ylabel(f"{prefix} time ({unit})")
        ax.set_title(f"{prefix} time vs servers")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("casa-kernel scaling on this box (medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
