"""Baseline for stress/long_session.py: does raw ipyparallel (no casa-kernel) slow down with age?

Starts the same kind of cluster casa-kernel starts (bench/raw_ipp.py: 2 MPI
engines, 500 ms heartbeat), runs ``--rounds`` rounds (one direct apply on both
engines + one load-balanced map of 4, like a cell and a 4-sub-MS task call),
then starts a FRESH identical cluster and times rounds interleaved between the
two (so the machine's load falls on both alike). Prints aged vs fresh medians.
``--nodb`` runs both controllers without a task database, as casa-kernel does.

    .venv/bin/python stress/ipp_aging.py [--rounds 2200] [--compare 600] [--nodb]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import raw_ipp  # noqa: E402

NODB = "--IPController.db_class=ipyparallel.controller.dictdb.NoDB"


def work(x: int) -> int:
    return sum(range(1000)) + x


def one_round(client, lview) -> tuple[float, float]:
    t0 = time.perf_counter()
    client[:].apply_sync(work, 1)
    t1 = time.perf_counter()
    lview.map_sync(work, range(4))
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t1) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2200)
    parser.add_argument("--compare", type=int, default=600)
    parser.add_argument("--nodb", action="store_true", help="controllers without a task DB")
    args = parser.parse_args()
    if args.nodb:
        raw_ipp.HEARTBEAT_ARGS.append(NODB)
    med = statistics.median
    with raw_ipp.raw_cluster(2) as (aged, _):
        aged_lb = aged.load_balanced_view()
        for _ in range(args.rounds):
            one_round(aged, aged_lb)
        with raw_ipp.raw_cluster(2) as (fresh, _):
            fresh_lb = fresh.load_balanced_view()
            for _ in range(100):
                one_round(fresh, fresh_lb)
            a, b = [], []
            for i in range(args.compare):
                pair = [(aged, aged_lb, a), (fresh, fresh_lb, b)]
                if i % 2:
                    pair.reverse()
                for client, lview, out in pair:
                    out.append(one_round(client, lview))
    print(
        f"raw ipyparallel, controller {'NoDB' if args.nodb else 'DictDB (default)'}: "
        f"{args.rounds} rounds, then {args.compare} interleaved; load average "
        f"{os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)"
    )
    for j, name in ((0, "direct apply, 2 engines"), (1, "load-balanced map of 4")):
        fresh_ms, aged_ms = med(r[j] for r in b), med(r[j] for r in a)
        print(
            f"  {name:24s} fresh {fresh_ms:6.2f} ms, aged {aged_ms:6.2f} ms, "
            f"{(aged_ms - fresh_ms) / fresh_ms * 100:+5.1f} %"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
