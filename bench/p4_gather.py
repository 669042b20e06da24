"""P4: gathering numpy results from the servers, MB/s vs a local memcpy of the same bytes.

Each of the 2 servers holds an array of ``MiB`` MiB (made by an earlier, untimed
cell); the timed call is ``Dispatcher.spmd("_bench_a")`` -- what ``%%casa_parallel``
does to return a cell's value -- in this process (casa-kernel's library, the kernel's
own code path without Jupyter's messaging). Same run, same bytes:

- memcpy: ``np.copyto`` of the same total bytes into a preallocated buffer here
  (the ceiling), and ``arr.copy()`` (allocate + copy, as a receiver must);
- raw ipyparallel: ``DirectView.pull`` of the same arrays on the same servers;
- raw MPI: ``Gatherv`` of the same bytes among ranks (mpi4py, shared memory).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from common import OUT, interleaved, log, med, py_spy_record, summarize_collapsed, timeit
from p2_dispatch import mpi_floor

TARGET = 0.50


def run(mib: float, repeats: int) -> dict[str, Any]:
    from casa_kernel.client.dispatch import Dispatcher
    from casa_kernel.cluster.lifecycle import CasaCluster
    from casa_kernel.config.settings import ClusterConfig

    cluster = CasaCluster(ClusterConfig.from_options(nprocs=3))
    try:
        cluster.start()
        client = cluster.wait_ready()
        disp = Dispatcher(cluster)
        n = int(mib * 2**20 / 8)
        disp.spmd(f"import numpy as np\n_bench_a = np.ones({n}, dtype=np.float64) * rank\nNone")
        dv = client[:]

        def gather_ck() -> None:
            values = disp.spmd("_bench_a")
            assert len(values) == 2 and values[1].nbytes == n * 8

        def gather_raw() -> None:
            values = dv.pull("_bench_a", block=True)
            assert len(values) == 2

        times = interleaved({"casa_kernel": gather_ck, "ipp_pull": gather_raw}, repeats, warmup=1)
        # Where the time goes, in every process on the way (this one's threads,
        # the controller, the engines): py-spy, not cProfile (the main thread only waits).
        spy_out = OUT / "profiles" / "p4_gather_pyspy.txt"
        with py_spy_record(os.getpid(), spy_out, rate=200):
            for _ in range(20):
                gather_ck()
        profile = summarize_collapsed(spy_out, top=45)
        spy_out.with_suffix(".summary.txt").write_text(profile)
    finally:
        t0 = time.perf_counter()
        cluster.close()
        log(f"P4 cluster closed in {time.perf_counter() - t0:.1f} s")

    total = 2 * n * 8
    src = np.ones(total // 8)
    dst = np.empty_like(src)
    memcpy = timeit(lambda: np.copyto(dst, src), repeat=max(repeats, 5), warmup=2)
    alloc_copy = timeit(lambda: src.copy(), repeat=max(repeats, 5), warmup=2)
    mpi = mpi_floor(3, rounds=10, mib=mib)

    def mbs(seconds: list[float], nbytes: int = total) -> float:
        return nbytes / 1e6 / med(seconds)

    rates = {
        "casa_kernel": mbs(times["casa_kernel"]),
        "ipp_pull": mbs(times["ipp_pull"]),
        "memcpy": mbs(memcpy),
        "alloc_copy": mbs(alloc_copy),
        "mpi_gatherv": mbs(mpi["gather_s"], mpi["gather_bytes"]),
    }
    return {
        "mib_per_server": mib,
        "bytes_total": total,
        "repeats": repeats,
        "times_s": {
            **times,
            "memcpy": memcpy,
            "alloc_copy": alloc_copy,
            "mpi_gatherv": mpi["gather_s"],
        },
        "mb_per_s": rates,
        "fraction_of_memcpy": rates["casa_kernel"] / rates["memcpy"],
        "fraction_of_alloc_copy": rates["casa_kernel"] / rates["alloc_copy"],
        "vs_ipp_pull": rates["casa_kernel"] / rates["ipp_pull"],
        "target": rates["casa_kernel"] / rates["memcpy"] >= TARGET,
        "profile": profile,
    }
