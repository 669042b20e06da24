"""CASA's tasks in a namespace, as in the casa shell, imported on first use.

Used in the kernel (where the bridge may send them to the servers) and on the
servers (where they run serially on one sub-MS).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from casa_kernel.errors import RemoteError, ServerFailure

_local = threading.local()

# Selection that leaves a sub-MS without data makes its job fail; CASA treats
# that as normal (the sub-MS is left out of the output Multi-MS), so do we.
_BENIGN_FAILURES = ("NullSelection", "Data selection returned no rows", "No data selected")

# casatasks' consolidateResults posts every per-sub-MS dict as a WARN (a debug
# leftover); in a notebook that is a wall of text per call.
# The leap-second warning (the casadata wheel's table is older than today) is
# harmless for simulated and archival data and would open every session.
_NOISE = [
    "***** consolidateResults, subMS:",
    "Leap second table TAI_UTC seems out-of-date",
    "Until the table is updated (see the CASA documentation",
    "times and coordinates derived from UTC could be wrong",
]
_quietened = False

# Tasks the kernel runs its own way while a cluster is up (tclean's cubes...):
# name -> route(task, args, kwargs). Filled by casa_kernel.bridge, which lives
# above dispatch; casa/ only knows that a route may exist.
routes: dict[str, Any] = {}


def record_failure(failure: ServerFailure) -> None:
    """Called by the bridge for each failed sub-MS job of the current task call."""
    failures = getattr(_local, "failures", None)
    if failures is not None:
        failures.append(failure)


def _casatasks() -> Any:
    global _quietened
    module = importlib.import_module("casatasks")
    if not _quietened:
        module.casalog.filterMsg(_NOISE)
        # CASA echoes INFO lines of its tools (the simulator...) to the console,
        # i.e. into the cell; keep those in the log file. WARN and SEVERE still
        # reach the console, hence the notebook.
        module.casalog.showconsole(False)
        _quietened = True
    return module


def task_names() -> list[str]:
    """casatasks' task names, without importing casatasks (each has an XML)."""
    spec = importlib.util.find_spec("casatasks")
    if spec is None or not spec.submodule_search_locations:
        return []
    xml_dir = Path(next(iter(spec.submodule_search_locations))) / "__xml__"
    return sorted(p.stem for p in xml_dir.glob("*.xml"))


class CasaTask:
    """A casatasks task, imported on first use.

    While a cluster runs, tasks that CASA parallelises over a Multi-MS go to the
    servers through the bridge. A task that writes ``outputvis`` keeps its output
    only when every sub-MS succeeded (selection that empties a sub-MS aside):
    otherwise the half-made output is removed and the error names the sub-MS,
    server rank and host.
    """

    def __init__(self, name: str):
        self.__name__ = self.name = name
        self.__qualname__ = name

    def _task(self) -> Any:
        return getattr(_casatasks(), self.name)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self._task().__doc__

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self._task(), attr)

    def __repr__(self) -> str:
        return f"<CASA task {self.name}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        task = self._task()
        outputvis = kwargs.get("outputvis")
        existed = bool(outputvis) and os.path.exists(str(outputvis))
        _local.failures = failures = []
        route = routes.get(self.name)
        try:
            ret = route(task, args, kwargs) if route else task(*args, **kwargs)
        finally:
            _local.failures = None
        real = [f for f in failures if not any(b in f.traceback for b in _BENIGN_FAILURES)]
        if real:
            if outputvis and not existed:
                _remove_output(str(outputvis))
            raise RemoteError(real, results=ret)
        return ret


def _remove_output(path: str) -> None:
    """Remove a Multi-MS and its sub-MS folder (``<outputvis>/SUBMSS``)."""
    shutil.rmtree(path, ignore_errors=True)
    for extra in (path + ".flagversions",):
        shutil.rmtree(extra, ignore_errors=True)


def inject_tasks(user_ns: dict[str, Any]) -> None:
    """Put every CASA task in the namespace (not over names the user has)."""
    for name in task_names():
        user_ns.setdefault(name, CasaTask(name))
