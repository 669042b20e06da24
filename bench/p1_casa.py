"""P1: CASA tasks on a Multi-MS: casa-kernel vs serial, vs mpicasa, vs the 2-process limit.

Four ways to run the same steps on the same data, one after another in one run:

- serial: one plain process runs each task on the original MS (not the Multi-MS);
- limit: two plain concurrent processes (no cluster at all) each run the task on
  two of the four sub-MSs; the wall time until both finish is the best 2 servers
  can do on this box;
- casa-kernel: a real kernel (jupyter_client, N=3: 2 servers) runs the plain task
  call on the Multi-MS; the time is taken inside the cell around the call;
- mpicasa: casampi under ``mpiexec -n 3`` in its own venv, timed inside its script.

Before every repeat the flags are cleared (untimed ``flagdata mode='unflag'``) and
split's output removed, so each repeat does the same work. The first such reset of
each way also warms it up (imports), as a user's first task would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mpicasa_env
from common import (
    BENCH,
    MARK,
    OUT,
    PYTHON,
    TESTS,
    kill_tree,
    log,
    marked_lines,
    med,
    mpi_env,
    mpiexec_cmd,
    proc_status,
)
from data import Data

RESET = ("flagdata", {"mode": "unflag", "flagbackup": False})
LABELS = ["flagdata summary", "flagdata rflag", "applycal", "split"]


def steps(vis: str, caltable: str, outputvis: str) -> list[tuple[str, str, dict, list[str]]]:
    """(label, task, kwargs, paths to remove before) of the timed steps, in order."""
    return [
        ("flagdata summary", "flagdata", {"vis": vis, "mode": "summary"}, []),
        ("flagdata rflag", "flagdata", {"vis": vis, "mode": "rflag", "flagbackup": False}, []),
        (
            "applycal",
            "applycal",
            {"vis": vis, "gaintable": [caltable], "flagbackup": False},
            [],
        ),
        (
            "split",
            "split",
            {"vis": vis, "outputvis": outputvis, "datacolumn": "corrected"},
            [outputvis, outputvis + ".flagversions"],
        ),
    ]


def _rm(paths: list[str]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


# -- plain processes: serial and the limit ---------------------------------------------


class PlainWorkers:
    """k plain CASA processes (bench/plain_worker.py), ready to run commands."""

    def __init__(self, k: int, cwd: Path, env: dict[str, str]):
        self.procs = []
        for _ in range(k):
            self.procs.append(
                subprocess.Popen(
                    [PYTHON, str(BENCH / "plain_worker.py")],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    cwd=cwd,
                    env=env,
                )
            )
        self.pids = [self._read(p)["pid"] for p in self.procs]

    @staticmethod
    def _read(proc: subprocess.Popen) -> dict[str, Any]:
        while True:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"plain worker {proc.pid} exited (rc {proc.poll()})")
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])

    def run(self, task: str, calls_per_worker: list[list[dict]]) -> tuple[float, list[dict]]:
        """Send each worker its calls at once; wall time until the last one is done."""
        t0 = time.perf_counter()
        for proc, calls in zip(self.procs, calls_per_worker):
            proc.stdin.write(json.dumps({"task": task, "calls": calls}) + "\n")
            proc.stdin.flush()
        answers = [self._read(p) for p in self.procs]
        wall = time.perf_counter() - t0
        errors = [a["error"] for a in answers if a.get("error")]
        if errors:
            raise RuntimeError(f"{task}: {errors}")
        return wall, answers

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                proc.stdin.flush()
                proc.wait(timeout=30)
            except Exception:
                kill_tree(proc)


@contextmanager
def plain_workers(k: int, cwd: Path):
    workers = PlainWorkers(k, cwd, dict(os.environ))
    try:
        yield workers
    finally:
        workers.close()


def run_serial(data: Data, repeats: int, work: Path) -> dict[str, Any]:
    vis = data.serial_ms
    out = str(work / "serial-split.ms")
    plan = steps(vis, data.caltable, out)
    times: dict[str, list[float]] = {label: [] for label in LABELS}
    with plain_workers(1, work) as workers:
        first_reset, _ = workers.run(RESET[0], [[{"vis": vis, **RESET[1]}]])
        for _ in range(repeats):
            workers.run(RESET[0], [[{"vis": vis, **RESET[1]}]])
            for label, task, kwargs, cleanup in plan:
                _rm(cleanup)
                wall, _ = workers.run(task, [[kwargs]])
                times[label].append(wall)
        _rm([out, out + ".flagversions"])
    return {"times": times, "first_call_s": first_reset, "flagged_fraction": _flag_fraction(vis)}


def _flag_fraction(vis: str) -> float | None:
    """Fraction of flagged visibilities, read here with casatools (MS or Multi-MS)."""
    try:
        from casatasks import casalog, flagdata

        casalog.filterMsg(["***** consolidateResults, subMS:"])
        casalog.showconsole(False)
        summary = flagdata(vis=vis, mode="summary")
        return summary["flagged"] / summary["total"]
    except Exception as exc:
        log(f"flag summary of {vis} failed: {exc}")
        return None


def run_limit(data: Data, repeats: int, work: Path, nprocs: int = 2) -> dict[str, Any]:
    """The sub-MSs split over ``nprocs`` plain concurrent processes: the ceiling."""
    subs = data.submms
    share = [[i for i in range(len(subs)) if i % nprocs == w] for w in range(nprocs)]
    outs = [str(work / f"limit-split-{i}.ms") for i in range(len(subs))]
    times: dict[str, list[float]] = {label: [] for label in LABELS}
    per_call: dict[str, list[list[float]]] = {label: [] for label in LABELS}

    def calls(kwargs_of) -> list[list[dict]]:
        return [[kwargs_of(i) for i in mine] for mine in share]

    with plain_workers(nprocs, work) as workers:
        first_reset, _ = workers.run(RESET[0], calls(lambda i: {"vis": subs[i], **RESET[1]}))
        for _ in range(repeats):
            workers.run(RESET[0], calls(lambda i: {"vis": subs[i], **RESET[1]}))
            for k, label in enumerate(LABELS):
                _rm([p for o in outs for p in (o, o + ".flagversions")])
                per_sub = [steps(subs[i], data.caltable, outs[i])[k] for i in range(len(subs))]
                task = per_sub[0][1]
                wall, answers = workers.run(task, calls(lambda i, per_sub=per_sub: per_sub[i][2]))
                times[label].append(wall)
                per_call[label].append([t for a in answers for t in a.get("each", [])])
        _rm([p for o in outs for p in (o, o + ".flagversions")])
    flagged = _flag_fraction(data.mms)
    return {
        "times": times,
        "per_submms_call_s": per_call,
        "first_call_s": first_reset,
        "flagged_fraction": flagged,
    }


# -- casa-kernel through a real kernel ----------------------------------------------------


def _kernel_tools():
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import kernels

    return kernels


def _cell_value(reply: Any) -> Any:
    if reply.status != "ok":
        raise RuntimeError(f"kernel cell failed: {reply.ename}: {reply.evalue}\n{reply.traceback}")
    found = marked_lines(reply.stdout)
    return found[-1] if found else None


def kernel_call_code(task: str, kwargs: dict) -> str:
    """A cell that calls one task as a user would and prints its wall time."""
    return (
        "import time as _bt, json as _bj\n"
        "_bt0 = _bt.perf_counter()\n"
        f"_bret = {task}(**{kwargs!r})\n"
        "_bdt = _bt.perf_counter() - _bt0\n"
        f"print({MARK!r} + _bj.dumps({{'s': _bdt, 'ok': _bret is not False}}))\n"
    )


SERVER_PIDS_CODE = (
    "import json as _bj\n"
    f"print({MARK!r} + _bj.dumps([s.pid for s in casa_cluster.cluster.servers.values()]))\n"
)


def memory_of(kernel_pid: int, server_pids: list[int]) -> dict[str, Any]:
    return {"kernel": proc_status(kernel_pid), "servers": [proc_status(p) for p in server_pids]}


def run_kernel(data: Data, repeats: int, work: Path) -> dict[str, Any]:
    kernels = _kernel_tools()
    vis = data.mms
    out = str(work / "kernel-split.mms")
    plan = steps(vis, data.caltable, out)
    times: dict[str, list[float]] = {label: [] for label in LABELS}
    env = kernels.kernel_env(CASA_KERNEL_NPROCS="3")
    t0 = time.perf_counter()
    with kernels.running_kernel(env, cwd=str(work)) as (km, kc):
        reply = kernels.execute(kc, "%casa_cluster status", timeout=300)
        if reply.status != "ok":
            raise RuntimeError(f"cluster did not start: {reply.error}")
        start_s = time.perf_counter() - t0
        kpid = kernels.kernel_pid(km)
        spids = _cell_value(kernels.execute(kc, SERVER_PIDS_CODE))
        memory_idle = memory_of(kpid, spids)
        first = _cell_value(
            kernels.execute(kc, kernel_call_code(RESET[0], {"vis": vis, **RESET[1]}), 600)
        )
        for _ in range(repeats):
            _cell_value(
                kernels.execute(kc, kernel_call_code(RESET[0], {"vis": vis, **RESET[1]}), 600)
            )
            for label, task, kwargs, cleanup in plan:
                _rm(cleanup)
                value = _cell_value(kernels.execute(kc, kernel_call_code(task, kwargs), 900))
                if not value["ok"]:
                    raise RuntimeError(f"casa-kernel {label} returned False")
                times[label].append(value["s"])
        memory_after = memory_of(kpid, spids)
        _rm([out, out + ".flagversions"])
        profiles = profile_kernel_calls(kernels, kc, plan, vis)
        t_stop = time.perf_counter()
    stop_s = time.perf_counter() - t_stop
    flagged = _flag_fraction(vis)
    return {
        "times": times,
        "first_call_s": first["s"],
        "start_s": start_s,
        "stop_s": stop_s,
        "memory_idle": memory_idle,
        "memory_after": memory_after,
        "flagged_fraction": flagged,
        "profiles": profiles,
    }


PROFILE_CALL = """
import cProfile as _bcp, pstats as _bps, io as _bio, json as _bj, time as _bt
_bpr = _bcp.Profile()
_bt0 = _bt.time()
_bpr.enable()
{task}(**{kwargs!r})
_bpr.disable()
_bt1 = _bt.time()
_bs = _bio.StringIO()
_bps.Stats(_bpr, stream=_bs).sort_stats("cumulative").print_stats(45)
print(_bs.getvalue())
print({mark!r} + _bj.dumps({{"call": [_bt0, _bt1]}}))
"""

# On every server: wrap the casatasks tasks the servers run, so each sub-MS job's
# start and end (wall clock, same machine) are logged there. Nothing is edited:
# run_casa_task looks the task up in the casatasks module at each call.
SERVER_TIMING = """%%casa_parallel
import casatasks as _bct, time as _btm, functools as _bft
_bct._bench_log = getattr(_bct, "_bench_log", [])
for _bname in ("flagdata", "applycal", "split", "mstransform"):
    _borig = getattr(_bct, _bname)
    if getattr(_borig, "_bench", False):
        continue
    def _bmake(orig, name):
        @_bft.wraps(orig)
        def timed(*a, **kw):
            t0 = _btm.time()
            try:
                return orig(*a, **kw)
            finally:
                _bct._bench_log.append([name, kw.get("vis"), t0, _btm.time(), rank])
        timed._bench = True
        return timed
    setattr(_bct, _bname, _bmake(_borig, _bname))
None
"""

SERVER_LOG = """%%casa_parallel --out _blogs
import casatasks as _bct
_bl, _bct._bench_log = list(_bct._bench_log), []
_bl
"""


def profile_kernel_calls(kernels: Any, kc: Any, plan: list, vis: str) -> dict[str, Any]:
    """cProfile (kernel process) and a timeline of one call of each step, after the timed repeats.

    The kernel's main thread runs casatasks' ParallelTaskHelper and then waits
    for the servers: the profile (bench/out/profiles/p1_kernel_*_cprofile.txt)
    shows the client-side work; the servers log when each sub-MS job starts and
    ends, which splits the call into: before the first job starts, the jobs,
    and after the last job ends.
    """
    out: dict[str, Any] = {}
    folder = OUT / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    _cell_value(kernels.execute(kc, SERVER_TIMING, 300))
    kernels.execute(kc, kernel_call_code(RESET[0], {"vis": vis, **RESET[1]}), 600)
    _cell_value(kernels.execute(kc, SERVER_LOG, 300))
    for label, task, kwargs, cleanup in plan:
        _rm(cleanup)
        reply = kernels.execute(kc, PROFILE_CALL.format(task=task, kwargs=kwargs, mark=MARK), 900)
        name = label.replace(" ", "_")
        (folder / f"p1_kernel_{name}_cprofile.txt").write_text(reply.stdout)
        found = marked_lines(reply.stdout)
        _cell_value(kernels.execute(kc, SERVER_LOG, 300))
        logs = _cell_value(
            kernels.execute(kc, f"print({MARK!r} + __import__('json').dumps(_blogs))")
        )
        if not found or logs is None:
            out[label] = {"error": f"{reply.ename}: {reply.evalue}"}
            continue
        t0, t1 = found[-1]["call"]
        jobs = sorted((j for server in logs for j in server), key=lambda j: j[2])
        out[label] = {
            "call_s": t1 - t0,
            "before_first_job_s": (jobs[0][2] - t0) if jobs else None,
            "after_last_job_s": (t1 - max(j[3] for j in jobs)) if jobs else None,
            "jobs": [
                {
                    "rank": j[4],
                    "vis": os.path.basename(j[1] or ""),
                    "start_s": j[2] - t0,
                    "run_s": j[3] - j[2],
                }
                for j in jobs
            ],
        }
        _rm(cleanup)
    return out


# -- mpicasa --------------------------------------------------------------------------------


def run_mpicasa(data: Data, repeats: int, work: Path, nprocs: int = 3) -> dict[str, Any]:
    facts = mpicasa_env.ensure()
    vis = data.mms
    out = str(work / "mpicasa-split.mms")
    result_path = work / "mpicasa-result.json"
    spec = {
        "repeats": repeats,
        "reset": [RESET[0], {"vis": vis, **RESET[1]}],
        "steps": [list(s) for s in steps(vis, data.caltable, out)],
        "result": str(result_path),
    }
    spec_path = work / "mpicasa-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = mpi_env()
    env["PATH"] = str(mpicasa_env.VENV / "bin") + os.pathsep + env["PATH"]
    env["CASA_KERNEL_LOG_DIR"] = str(OUT / "logs-mpicasa")
    os.makedirs(env["CASA_KERNEL_LOG_DIR"], exist_ok=True)
    cmd = mpiexec_cmd(
        nprocs,
        mpicasa_env.python(),
        str(BENCH / "mpicasa_script.py"),
        str(spec_path),
        mpiexec=mpicasa_env.mpiexec(),
    )
    log("mpicasa:", " ".join(cmd))
    t_launch = time.time()
    proc = subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = proc.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise
    t_exit = time.time()
    (OUT / "mpicasa-output.txt").write_text(output)
    if not result_path.exists():
        raise RuntimeError(
            f"mpicasa run failed (rc {proc.returncode}); see bench/out/mpicasa-output.txt"
        )
    res = json.loads(result_path.read_text())
    if res["errors"]:
        raise RuntimeError(f"mpicasa: {res['errors']}")
    _rm([out, out + ".flagversions"])
    flagged = _flag_fraction(vis)
    return {
        "times": res["times"],
        "command": " ".join(cmd),
        "launch_to_script_s": res["t_script"] - t_launch,
        "import_s": res["import_s"],
        "start_services_s": res["start_services_s"],
        "start_s": res["t_script"] - t_launch + res["import_s"] + res["start_services_s"],
        "stop_s": t_exit - res["t_tasks_done"],
        "total_wall_s": t_exit - t_launch,
        "rc": proc.returncode,
        "memory_idle": res["memory_idle"],
        "memory_after": res["memory_after"],
        "flagged_fraction": flagged,
        "venv": facts.get("freeze", facts.get("packages")),
    }


# -- the section --------------------------------------------------------------------------------


def run(data: Data, repeats: int) -> dict[str, Any]:
    work = OUT / "p1-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result: dict[str, Any] = {
        "data": {
            "size": data.size,
            "ms_mb": data.ms_bytes / 1e6,
            "mms_mb": data.mms_bytes / 1e6,
            "rows": data.rows,
            "submms": len(data.submms),
        },
        "repeats": repeats,
        "systems": {},
    }
    for name, fn in (
        ("serial", run_serial),
        ("limit", run_limit),
        ("casa-kernel", run_kernel),
        ("mpicasa", run_mpicasa),
    ):
        log(f"P1 {name} ...")
        t0 = time.perf_counter()
        result["systems"][name] = fn(data, repeats, work)
        log(
            f"P1 {name} done in {time.perf_counter() - t0:.0f} s: "
            + ", ".join(f"{k} {med(v):.2f}" for k, v in result["systems"][name]["times"].items())
        )
    result["ratios"] = ratios(result["systems"])
    return result


TARGET_LIMIT_SPEED = 0.90  # >= 90 % of the limit's speed (rflag, applycal)
TARGET_VS_MPICASA = 0.70  # <= 0.7x mpicasa's task time (every task)


def ratios(systems: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for label in LABELS:
        m = {name: med(s["times"][label]) for name, s in systems.items()}
        ck = m["casa-kernel"]
        row = {
            "median_s": m,
            "speedup_vs_serial": m["serial"] / ck,
            "fraction_of_limit_speed": m["limit"] / ck,
            "vs_mpicasa": ck / m["mpicasa"],
        }
        row["target_limit"] = (
            row["fraction_of_limit_speed"] >= TARGET_LIMIT_SPEED
            if label in ("flagdata rflag", "applycal")
            else None
        )
        row["target_mpicasa"] = row["vs_mpicasa"] <= TARGET_VS_MPICASA
        out[label] = row
    return out
