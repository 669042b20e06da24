"""Importing casatasks: in ONE loader thread, waited for with a deadline, casampi kept out.

Why casampi is kept out of every process that is not the kernel
(:func:`keep_casampi_out`). casatasks' ``__init__`` imports
``casampi.MPIEnvironment`` and then, unless a ``casalith`` module exists,
``casampi.private.start_mpi``. Under mpiexec (``OMPI_COMM_WORLD_RANK`` set)
casampi 0.6.0's MPIEnvironment initialises MPI through mpi4py 4 and
``start_mpi`` makes every rank but 0 a casampi server: ``server_run.run()``
polls for casampi's commands forever, INSIDE ``import casatasks``. On our
servers that import runs in the preload thread, which then holds casatasks'
module lock for good; the first task sent to that server waits on the lock and
the kernel waits on the task (seen with py-spy in ``casa-kernel demo``'s
partition: rank 1's "casa-preload" thread in ``server_run.py:89`` under
``casatasks/__init__.py:284``, its main thread in ``_ModuleLock.acquire``).
(casampi 0.5.6, the one casadocs pairs with 6.7.0, sets mpi4py's
``rc.threaded``, which mpi4py 4 no longer has: its MPI set-up fails, it
reports MPI disabled and stays inert; 0.6.0 sets ``rc.threads`` and serves.)

``sys.modules["casampi"] = None`` makes every ``import casampi...`` raise
``ModuleNotFoundError``, exactly what casatasks sees where casampi is not
installed, so the servers run casatasks as they do without it: no MPI set up
by casampi (thread level, 150 MB buffer), no server loop, the helpers'
``mpi_available`` False (tasks run serially on their sub-MS, as they must).
Not a ``casalith`` marker module: casatasks would also call itself the
monolithic variant ("CASA Version CASALITH") and defer to a casa shell that
does not exist. The kernel has its own ``casampi`` in ``sys.modules`` (the
bridge, installed before anything imports casatasks), where
``casampi.private`` cannot be imported either; this function leaves it alone.

Why a loader thread and a deadline (:func:`casatasks_module`). A server that
cannot import CASA (broken install, missing data, an import that never ends)
must say so, naming itself, within the start-up limit, not leave a task
waiting forever on the import lock. The import runs in one thread; callers
wait for it with a deadline counted from when it began (the cluster's
``start_timeout`` on servers: :data:`limit`), and an import still running
then is reported with where it is stuck.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
import traceback
from types import ModuleType

from casa_kernel import variables
from casa_kernel.errors import CasaKernelError

# Seconds an import of casatasks may take before callers give up (None: no
# limit, the kernel: a cell waiting on it can be interrupted). Servers set it
# to the cluster's start_timeout (server/engine.py setup_server).
limit: float | None = None
# Frames of a stuck import shown in the error (the innermost ones).
STACK_FRAMES = 8


class CasaImportError(CasaKernelError, ImportError):
    """casatasks could not be imported in this process (raised, or never finished)."""


def keep_casampi_out() -> None:
    """``import casampi`` fails in this process as if casampi were not installed
    (see the module docstring); a casampi already in ``sys.modules`` (the
    kernel's stand-in, or a real one imported before) is left as it is."""
    sys.modules.setdefault("casampi", None)  # type: ignore[arg-type]


class _Attempt:
    """One import of casatasks, in its own thread."""

    def __init__(self) -> None:
        self.began = time.monotonic()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="casa-import", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            # numpy first, and fully: casatools' C++ static initialisers (casacore's
            # numpy converters, table_getcoliter.cc) import numpy from INSIDE
            # dlopen, i.e. holding the dynamic loader's lock. If numpy is not
            # imported yet, that runs Python code, which hands the GIL to other
            # threads; the first of them to load any extension module (the
            # cluster thread importing ipyparallel, a cell's `import scipy`,
            # mpi4py's MPI_Init) then waits for the loader lock while holding the
            # GIL, and both threads wait forever (seen with py-spy: the kernel hung
            # in dlopen of pyexpat vs casatools' _image.so). With numpy already in
            # sys.modules the initialisers only look it up, GIL held.
            importlib.import_module("numpy")
            importlib.import_module("casatasks")
        except BaseException as exc:  # reported to every caller waiting for it
            self.error = exc
        finally:
            self.done.set()

    def where(self) -> str:
        """The innermost frames of the import while it runs."""
        frame = sys._current_frames().get(self.thread.ident or -1)
        if frame is None:
            return ""
        return "".join(traceback.format_stack(frame)[-STACK_FRAMES:])


_lock = threading.Lock()
_attempt: _Attempt | None = None


def casatasks_module(timeout: float | None = None) -> ModuleType:
    """The casatasks package, imported by the loader thread if not yet done.

    Waits at most ``timeout`` (default :data:`limit`) seconds from when the
    import began; raises :class:`CasaImportError` with the reason (the
    import's exception, or where it is stuck). A failed import is tried again
    by the next call (an installation fixed meanwhile is then picked up).
    """
    global _attempt
    with _lock:
        attempt = _attempt
        if attempt is None or (attempt.done.is_set() and attempt.error is not None):
            if attempt is None and _imported():
                return sys.modules["casatasks"]  # imported before us (a cell, a test)
            attempt = _attempt = _Attempt()
    if timeout is None:
        timeout = limit
    remaining = None if timeout is None else max(0.0, attempt.began + timeout - time.monotonic())
    if not attempt.done.wait(remaining):
        raise CasaImportError(
            f"import casatasks did not finish within {timeout:g} s (the cluster's start "
            f"timeout, {variables.START_TIMEOUT}); it is at:\n{attempt.where()}"
        )
    if attempt.error is not None:
        error = attempt.error
        raise CasaImportError(
            f"import casatasks failed: {type(error).__name__}: {error}"
        ) from error
    return sys.modules["casatasks"]


def wait_if_loading() -> None:
    """If casatasks is being imported in the loader thread, wait until it is done.

    casacore is not thread-safe: casatools used in one thread while another
    imports casatasks (which makes tools and logs) can crash the process in
    C++ -- `casa-kernel demo` rerun in the same folder died so in its
    simulate_ms cell, beside the kernel's preload. The wait is an Event's:
    Ctrl-C interrupts it. Nothing is imported here."""
    attempt = _attempt
    if attempt is not None:
        attempt.done.wait()


def _imported() -> bool:
    module = sys.modules.get("casatasks")
    spec = getattr(module, "__spec__", None)
    return module is not None and not getattr(spec, "_initializing", False)
