"""P5: cold start. Launch -> first rflag result, casa-kernel vs mpicasa, same MMS, same run.

    .venv/bin/python bench/p5_cold.py [--size small|medium] [--repeats 3]

- casa-kernel: ``KernelManager.start_kernel`` of a real kernel (N=3: 2 servers) ->
  a first cell ``1`` answered -> a cell ``flagdata(vis=MMS, mode='rflag')`` answered.
  Twice: with CASA loaded at start (default) and with ``CASA_KERNEL_PRELOAD=0``
  (CASA imported on first use, as before).
- mpicasa: ``mpiexec -n 3 python bench/mpicasa_script.py`` (casampi in its own venv,
  bench/mpicasa_env.py) whose first task call is the same rflag; its wall clock
  stamp after that call minus the launch time.

Before every launch the flags are cleared (untimed, serially, in this process), so
every run does the same work. The ways alternate within each repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mpicasa_env  # noqa: E402
from common import (  # noqa: E402
    BENCH,
    OUT,
    casa_env,
    kill_tree,
    log,
    med,
    mpi_env,
    mpiexec_cmd,
)
from p1_casa import _kernel_tools  # noqa: E402

RFLAG = {"mode": "rflag", "flagbackup": False}
TARGET = 0.7  # launch -> first result, casa-kernel / mpicasa
FIRST_CELL_TARGET = 1.5  # s, kernel start -> first cell answered


def unflag(vis: str) -> None:
    from casatasks import flagdata

    flagdata(vis=vis, mode="unflag", flagbackup=False)


def kernel_cold(vis: str, work: Path, preload: bool) -> dict[str, float]:
    kernels = _kernel_tools()
    env = kernels.kernel_env(CASA_KERNEL_NPROCS="3", CASA_KERNEL_PRELOAD="1" if preload else "0")
    code = f"_r = flagdata(vis={vis!r}, **{RFLAG!r})\n_r is not False"
    t0 = time.perf_counter()
    with kernels.running_kernel(env, cwd=str(work)) as (km, kc):
        ready = time.perf_counter() - t0
        reply = kernels.execute(kc, "1")
        first_cell = time.perf_counter() - t0
        reply = kernels.execute(kc, code, timeout=600)
        rflag = time.perf_counter() - t0
        if reply.status != "ok" or reply.result != "True":
            raise RuntimeError(f"casa-kernel rflag failed: {reply.error}")
    return {"kernel_ready_s": ready, "first_cell_s": first_cell, "first_rflag_s": rflag}


def mpicasa_cold(vis: str, work: Path) -> dict[str, float]:
    result_path = work / "mpicasa-cold.json"
    result_path.unlink(missing_ok=True)
    spec = {"repeats": 0, "reset": ["flagdata", {"vis": vis, **RFLAG}], "steps": []}
    spec["result"] = str(result_path)
    spec_path = work / "mpicasa-cold-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = mpi_env()
    env["PATH"] = str(mpicasa_env.VENV / "bin") + os.pathsep + env["PATH"]
    env["CASA_KERNEL_LOG_DIR"] = str(OUT / "logs-mpicasa")
    os.makedirs(env["CASA_KERNEL_LOG_DIR"], exist_ok=True)
    cmd = mpiexec_cmd(
        3,
        mpicasa_env.python(),
        str(BENCH / "mpicasa_script.py"),
        str(spec_path),
        mpiexec=mpicasa_env.mpiexec(),
    )
    t_launch = time.time()
    proc = subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise
    if not result_path.exists():
        raise RuntimeError(f"mpicasa run failed (rc {proc.returncode}):\n{output[-2000:]}")
    res = json.loads(result_path.read_text())
    return {"first_rflag_s": res["t_first_result"] - t_launch, "command": " ".join(cmd)}


def run(size: str, repeats: int) -> dict[str, Any]:
    casa_env()
    from data import prepare

    data = prepare(size)
    work = OUT / "p5"
    work.mkdir(parents=True, exist_ok=True)
    mpicasa_env.ensure()
    runs: dict[str, list[dict[str, Any]]] = {"preload": [], "lazy": [], "mpicasa": []}
    for i in range(repeats):
        for way in ("mpicasa", "preload", "lazy"):
            unflag(data.mms)
            log(f"P5 repeat {i + 1}/{repeats}: {way}")
            if way == "mpicasa":
                runs[way].append(mpicasa_cold(data.mms, work))
            else:
                runs[way].append(kernel_cold(data.mms, work, preload=way == "preload"))
    first = {way: med([r["first_rflag_s"] for r in rs]) for way, rs in runs.items()}
    return {
        "size": size,
        "mms": data.mms,
        "mms_bytes": data.mms_bytes,
        "repeats": repeats,
        "runs": runs,
        "first_rflag_s": first,
        "ratio_preload_vs_mpicasa": first["preload"] / first["mpicasa"],
        "ratio_lazy_vs_mpicasa": first["lazy"] / first["mpicasa"],
        "first_cell_s": med([r["first_cell_s"] for r in runs["preload"]]),
        "first_cell_lazy_s": med([r["first_cell_s"] for r in runs["lazy"]]),
    }


def report(r: dict[str, Any]) -> str:
    f = r["first_rflag_s"]
    ok = "met" if r["ratio_preload_vs_mpicasa"] <= TARGET else "MISSED"
    cell_ok = "met" if r["first_cell_s"] < FIRST_CELL_TARGET else "MISSED"
    lines = [
        f"medians of {r['repeats']} launches each, {r['size']} MMS "
        f"({r['mms_bytes'] / 2**20:.0f} MiB, 4 sub-MSs), 2 servers",
        "",
        "| launch -> first rflag result                    | s     | vs mpicasa |",
        "|-------------------------------------------------|-------|------------|",
        f"| mpicasa (`mpiexec -n 3`, casampi)               | {f['mpicasa']:.2f} | 1.00x      |",
        f"| casa-kernel, CASA loaded at start (default)     | {f['preload']:.2f} | "
        f"{r['ratio_preload_vs_mpicasa']:.2f}x ({ok} <= {TARGET}x) |",
        f"| casa-kernel, `CASA_KERNEL_PRELOAD=0` (on first use) | {f['lazy']:.2f} | "
        f"{r['ratio_lazy_vs_mpicasa']:.2f}x |",
        "",
        f"kernel start -> first cell (`1`) answered: {r['first_cell_s']:.2f} s with CASA "
        f"loading in the background ({cell_ok} < {FIRST_CELL_TARGET} s); "
        f"{r['first_cell_lazy_s']:.2f} s without.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["small", "medium"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = run(args.size, args.repeats)
    (OUT / "p5.json").write_text(json.dumps(result, indent=1))
    print(report(result))


if __name__ == "__main__":
    main()
