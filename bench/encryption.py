"""What CurveZMQ costs per call: the same cluster encrypted and not, on one machine.

Two clusters (``CasaCluster``, the code the kernel runs, in this process), 2
servers each, one with ``encrypt=True`` (what every cluster across hosts gets),
one without (a one-machine cluster's default), up at the same time; timed
interleaved (A B A B ...) so the box's load drifts alike for both:

- a no-op ``Dispatcher.spmd("None")`` (what ``%%casa_parallel`` does);
- a gather of ``--mib`` MiB of float64 from each server (``Dispatcher.spmd("_a")``),
  where encryption's per-byte cost shows.

Prints medians and the ratio encrypted / clear. Usage::

    .venv/bin/python bench/encryption.py [--repeats 40] [--mib 16]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from common import interleaved, log, med


def start(encrypt: bool) -> tuple[Any, Any, float]:
    from casa_kernel.client.dispatch import Dispatcher
    from casa_kernel.cluster.lifecycle import CasaCluster
    from casa_kernel.config.settings import ClusterConfig

    config = ClusterConfig.from_options(nprocs=3, preload_casa=False, encrypt=encrypt)
    cluster = CasaCluster(config)
    t0 = time.perf_counter()
    cluster.start()
    client = cluster.wait_ready()
    seconds = time.perf_counter() - t0
    assert bool(client.curve_serverkey) is encrypt  # the client really uses CURVE (or not)
    return cluster, Dispatcher(cluster), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--mib", type=float, default=16.0, help="MiB gathered per server")
    args = parser.parse_args()

    clusters = []
    try:
        started = {}
        for encrypt in (False, True):
            cluster, disp, seconds = start(encrypt)
            clusters.append(cluster)
            started["curve" if encrypt else "clear"] = (disp, seconds)
        n = int(args.mib * 2**20 / 8)
        for disp, _ in started.values():
            disp.spmd(f"import numpy as np\n_a = np.ones({n}) * rank\nNone")
        noop = interleaved(
            {name: (lambda d=disp: d.spmd("None")) for name, (disp, _) in started.items()},
            args.repeats,
        )
        gather = interleaved(
            {name: (lambda d=disp: d.spmd("_a")) for name, (disp, _) in started.items()},
            max(5, args.repeats // 4),
            warmup=1,
        )
    finally:
        for cluster in clusters:
            cluster.close()
    result = {
        "start_s": {name: seconds for name, (_, seconds) in started.items()},
        "noop_ms": {name: med(times) * 1e3 for name, times in noop.items()},
        "gather_ms": {name: med(times) * 1e3 for name, times in gather.items()},
        "gather_mib": 2 * args.mib,
        "repeats": args.repeats,
    }
    log(json.dumps(result))
    mb = result["gather_mib"] * 2**20 / 1e6
    clear_s, curve_s = started["clear"][1], started["curve"][1]
    print(f"start (one each):  clear {clear_s:.2f} s, curve {curve_s:.2f} s")
    for what, key in (("no-op spmd", "noop_ms"), (f"gather {mb:.0f} MB", "gather_ms")):
        clear, curve = result[key]["clear"], result[key]["curve"]
        ratio = curve / clear
        print(f"{what:>16}: clear {clear:8.2f} ms  curve {curve:8.2f} ms  ratio {ratio:.2f}")
    for name, ms in result["gather_ms"].items():
        print(f"{'gather rate':>16}: {name} {mb / (ms / 1e3):.0f} MB/s")


if __name__ == "__main__":
    main()
