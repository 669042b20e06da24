"""casatasks' private surface: the ONE module that names it.

casatasks reaches MPI servers through ``casampi``, which it imports inside
``try`` blocks of private modules; casa-kernel serves that part of casampi
(casa_kernel/casampi/bridge.py) and drives casatasks' parallel helpers. Everything
private we depend on is named here: the release read and tested (checked at
import), the module names and their ``mpi_available`` flags, the names a task
module reads casampi through, the commands of the continuum imager
(``toolsi.<step>(...)``), the cube tasks' C++ MPI switch, and the one-second poll
in ``parallel_imager_helper.checkJobs``. The casampi command and response forms
casatasks uses are in the bridge, which serves them; tests/test_imaging.py scans
casatasks' source and fails when an attribute it uses is not served.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import re
import types
from collections.abc import Callable, Iterator
from typing import Any

from casa_kernel.errors import CasaKernelError

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
# casampi/cube.py's goes_cpp_parallel (task_tclean's own test: specmode != 'mfs').
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
