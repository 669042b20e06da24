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


def _snapshot(owners: set[int], tmpdir: str, kernel: int | None) -> dict[str, int]:
    """What this script's kernels hold; other users of the machine are not counted.

    Per live kernel: its open files and its cluster's listening ports; for the
    kernels that are gone: processes left behind; and the entries of the
    kernels' private TMPDIR (cluster folders, connection files).
    """
    orphans = 0
    fds = ports = 0
    for proc in psutil.process_iter():
        try:
            owner = proc.environ().get("CASA_KERNEL_OWNER")
            if not owner:
                continue
            if int(owner) in owners and not psutil.pid_exists(int(owner)):
                orphans += 1
            elif kernel is not None and int(owner) == kernel:
                ports += sum(c.status == "LISTEN" for c in proc.net_connections("inet"))
        except psutil.Error:
            continue
    if kernel is not None:
        try:
            fds = psutil.Process(kernel).num_fds()
        except psutil.Error:
            pass
    return {
        "processes left by dead kernels": orphans,
        "open files of the kernel": fds,
        "listening ports of its cluster": ports,
        "entries in the kernels' TMPDIR": len(os.listdir(tmpdir)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    args = parser.parse_args()
    # The kernels get a private TMPDIR: their cluster folders are counted there.
    tmpdir = tempfile.mkdtemp(prefix="casa-kernel-restart-")
    owners: set[int] = set()
    leftovers = 0
    started = time.monotonic()
    env = kernel_env(CASA_KERNEL_NPROCS="3", TMPDIR=tmpdir)
    samples = []
    with running_kernel(env) as (km, kc):
        for cycle in range(1, args.cycles + 1):
            assert execute(kc, "%%casa_parallel\nrank").result == "[0, 1]"
            old = kernel_pid(km)
            owners.add(old)
            samples.append(_snapshot(owners, tmpdir, old))
            km.restart_kernel(now=False)
            kc.wait_for_ready(timeout=60)
            left = wait_gone(old, timeout=10)
            leftovers += len(left)
            if cycle % 10 == 0 or left:
                print(f"cycle {cycle}: {len(left)} left behind; {samples[-1]}", flush=True)
        owners.add(kernel_pid(km))
    time.sleep(2)
    final = _snapshot(owners, tmpdir, None)
    for root, _dirs, files in os.walk(tmpdir):
        print("left in TMPDIR:", root, files)
    print(f"{args.cycles} cycles in {time.monotonic() - started:.0f} s")
    print(f"first cycle: {samples[0]}\nlast cycle:  {samples[-1]}\nafter stop:  {final}")
    grew = {
        k: (samples[0][k], samples[-1][k])
        for k in samples[0]
        if samples[-1][k] > samples[0][k] and k != "processes left by dead kernels"
    }
    bad = (
        leftovers
        or final["processes left by dead kernels"]
        or final["entries in the kernels' TMPDIR"]
    )
    if bad or grew:
        print(
            f"FAIL: {leftovers} processes left behind during cycles; "
            f"after stop {final}; grew {grew}"
        )
        return 1
    print("OK: nothing left behind, nothing grew")
    return 0


if __name__ == "__main__":
    sys.exit(main())
