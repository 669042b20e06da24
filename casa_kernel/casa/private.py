"""casatasks' private surface: the ONE module that names it.

casatasks reaches MPI servers through ``casampi``, which it imports inside
``try`` blocks of private modules; casa-kernel serves that part of casampi
(casa_kernel/casampi/bridge.py) and drives casatasks' parallel helpers. Everything
private we depend on is named here: the releases read and tested (RELEASES: what
each one needs of the kernel; an older one is refused at import, a newer one is
scanned at start-up), the module names and their ``mpi_available`` flags, the names a task
module reads casampi through, the commands of the continuum imager
(``toolsi.<step>(...)``), the cube tasks' C++ MPI switch, and the one-second poll
in ``parallel_imager_helper.checkJobs``. The casampi command and response forms
casatasks uses are in the bridge, which serves them; casa/contract.py scans
casatasks' source for them (tests/test_casa_releases.py: every release in RELEASES).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import re
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from casa_kernel.errors import CasaKernelError


@dataclass(frozen=True)
class Release:
    """What one casatasks release's parallel layer is to the kernel, as read."""

    # the CPython versions casatools has wheels for
    # (`pip index versions casatools --only-binary :all: --python-version X`)
    pythons: str
    differs: str  # its parallel layer against 6.7.0.31's, and what the kernel does about it
    run_here: bool = False  # also run end to end on this machine (CI: .ci/run)


# Every casatasks release of 6.6 and 6.7 on PyPI: its wheel unzipped and its parallel
# layer (parallel_task_helper, parallel_data_helper, parallel_imager_helper,
# task_tclean, __init__) diffed against 6.7.0.31's, and scanned
# (tests/test_casa_releases.py). What the kernel must do differently is nothing
# so far: the casampi names, command forms and control flow it serves are the
# same in all of them. A release that needs something of its own gets a field here.
_SAME_67 = "the same as 6.7.0.31 (task_tclean: input checks moved to sanitize_tclean_inputs)"
_PY2_66 = (
    "the same names and control flow as 6.7.0.31; Python 2 / CASA 5 branches "
    "(is_CASA6, mpi4casa) never taken in CASA 6"
)
RELEASES: dict[str, Release] = {
    "6.6.0.20": Release("3.8, 3.10", _PY2_66 + "; task_tclean in its older form"),
    "6.6.3.22": Release("3.8, 3.10", _PY2_66 + "; task_tclean in its older form"),
    "6.6.4.34": Release("3.8, 3.10", _PY2_66),
    "6.6.5.31": Release("3.8, 3.10, 3.11", _PY2_66, run_here=True),
    "6.7.0.31": Release("3.10, 3.11, 3.12", "the release the kernel was written against", True),
    "6.7.2.42": Release("3.12, 3.13", _SAME_67),
    "6.7.3.21": Release("3.12, 3.13", _SAME_67),
    "6.7.5.18": Release("3.12, 3.13", _SAME_67),
    "6.7.6.14": Release("3.12, 3.13", _SAME_67),
}


def release_key(version: str) -> tuple[int, ...]:
    """'6.7.0.31' -> (6, 7, 0, 31), for ordering releases (non-numbers count 0)."""
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))


OLDEST_READ = min(RELEASES, key=release_key)
NEWEST_READ = max(RELEASES, key=release_key)


class UnsupportedCasaError(CasaKernelError, ImportError):
    """casatasks is missing, or older than every release whose parallel layer we read."""


def _check_version() -> str:
    # importlib.metadata, not casatasks.version_string(): importing casatasks
    # here would import its parallel helpers before install() serves casampi.
    try:
        version = importlib.metadata.version("casatasks")
    except importlib.metadata.PackageNotFoundError as exc:
        raise UnsupportedCasaError("casatasks is not installed") from exc
    if release_key(version) < release_key(OLDEST_READ):
        raise UnsupportedCasaError(
            f"casatasks {version} is installed; casa-kernel serves the parallel layer of "
            f"casatasks {OLDEST_READ} to {NEWEST_READ} (and checks newer ones at start-up): "
            f"pip install 'casatasks>={OLDEST_READ}' 'casatools>={OLDEST_READ}'"
        )
    return version


CASATASKS_VERSION = _check_version()
# A release not in RELEASES (a newer one): the kernel scans its parallel layer at
# start-up instead (casampi/bridge.py's check_release) and runs.
READ = CASATASKS_VERSION in RELEASES

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


# ParallelDataHelper.postExecution assembles the output Multi-MS in the client
# process: partitionhelper.makeMMS (createmultims, sub-tables copied) and, for a
# Multi-MS made by spw, mstransformer.mergespwtables. casacore writing there on a
# full disk throws from a destructor: "terminate called", the process aborted.
_PARTITION_HELPER = "casatasks.private.partitionhelper"
ASSEMBLY_STEPS = ("makeMMS", "mergespwtables")


def assemble_through(runner: Callable[[str, tuple[Any, ...]], Any]) -> None:
    """From now on ParallelDataHelper's writing steps in this process are
    ``runner(step, args)`` (a step of ASSEMBLY_STEPS; the kernel sends them to a
    server, where :func:`run_assembly_step` runs them)."""
    helper = importlib.import_module(DATA_HELPER)
    if isinstance(helper.ph, _PartitionHelper):
        helper.ph.runner = runner
        return
    helper.ph = _PartitionHelper(helper.ph, runner)
    real_transformer = helper.mstransformer

    def mstransformer() -> Any:
        return _SpwMerger(real_transformer(), helper.ph)

    helper.mstransformer = mstransformer


def run_assembly_step(step: str, args: tuple[Any, ...]) -> Any:
    """Run one of ASSEMBLY_STEPS in this process."""
    if step == "makeMMS":
        return importlib.import_module(_PARTITION_HELPER).makeMMS(*args)
    if step == "mergespwtables":
        from casatools import mstransformer

        tool = mstransformer()
        try:
            return tool.mergespwtables(*args)
        finally:
            tool.done()
    raise ValueError(f"not a step of the Multi-MS assembly: {step!r}")


class _PartitionHelper:
    """partitionhelper as ParallelDataHelper sees it: makeMMS through the runner."""

    def __init__(self, module: Any, runner: Callable[[str, tuple[Any, ...]], Any]):
        self.module, self.runner = module, runner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)

    def makeMMS(self, *args: Any) -> Any:  # noqa: N802 (casatasks' name)
        return self.runner("makeMMS", args)


class _SpwMerger:
    """An mstransformer whose mergespwtables goes through the runner."""

    def __init__(self, tool: Any, helper: _PartitionHelper):
        self.tool, self.helper = tool, helper

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tool, name)

    def mergespwtables(self, *args: Any) -> Any:
        return self.helper.runner("mergespwtables", args)


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
