"""P2: a no-op ``%%casa_parallel`` round trip vs raw ipyparallel, through a real kernel.

Both sides run in the SAME kernel on the SAME servers, so the ratio isolates
casa-kernel's own cost: a cell ``%%casa_parallel`` / ``pass`` against a cell
``dview.apply_sync(noop)`` (and ``%%casa_parallel --vis MMS`` against
``LoadBalancedView.map``), timed from jupyter_client (execute request to idle),
interleaved. The same pair is also timed inside the kernel (no Jupyter
messaging), and the floors outside any kernel: raw ipyparallel from a plain
script, and raw mpi4py bcast/gather.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import raw_ipp
from common import (
    BENCH,
    MARK,
    OUT,
    PYTHON,
    interleaved,
    log,
    marked_lines,
    med,
    mpi_env,
    mpiexec_cmd,
)
from p1_casa import _cell_value, _kernel_tools

TARGET = 1.10

SETUP = """
from casa_kernel.client.dispatch import Dispatcher as _BD
_bcl = casa_cluster.cluster
_bcl.wait_ready()
_bdv = _bcl.client[:]
_blv = _bcl.client.load_balanced_view()
def _bnoop(): return None
def _bnoop1(x): return None
# CASA loads at start in the kernel and on the servers (CASA_KERNEL_PRELOAD):
# let that finish before timing anything (an import waits on the import lock).
import casatasks
def _bload():
    import casatasks
_bdv.apply_sync(_bload)
"""

INSIDE = """
import time as _bt, json as _bj
_bd = _BD(_bcl)
_bsub = {subs!r}
_bfns = {{
    "casa_parallel": lambda: _bd.spmd("pass"),
    "apply_sync": lambda: _bdv.apply_sync(_bnoop),
    "per_submms": lambda: _bd.per_submms("None", _bsub, "bench"),
    "lview_map": lambda: _blv.map_sync(_bnoop1, range(len(_bsub))),
}}
for _ in range(3):
    for _f in _bfns.values(): _f()
_btimes = {{k: [] for k in _bfns}}
for _ in range({n}):
    for _k, _f in _bfns.items():
        _bt0 = _bt.perf_counter(); _f(); _btimes[_k].append(_bt.perf_counter() - _bt0)
print({mark!r} + _bj.dumps(_btimes))
"""

PROFILE = """
import cProfile as _bcp, pstats as _bps, io as _bio
_bip = get_ipython()
_bpr = _bcp.Profile()
_bpr.enable()
for _ in range({n}):
    _bip.run_cell_magic("casa_parallel", "", "pass")
_bpr.disable()
_bs = _bio.StringIO()
_bps.Stats(_bpr, stream=_bs).sort_stats("cumulative").print_stats(35)
print(_bs.getvalue())
"""


def kernel_level(mms: str | None, submms: list[str], repeats: int) -> dict[str, Any]:
    kernels = _kernel_tools()
    env = kernels.kernel_env(CASA_KERNEL_NPROCS="3")
    with kernels.running_kernel(env, cwd=str(OUT)) as (_km, kc):
        reply = kernels.execute(kc, "%casa_cluster status", timeout=300)
        if reply.status != "ok":
            raise RuntimeError(f"cluster did not start: {reply.error}")
        _cell_value(kernels.execute(kc, SETUP))

        def cell(code: str):
            def go() -> None:
                r = kernels.execute(kc, code)
                if r.status != "ok":
                    raise RuntimeError(f"{code!r}: {r.ename}: {r.evalue}")

            return go

        fns = {
            "casa_parallel": cell("%%casa_parallel\npass"),
            "apply_sync": cell("_bdv.apply_sync(_bnoop)"),
        }
        if mms:
            fns["per_submms"] = cell(f"%%casa_parallel --vis {mms}\nNone")
            fns["lview_map"] = cell(f"_blv.map_sync(_bnoop1, range({len(submms)}))")
        outer = interleaved(fns, repeats, warmup=3)
        subs = submms or ["a", "b", "c", "d"]
        inside = _cell_value(
            kernels.execute(kc, INSIDE.format(subs=subs, n=max(repeats, 30), mark=MARK), 300)
        )
        prof = kernels.execute(kc, PROFILE.format(n=100), 300)
        profile_text = prof.stdout
    (OUT / "profiles").mkdir(parents=True, exist_ok=True)
    (OUT / "profiles" / "p2_casa_parallel_cprofile.txt").write_text(profile_text)
    return {"kernel_roundtrip_s": outer, "inside_kernel_s": inside, "profile": profile_text}


def raw_floors(repeats: int) -> dict[str, Any]:
    """Raw ipyparallel from a plain script, and raw mpi4py, on 2 servers."""
    with raw_ipp.raw_cluster(2) as (client, start):
        dv = client[:]
        lv = client.load_balanced_view()
        times = interleaved(
            {
                "apply_sync": lambda: dv.apply_sync(raw_ipp.noop),
                "lview_map": lambda: lv.map_sync(raw_ipp.noop1, range(4)),
            },
            max(repeats, 30),
            warmup=3,
        )
    mpi = mpi_floor(3, rounds=max(repeats, 50))
    return {"plain_script_s": times, "raw_start": start, "mpi4py_roundtrip_s": mpi["roundtrip_s"]}


def mpi_floor(n: int, rounds: int = 50, mib: float = 0, timeout: float = 600) -> dict[str, Any]:
    cmd = mpiexec_cmd(n, PYTHON, str(BENCH / "mpi_floor.py"), str(rounds), str(mib))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=mpi_env(), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    found = marked_lines(done.stdout)
    if done.returncode or not found:
        raise RuntimeError(f"mpi floor failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    return {**found[0], "wall_s": wall}


def run(data: Any | None, repeats: int) -> dict[str, Any]:
    mms = data.mms if data is not None else None
    subs = data.submms if data is not None else []
    log("P2 kernel-level round trips ...")
    kl = kernel_level(mms, subs, repeats)
    log("P2 raw floors ...")
    floors = raw_floors(repeats)
    rt = kl["kernel_roundtrip_s"]
    ratio = med(rt["casa_parallel"]) / med(rt["apply_sync"])
    result = {
        "repeats": repeats,
        **kl,
        **floors,
        "ratio_casa_parallel_vs_apply_sync": ratio,
        "target": ratio <= TARGET,
    }
    if "per_submms" in rt:
        result["ratio_per_submms_vs_lview_map"] = med(rt["per_submms"]) / med(rt["lview_map"])
    ins = kl["inside_kernel_s"]
    result["ratio_inside_kernel"] = med(ins["casa_parallel"]) / med(ins["apply_sync"])
    result["ratio_inside_kernel_per_submms"] = med(ins["per_submms"]) / med(ins["lview_map"])
    result.pop("profile")
    return result


if __name__ == "__main__":  # quick look: python bench/p2_dispatch.py
    sys.path.insert(0, str(BENCH))
    from common import casa_env

    casa_env()
    out = run(None, 10)
    json.dump(out, sys.stdout, indent=1, default=str)
    print()
