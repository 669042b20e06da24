"""Stress: SIGKILL a server in the middle of per-sub-MS work, N times.

Each run must complete with the same merged result as a run without the fault,
and say which server died and what was re-run. Exit status 1 if any run fails.

    .venv/bin/python stress/kill_servers.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from kernels import execute, kernel_env, running_kernel  # noqa: E402

from casa_kernel.casa.config import apply_to_process, casa_environment  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="casa-kernel-stress-")
    apply_to_process(casa_environment(os.path.join(work, "logs")))
    from casatasks import partition

    from casa_kernel.casa.simulate import simulate_ms

    ms = simulate_ms(os.path.join(work, "s.ms"), nant=6, nchan=16, nint=40, nscans=2)
    mms = os.path.join(work, "s.mms")
    partition(vis=ms, outputvis=mms, createmms=True, separationaxis="auto", numsubms=4)
    cell = (
        f"%%casa_parallel --vis {mms} --out summ\n"
        "import time\ntime.sleep(1.0)\nflagdata(vis=vis, mode='summary')"
    )
    show = "import json; print(json.dumps(summ))"
    passed = 0
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3"), cwd=work) as (_km, kc):
        assert execute(kc, cell).status == "ok"
        expected = json.loads(execute(kc, show).stdout)
        for run in range(1, args.runs + 1):
            pids = execute(kc, "%%casa_parallel\nimport os\nos.getpid()").result
            victim_rank, victim = random.choice(list(enumerate(json.loads(pids))))
            delay = random.uniform(0.2, 1.8)
            timer = threading.Timer(delay, os.kill, (victim, signal.SIGKILL))
            started = time.monotonic()
            timer.start()
            reply = execute(kc, cell)
            timer.join()
            took = time.monotonic() - started
            ok = (
                reply.status == "ok"
                and json.loads(execute(kc, show).stdout) == expected
                and f"server rank {victim_rank}" in reply.stderr
                and "re-ran:" in reply.stderr
            )
            passed += ok
            note = reply.stderr.strip().splitlines()[-1] if reply.stderr.strip() else reply.error
            print(
                f"run {run}: kill rank {victim_rank} after {delay:.1f}s -> "
                f"{'OK' if ok else 'FAIL'} in {took:.1f}s | {note}",
                flush=True,
            )
    print(f"{passed} out of {args.runs} runs complete and equal to the fault-free run")
    return 0 if passed == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
