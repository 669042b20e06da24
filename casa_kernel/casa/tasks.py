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
import sys
import threading
from pathlib import Path
from typing import Any

from casa_kernel.casa import loading
from casa_kernel.casa.outputs import CallOutputs, full_disk
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
# name -> route(task, args, kwargs). Filled by casa_kernel.casampi.bridge, which lives
# above casa/ (the ladder); casa/ only knows that a route may exist.
routes: dict[str, Any] = {}
# The route of a call that writes a new MS (``outputvis``) and has no route of
# its own: name -> route. Set by the bridge (a serial split of a plain MS runs
# on a server: casacore on a full disk aborts the process that writes).
new_ms_route: Any = None
# casatasks' own task objects by name, once the package's names are the
# notebook's (the kernel process only: serve_notebook_tasks).
_originals: dict[str, Any] = {}


def record_failure(failure: ServerFailure) -> None:
    """Called by the bridge for each failed sub-MS job of the current task call."""
    failures = getattr(_local, "failures", None)
    if failures is not None:
        failures.append(failure)


def writing() -> list[str]:
    """Where the task call in progress in this thread writes ([] outside one):
    a server that dies while that is on a full disk died of it."""
    return list(getattr(_local, "writes", None) or [])


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
        params = call_arguments(task, args, kwargs)
        # what this call may create, and what of it was there before
        outputs = CallOutputs.of(params)
        outputs.check_space(self.name, params)
        _local.failures = failures = []
        _local.writes = outputs.written
        route = routes.get(self.name)
        if route is None and outputs.made and new_ms_route is not None:
            route = new_ms_route(self.name)
        try:
            ret = route(task, args, kwargs) if route else task(*args, **kwargs)
        except Exception as exc:
            full = full_disk(self.name, failures, str(exc), outputs.written)  # before clean-up
            outputs.remove()  # the task raised: nothing it began is valid
            if full is not None:
                raise full from exc
            raise
        except BaseException:
            outputs.remove()
            raise
        finally:
            _local.failures = _local.writes = None
        real = [
            f for f in failures if not any(b in f.traceback + f.evalue for b in _BENIGN_FAILURES)
        ]
        if real:
            full = full_disk(self.name, real, "", outputs.written)
            outputs.remove()
            if full is not None:
                raise full from RemoteError(real, results=ret)
            raise RemoteError(real, results=ret)
        outputs.remove_leftovers()
        return ret


def call_arguments(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """This call's arguments by name (a cell may pass ``vis`` by position)."""
    if not args:
        return dict(kwargs)
    try:
        return dict(inspect.signature(task).bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return dict(kwargs)  # the task itself says what is wrong with the call


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
