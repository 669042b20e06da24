"""Stress: N kernel start/restart cycles leave no process, open file, port or temp file.

.venv/bin/python stress/restart_cycles.py [--cycles 100]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from kernels import execute, kernel_env, kernel_pid, running_kernel, wait_gone  # noqa: E402


def _snapshot() -> dict[str, int]:
    me = psutil.Process()
    owned = 0
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("CASA_KERNEL_OWNER"):
                owned += 1
        except psutil.Error:
            continue
    return {
        "cluster processes": owned,
        "open files (this process)": me.num_fds(),
        "inet sockets (this process)": len(me.net_connections("inet")),
        "temp cluster folders": len(
            glob.glob(os.path.join(tempfile.gettempdir(), "casa-kernel-*"))
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    args = parser.parse_args()
    before = _snapshot()
    leftovers = 0
    started = time.monotonic()
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3")) as (km, kc):
        for cycle in range(1, args.cycles + 1):
            assert execute(kc, "%%casa_parallel\nrank").result == "[0, 1]"
            old = kernel_pid(km)
            km.restart_kernel(now=False)
            kc.wait_for_ready(timeout=60)
            left = wait_gone(old, timeout=10)
            leftovers += len(left)
            if cycle % 10 == 0 or left:
                print(f"cycle {cycle}: {len(left)} left behind; {_snapshot()}", flush=True)
    time.sleep(2)
    after = _snapshot()
    print(f"{args.cycles} cycles in {time.monotonic() - started:.0f} s")
    print(f"before: {before}\nafter:  {after}")
    grew = {k: (before[k], after[k]) for k in before if after[k] > before[k]}
    if leftovers or grew:
        print(f"FAIL: {leftovers} processes left behind during cycles; grew: {grew}")
        return 1
    print("OK: nothing left behind, nothing grew")
    return 0


if __name__ == "__main__":
    sys.exit(main())
