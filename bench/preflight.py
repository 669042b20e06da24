"""Preflight: what checking H hosts before a launch costs, against one probe, same run.

Every "host" is this machine reached through a local launcher agent (``sh -c``,
as the fake-host harness does without the namespaces), so the figures are the
probe's own cost -- a Python start, reading installed metadata, ``mpiexec
--version``, the path checks -- and how well the probes of several hosts
overlap, not a network's. Run::

    .venv/bin/python bench/preflight.py [--repeat 5]

Prints, per host count H: the median wall time of ``preflight.check`` (all
hosts at once) and its ratio to one probe (the baseline, H=1 run alone) and to
H probes run one after another.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from casa_kernel import preflight  # noqa: E402
from casa_kernel.config.settings import ClusterConfig  # noqa: E402

AGENT = '#!/bin/sh\nshift\nexec sh -c "$*"\n'


def config_for(folder: Path, hosts: int) -> ClusterConfig:
    hostfile = folder / f"hosts-{hosts}.txt"
    hostfile.write_text(
        "localhost slots=1\n" + "".join(f"bench-h{i} slots=1\n" for i in range(hosts))
    )
    return ClusterConfig.from_options(hostfile=str(hostfile))


def timed(config: ClusterConfig) -> float:
    started = time.perf_counter()
    report = preflight.check(config)
    elapsed = time.perf_counter() - started
    if not report.ok:
        raise SystemExit(repr(report.table()))
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--hosts", default="1,2,4,8")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        agent = folder / "agent"
        agent.write_text(AGENT)
        agent.chmod(0o755)
        os.environ["PRTE_MCA_plm_ssh_agent"] = str(agent)
        os.chdir(folder)
        counts = [int(h) for h in args.hosts.split(",")]
        configs = {h: config_for(folder, h) for h in counts}
        timed(configs[counts[0]])  # warm the file cache once
        one = statistics.median(timed(configs[1]) for _ in range(args.repeat))
        print(f"preflight, {os.cpu_count()} cores, median of {args.repeat}; baseline one probe")
        print(f"{'hosts':>5}  {'check (s)':>9}  {'x one probe':>11}  {'x H serial':>10}")
        for hosts in counts:
            wall = statistics.median(timed(configs[hosts]) for _ in range(args.repeat))
            print(f"{hosts:>5}  {wall:>9.3f}  {wall / one:>11.2f}  {wall / (hosts * one):>10.2f}")


if __name__ == "__main__":
    main()
