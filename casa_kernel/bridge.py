"""Serve casatasks' parallel layer from the ipyparallel servers: the ONE fence
around casatasks' private surface.

casatasks reaches MPI servers through ``casampi``, which it imports inside
``try`` blocks of private modules. We serve the part of casampi it uses, IN THE
KERNEL PROCESS ONLY, through ``sys.modules`` (``install``), so CASA's own job
generation, output assembly, result consolidation and parallel imagers run
unchanged, and the servers run the pieces:

- ``MPIEnvironment`` / ``MPICommandClient`` (casampi_tasks.py): ParallelTaskHelper
  and ParallelDataHelper (one job per sub-MS of a Multi-MS).
- ``MPIInterface`` (casampi_imaging.py): tclean's continuum imager
  (``specmode='mfs'``, ``parallel=True``): string commands (``toolsi.makepsf()``...)
  run in the servers' namespace, every server gridding its share of the data.
- Cubes (casampi_cube.py; tclean with every specmode but ``mfs``;
  deconvolve and sdintimaging where CASA parallelises them): CASA's C++ channel
  parallelism needs its client inside the servers' MPI world, which the kernel
  is not. So the call runs on server rank 0 as that client (casampi stand-in
  patched into the task's module there) while the other servers serve it from
  ``synthesisimager().initmpi()``; the images are CASA's own, equal to serial.
  Below ``MIN_CUBE_SERVERS`` (one worker only) cubes run serially in the kernel.

Why not a real ``casampi``: with it installed, ``import casatasks`` under
mpiexec turns every rank > 0 into a casampi server and never returns.

Everything private we depend on is named in this module: the module names and
their ``mpi_available`` flags, the names a task module reads casampi through,
the command forms (``'<task>()'`` with parameters, ``'push'``, Python strings,
the continuum imager's ``toolsi.<step>(...)``)
and response fields (``successful``, ``ret``, ``traceback``, ``parameters``,
``command``, ``server``), and the one-second poll in
``parallel_imager_helper.checkJobs``. The served classes (in the casampi_*
modules, re-exported here) carry the casampi attributes: tests/test_imaging.py
scans casatasks' source and fails when one it uses is not served.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import re
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

from casa_kernel.errors import CasaKernelError, ClusterError, RemoteError

# The casatasks releases whose private surface this module was read from and
# tested against (pyproject pins the same).
SUPPORTED_CASATASKS = ("6.7.0.31",)


class UnsupportedCasaError(CasaKernelError, ImportError):
    """casatasks is a release whose private parallel layer we have not read."""


def _check_version() -> str:
    # importlib.metadata, not casatasks.version_string(): importing casatasks
    # here would import its parallel helpers before install() serves casampi.
    try:
        version = importlib.metadata.version("casatasks")
    except importlib.metadata.PackageNotFoundError as exc:
        raise UnsupportedCasaError("casatasks is not installed") from exc
    if version not in SUPPORTED_CASATASKS:
        raise UnsupportedCasaError(
            f"casatasks {version} is installed; casa-kernel serves the private parallel "
            f"layer of casatasks {', '.join(SUPPORTED_CASATASKS)} only"
        )
    return version


CASATASKS_VERSION = _check_version()

# casatasks' parallel layer for Multi-MS tasks (ParallelTaskHelper also merges
# the per-sub-MS results: casa/merge.py).
TASK_HELPER = "casatasks.private.parallel.parallel_task_helper"
DATA_HELPER = "casatasks.private.parallel.parallel_data_helper"
# Private modules that decide at import whether casampi exists.
MPI_IMPORTERS = (
    TASK_HELPER,
    DATA_HELPER,
    "casatasks.private.imagerhelpers.parallel_imager_helper",
    "casatasks.private.task_tclean",
    "casatasks.private.task_deconvolve",
    "casatasks.private.task_sdintimaging",
)
_IMAGER_HELPER = "casatasks.private.imagerhelpers.parallel_imager_helper"
# Where CASA's C++ cube parallelism is switched on (cppparallel); when is
# casampi_imaging._goes_cpp_parallel (task_tclean's own test: specmode != 'mfs').
CPP_PARALLEL_TASKS = {
    "tclean": "casatasks.private.task_tclean",
    "deconvolve": "casatasks.private.task_deconvolve",
    "sdintimaging": "casatasks.private.task_sdintimaging",
}
# The module-level names through which a task of CPP_PARALLEL_TASKS reads
# casampi and builds its imager.
TASK_MODULE_NAMES = ("mpi_available", "MPIEnvironment", "MPIInterface", "synthesisimager")
# What a task's command to its imager contains when it puts the servers in C++
# MPI mode (``synthesisimager().initmpi()``) to serve a C++ client in their world.
CPP_MPI_COMMAND = "initmpi"

# parallel_imager_helper's commands to the servers' imagers are
# ``toolsi.<step>(...)``; what the steps mean, for the progress display.
IMAGER_STEPS = {
    "selectdata": "selecting data",
    "defineimage": "defining images",
    "setweighting": "weighting",
    "makepsf": "making the psf",
    "makepb": "making the primary beam",
    "executemajorcycle": "major cycle",
}
MAJOR_CYCLE_STEP = "executemajorcycle"
_IMAGER_COMMAND = re.compile(r"\btoolsi\.(\w+)\(")

_session: Any = None  # the kernel's ClusterSession


# -- casampi numbering ---------------------------------------------------------
# casampi numbers servers 1..N (rank 0 is its client); ours are ranks 0..N-1 of
# the servers' own world. These two functions are the only place that converts.


def server_of(rank: int) -> int:
    return rank + 1


def rank_of(server: int) -> int:
    return server - 1


def _server_ranks() -> list[int]:
    cluster = _session.cluster if _session is not None else None
    if cluster is None:
        return []
    return [server_of(r) for r in range(cluster.config.nservers)]


def _cluster() -> Any:
    if _session is None:
        raise ClusterError("casa-kernel's bridge is not installed")
    return _session.require()


def _active() -> bool:
    return _session is not None and _session.active


# -- casampi's commands and responses -------------------------------------------

PUSH = "push"  # bind the parameters in the targets' namespace


def task_of(command: str) -> str:
    """The task a ``'<task>()'`` command runs ('' for any other command)."""
    return command[:-2] if command.endswith("()") else ""


def response(
    request_id: int,
    command: str,
    parameters: Any,
    value: Any,
    failure: Any,
    server: int | None,
    host: str | None,
) -> dict[str, Any]:
    """One request's response, as casampi's client returns it."""
    return {
        "id": request_id,
        "command": command,
        "parameters": parameters,
        "successful": failure is None,
        "ret": value,
        "traceback": failure.traceback if failure else None,
        "failure": failure,
        "server": server,
        "host": host,
        "mode": "eval",
    }


def raise_failures(responses: list[dict[str, Any]]) -> None:
    failures = [r["failure"] for r in responses if not r["successful"]]
    if failures:
        raise RemoteError(failures)


def values_by_server(responses: list[dict[str, Any]]) -> dict[int, Any]:
    return {r["server"]: r["ret"] for r in responses}


def value_of(response: dict[str, Any]) -> Any:
    return response["ret"]


# -- casatasks' private modules, used and patched ---------------------------------


def imager_step(command: str) -> str:
    """The imager step a continuum command runs ('makepsf'...; '' for another command)."""
    match = _IMAGER_COMMAND.search(command)
    return match.group(1) if match else ""


def parallel_task_helper() -> Any:
    """casatasks' ParallelTaskHelper class (its result-merging helpers)."""
    return importlib.import_module(TASK_HELPER).ParallelTaskHelper


def answer_polls_at_once() -> None:
    """parallel_imager_helper.checkJobs sleeps 1 s before every poll; our
    check_job waits on the jobs' events, so that sleep only adds 1 s per step."""
    helper = importlib.import_module(_IMAGER_HELPER)
    if not isinstance(helper.time, types.SimpleNamespace):
        import time

        helper.time = types.SimpleNamespace(sleep=lambda seconds: None, time=time.time)


@contextlib.contextmanager
def cpp_client_module(
    name: str, environment: Any, interface: Any, imager: Callable[[Any], Any]
) -> Iterator[Any]:
    """While open, task ``name``'s module (on a server) sees casampi as
    ``environment`` and ``interface`` and builds its imager with
    ``imager(real synthesisimager)``; yields the real synthesisimager."""
    module = importlib.import_module(CPP_PARALLEL_TASKS[name])
    real_imager = module.synthesisimager
    saved = {k: module.__dict__[k] for k in TASK_MODULE_NAMES if k in module.__dict__}
    module.mpi_available = True
    module.MPIEnvironment = environment
    module.MPIInterface = types.SimpleNamespace(MPIInterface=interface)
    module.synthesisimager = imager(real_imager)
    try:
        yield real_imager
    finally:
        for key in TASK_MODULE_NAMES:
            module.__dict__.pop(key, None)
        module.__dict__.update(saved)


# -- installation -------------------------------------------------------------

# The served classes live above this module (they use the dispatcher); tests and
# callers may still name them here.
_SERVED = {
    "MPIEnvironment": "casa_kernel.casampi_tasks",
    "MPICommandClient": "casa_kernel.casampi_tasks",
    "MPIInterface": "casa_kernel.casampi_imaging",
    "_InterfaceCore": "casa_kernel.casampi_imaging",
}


def __getattr__(name: str) -> Any:
    if name in _SERVED:
        return getattr(importlib.import_module(_SERVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def install(session: Any) -> None:
    """Make ``import casampi...`` in this process find our client surface, and
    route the notebook's imaging tasks.

    Must run before casatasks' parallel helpers are imported; refuses to run
    after, since they would already have decided there is no MPI.
    """
    from casa_kernel import casampi_imaging, casampi_tasks
    from casa_kernel.casa import tasks

    global _session
    _session = session
    for name in MPI_IMPORTERS:
        helper = sys.modules.get(name)
        if helper is not None and not getattr(helper, "mpi_available", False):
            raise ClusterError(f"{name} was imported before casa-kernel's bridge was installed")
    package = types.ModuleType("casampi")
    package.__path__ = []  # a package, so `import casampi.X` looks in sys.modules
    package.__doc__ = "casa-kernel's stand-in for casampi's client API (kernel process only)"
    modules = {
        "MPIEnvironment": casampi_tasks.MPIEnvironment,
        "MPICommandClient": casampi_tasks.MPICommandClient,
        "MPIInterface": casampi_imaging.MPIInterface,
    }
    sys.modules["casampi"] = package
    for attr, cls in modules.items():
        module = types.ModuleType(f"casampi.{attr}")
        setattr(module, attr, cls)
        setattr(package, attr, module)
        sys.modules[f"casampi.{attr}"] = module
    for name in CPP_PARALLEL_TASKS:
        tasks.routes[name] = casampi_imaging.route_imaging(name)
