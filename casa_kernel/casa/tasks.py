"""CASA's tasks in a namespace, as in the casa shell, imported on first use.

Used in the kernel (where the bridge may send them to the servers) and on the
servers (where they run serially on one sub-MS).
"""

from __future__ import annotations

import gc
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

from casa_kernel.casa import loading
from casa_kernel.errors import RemoteError, ServerFailure, SpaceError

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
# name -> route(task, args, kwargs). Filled by casa_kernel.casampi.bridge, which lives
# above casa/ (the ladder); casa/ only knows that a route may exist.
routes: dict[str, Any] = {}
# casatasks' own task objects by name, once the package's names are the
# notebook's (the kernel process only: serve_notebook_tasks).
_originals: dict[str, Any] = {}


def record_failure(failure: ServerFailure) -> None:
    """Called by the bridge for each failed sub-MS job of the current task call."""
    failures = getattr(_local, "failures", None)
    if failures is not None:
        failures.append(failure)


def forget_failures() -> None:
    """The current call starts over (after its servers died): what failed in the
    lost attempt is not this call's failure."""
    failures = getattr(_local, "failures", None)
    if failures is not None:
        failures.clear()


def _casatasks() -> Any:
    global _quietened
    # casampi out first: what casatasks' import does with it never ends on a
    # server (casa/loading.py); in the kernel the bridge's stand-in stays.
    loading.keep_casampi_out()
    # imported in ONE loader thread (numpy first: see loading.py), waited for
    # with the servers' start-up limit
    module = loading.casatasks_module()
    if not _quietened:
        module.casalog.filterMsg(_NOISE)
        # CASA echoes INFO lines of its tools (the simulator...) to the console,
        # i.e. into the cell; keep those in the log file. WARN and SEVERE still
        # reach the console, hence the notebook.
        module.casalog.showconsole(False)
        _quietened = True
    return module


def preload() -> None:
    """Import casatasks (and casatools under it) now, so the first task call does
    not pay for it. Runs in a background thread (kernel.py, engine.setup_server).

    Safe in a thread: the import runs in casa/loading.py's loader thread, numpy
    before casatools.
    """
    _casatasks()
    from casa_kernel.casa.private import DATA_HELPER, TASK_HELPER

    # the modules casatasks' parallel layer is made of (they read the bridge)
    importlib.import_module(TASK_HELPER)
    importlib.import_module(DATA_HELPER)
    # CASA leaves ~150,000 objects the garbage collector would scan in every
    # full collection (~60 ms each, measured); they live as long as the process.
    # Frozen, they are never scanned again: no such pauses in a long session.
    gc.freeze()


def task_names() -> list[str]:
    """casatasks' task names, without importing casatasks (each has an XML)."""
    try:
        spec = importlib.util.find_spec("casatasks")
    except (ImportError, ValueError):
        # a broken installation: no names here; the first task call says why,
        # naming the server (a server's set-up must not fail on it)
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    xml_dir = Path(next(iter(spec.submodule_search_locations))) / "__xml__"
    return sorted(p.stem for p in xml_dir.glob("*.xml"))


class CasaTask:
    """A casatasks task, imported on first use.

    While a cluster runs, tasks that CASA parallelises over a Multi-MS go to the
    servers through the bridge. A task that writes ``outputvis`` keeps its output
    only when every sub-MS succeeded (selection that empties a sub-MS aside):
    otherwise what the call made (the output, its flag versions, CASA's
    ``<output>.data`` folder of sub-MS outputs) is removed and the error names
    the sub-MS, server rank and host. Nothing that existed before is touched.
    """

    def __init__(self, name: str):
        self.__name__ = self.name = name
        self.__qualname__ = name

    def _task(self) -> Any:
        module = _casatasks()
        original = _originals.get(self.name)
        return original if original is not None else getattr(module, self.name)

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
        if getattr(_local, "failures", None) is not None:
            # Called from inside a task call of this thread (casatasks' serial
            # ParallelTaskHelper runs `from casatasks import *; flagdata(...)` per
            # sub-MS): that is casatasks' own call, done as casatasks does it.
            return task(*args, **kwargs)
        outputvis = _argument(task, "outputvis", args, kwargs)
        # what this call may create, and what of it was there before
        made = [p for p in _partial_outputs(outputvis) if not os.path.lexists(p)]
        if made:
            _check_space(self.name, _argument(task, "vis", args, kwargs), made[0])
        _local.failures = failures = []
        route = routes.get(self.name)
        try:
            ret = route(task, args, kwargs) if route else task(*args, **kwargs)
        except BaseException:
            _remove_outputs(made)  # the task raised: nothing it began is valid
            raise
        finally:
            _local.failures = None
        real = [
            f for f in failures if not any(b in f.traceback + f.evalue for b in _BENIGN_FAILURES)
        ]
        if real:
            _remove_outputs(made)
            for failure in real:
                if "No space left on device" in failure.evalue + failure.traceback:
                    where = f" (sub-MS {failure.submms})" if failure.submms else ""
                    failure.evalue = (
                        f"{self.name}{where}: no space left on {_mount_of(made[0])} "
                        f"writing {made[0]}: {failure.evalue}"
                    )
            raise RemoteError(real, results=ret)
        # CASA's folder of sub-MS outputs is moved into the Multi-MS when all
        # went well; what is left of it was never part of a result.
        _remove_outputs([p for p in made if p.endswith(".data")])
        return ret


def _mount_of(path: str) -> str:
    """The mount point of the file system that holds (or will hold) ``path``."""
    path = os.path.abspath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def _du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _check_space(taskname: str, vis: Any, output: str) -> None:
    """Refuse, before anything runs, an output that cannot fit where it goes.

    A full disk in the middle of a parallel task ends in casacore's C++ (the
    output Multi-MS is assembled in the kernel): an AipsError thrown through C++
    aborted the kernel process. The output of split, mstransform or partition
    is at most about the input's size (averaging makes it smaller, so this errs
    on the side of refusing)."""
    if not isinstance(vis, str) or not os.path.isdir(vis):
        return
    folder = os.path.dirname(os.path.abspath(output)) or "."
    if not os.path.isdir(folder):
        return
    free = shutil.disk_usage(folder).free
    need = _du(vis)
    if need > free:
        raise SpaceError(
            f"{taskname}: no space left on {_mount_of(folder)} for {output}: the input "
            f"{vis} takes {need / 2**20:.1f} MB, {free / 2**20:.1f} MB are free; "
            "nothing was written"
        )


def _argument(task: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The value of parameter ``name`` in this call, given by keyword or position."""
    if name in kwargs or not args:
        return kwargs.get(name)
    try:
        return inspect.signature(task).bind_partial(*args, **kwargs).arguments.get(name)
    except (TypeError, ValueError):
        return None


def _partial_outputs(outputvis: Any) -> list[str]:
    """The paths a task writing ``outputvis`` may create, as casatasks 6.7 names them.

    The output MS or Multi-MS (with its sub-MSs in ``<outputvis>/SUBMSS``), its
    flag versions, and ParallelDataHelper's folder of per-sub-MS outputs,
    ``<dir>/<base>.data`` (``<base>`` without a trailing dot), made before any job
    runs and moved into the Multi-MS only at the end.
    """
    if not isinstance(outputvis, str) or not outputvis.strip():
        return []
    path = os.path.abspath(outputvis.rstrip("/"))
    folder, base = os.path.split(path)
    if base.endswith("."):
        base = base[: base.rindex(".")]
    return [path, path + ".flagversions", os.path.join(folder, base + ".data")]


def _remove_outputs(paths: list[str]) -> None:
    for path in paths:
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
        else:
            shutil.rmtree(path, ignore_errors=True)


def inject_tasks(user_ns: dict[str, Any]) -> None:
    """Put every CASA task in the namespace (not over names the user has)."""
    for name in task_names():
        user_ns.setdefault(name, CasaTask(name))


def serve_notebook_tasks() -> None:
    """From now on, casatasks' own task names in this process are the notebook's
    :class:`CasaTask` objects: ``from casatasks import *``, ``from casatasks
    import tclean`` or ``casatasks.flagdata`` in a cell or in a script written for
    mpicasa (``%run``) get the same routes (cubes to the servers), the same
    clean-up of half-made outputs and the same errors as the names the kernel puts
    in the notebook. The kernel only (the bridge installs it); servers keep
    casatasks' own functions.

    Done while casatasks' ``__init__`` is executed (a finder on ``sys.meta_path``
    wraps its loader), not after the import returns: a cell importing casatasks
    while the preload thread imports it waits on the module lock and could
    otherwise read the names before they were replaced.
    """
    module = sys.modules.get("casatasks")
    if module is not None:
        _replace_tasks(module)
    elif not any(isinstance(f, _NotebookTasksFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _NotebookTasksFinder())


def _replace_tasks(module: Any) -> None:
    for name in task_names():
        task = module.__dict__.get(name)
        if task is not None and not isinstance(task, CasaTask):
            _originals[name] = task
            setattr(module, name, CasaTask(name))
            # `from casatasks.tclean import tclean` reads the task's own module
            submodule = sys.modules.get(f"{module.__name__}.{name}")
            if submodule is not None and submodule.__dict__.get(name) is task:
                setattr(submodule, name, module.__dict__[name])


class _NotebookTasksFinder(importlib.abc.MetaPathFinder):
    """Finds casatasks where Python would, with a loader that replaces its task
    names at the end of its ``__init__`` (see :func:`serve_notebook_tasks`)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "casatasks":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _ReplacingLoader(spec.loader)
        return spec


class _ReplacingLoader(importlib.abc.Loader):
    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:  # get_source, resource readers...
        return getattr(self.inner, name)

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.inner.exec_module(module)
        _replace_tasks(module)
