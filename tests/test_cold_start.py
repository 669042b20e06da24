"""Cold start: CASA loads in the kernel and on the servers at start, without
blocking the user and without the deadlock of the earlier attempt.

Real kernels, real servers. The only time bounds are liveness bounds: a hang is
what is being tested for.
"""

from __future__ import annotations

import ast
import time

from kernels import execute, kernel_env, running_kernel

CASA_LOADED = "%%casa_parallel\nimport sys; 'casatasks' in sys.modules"


def _wait_servers_loaded(kc, timeout: float = 120.0) -> list[bool]:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        loaded = ast.literal_eval(execute(kc, CASA_LOADED).result)
        if all(loaded) or time.monotonic() > deadline:
            return loaded
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def test_casa_loads_at_start_and_cells_never_hang(tiny_mms):
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3")) as (km, kc):
        # answered while CASA loads in the kernel (the earlier attempt hung here)
        reply = execute(kc, "1 + 1", timeout=30)
        assert reply.status == "ok" and reply.result == "2"
        # a cell loading extension modules while casatools loads in the thread
        reply = execute(kc, "import decimal, ssl, sqlite3; 'ok'", timeout=30)
        assert reply.result == "'ok'"
        reply = execute(kc, "%%casa_parallel\nrank", timeout=120)
        assert reply.result == "[0, 1]", reply.error
        # nobody asked for CASA: the servers loaded it as part of their start
        assert _wait_servers_loaded(kc) == [True, True]
        reply = execute(kc, "import sys; 'casatasks' in sys.modules", timeout=120)
        deadline = time.monotonic() + 120
        while reply.result != "True" and time.monotonic() < deadline:
            time.sleep(0.2)
            reply = execute(kc, "import sys; 'casatasks' in sys.modules")
        assert reply.result == "True"
        reply = execute(kc, f"flagdata(vis={tiny_mms!r}, mode='summary')['total']", 300)
        assert reply.status == "ok" and float(reply.result) > 0, reply.error


def test_preload_off_keeps_casa_out_until_first_use():
    env = kernel_env(CASA_KERNEL_NPROCS="3", CASA_KERNEL_PRELOAD="0")
    with running_kernel(env) as (km, kc):
        reply = execute(kc, "%%casa_parallel\nrank", timeout=120)
        assert reply.result == "[0, 1]", reply.error
        time.sleep(3)  # time enough for a preload to have shown; there is none
        assert ast.literal_eval(execute(kc, CASA_LOADED).result) == [False, False]
        assert execute(kc, "import sys; 'casatasks' in sys.modules").result == "False"


def test_simulate_ms_waits_for_casa_loading_in_the_background(tmp_path):
    """casacore is not thread-safe: simulate_ms (casatools, in the kernel) does not
    run beside the preload thread's import of CASA (that once crashed the kernel)."""
    env = kernel_env(CASA_KERNEL_NPROCS="2")
    with running_kernel(env, cwd=str(tmp_path)) as (_, kc):
        reply = execute(kc, "%casa_cluster status")  # the preload begins after it
        assert reply.status == "ok", reply.error
        code = (
            "import threading\n"
            "from casa_kernel.casa.simulate import simulate_ms\n"
            "before = [t.name for t in threading.enumerate()]\n"
            "simulate_ms('t.ms', size='tiny')\n"
            "import sys\n"
            "(before, 'casatasks' in sys.modules)"
        )
        reply = execute(kc, code)
        assert reply.status == "ok", reply.error
        before, imported = ast.literal_eval(reply.result)
        # the import was under way when the cell began, and done when it simulated
        assert "casa-import" in before or "casa-preload" in before, before
        assert imported
