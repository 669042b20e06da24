"""Stress: N kernel start/restart cycles leave no process, open file, port or temp file.

.venv/bin/python stress/restart_cycles.py [--cycles 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from kernels import execute, kernel_env, kernel_pid, running_kernel, wait_gone  # noqa: E402


def _snapshot(owners: set[int], tmpdir: str) -> dict[str, int]:
    """What this script's kernels hold; other users of the machine are not counted."""
    me = psutil.Process()
    owned = 0
    for proc in psutil.process_iter():
        try:
            owner = proc.environ().get("CASA_KERNEL_OWNER")
        except psutil.Error:
            continue
        if owner and int(owner) in owners and not psutil.pid_exists(int(owner)):
            owned += 1  # a process of a kernel that is gone
    return {
        "orphaned cluster processes": owned,
        "open files (this process)": me.num_fds(),
        "inet sockets (this process)": len(me.net_connections("inet")),
        "temp files and folders of the kernels": len(os.listdir(tmpdir)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    args = parser.parse_args()
    # The kernels get a private TMPDIR: their cluster folders are counted there.
    tmpdir = tempfile.mkdtemp(prefix="casa-kernel-restart-")
    owners: set[int] = set()
    before = _snapshot(owners, tmpdir)
    leftovers = 0
    started = time.monotonic()
    env = kernel_env(CASA_KERNEL_NPROCS="3", TMPDIR=tmpdir)
    with running_kernel(env) as (km, kc):
        for cycle in range(1, args.cycles + 1):
            assert execute(kc, "%%casa_parallel\nrank").result == "[0, 1]"
            old = kernel_pid(km)
            owners.add(old)
            km.restart_kernel(now=False)
            kc.wait_for_ready(timeout=60)
            left = wait_gone(old, timeout=10)
            leftovers += len(left)
            if cycle % 10 == 0 or left:
                snapshot = _snapshot(owners, tmpdir)
                print(f"cycle {cycle}: {len(left)} left behind; {snapshot}", flush=True)
        owners.add(kernel_pid(km))
    time.sleep(2)
    after = _snapshot(owners, tmpdir)
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
