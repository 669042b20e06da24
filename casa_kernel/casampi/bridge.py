"""Serve casatasks' parallel layer from the ipyparallel servers: the casampi surface.

casatasks reaches MPI servers through ``casampi``, which it imports inside
``try`` blocks of private modules. We serve the part of casampi it uses, IN THE
KERNEL PROCESS ONLY, through ``sys.modules`` (``install``), so CASA's own job
generation, output assembly, result consolidation and parallel imagers run
unchanged, and the servers run the pieces:

- ``MPIEnvironment`` / ``MPICommandClient`` (casampi/tasks.py): ParallelTaskHelper
  and ParallelDataHelper (one job per sub-MS of a Multi-MS).
- ``MPIInterface`` (casampi/imaging.py): tclean's continuum imager
  (``specmode='mfs'``, ``parallel=True``): string commands (``toolsi.makepsf()``...)
  run in the servers' namespace, every server gridding its share of the data.
- Cubes (casampi/cube.py in the kernel, server/cube.py on the servers; tclean
  with every specmode but ``mfs``; deconvolve and sdintimaging where CASA
  parallelises them): CASA's C++ channel parallelism needs its client inside the
  servers' MPI world, which the kernel is not. So the call runs on CASA's cube
  client, world rank 0 of the servers' mpiexec (casa/role.py; server rank 0 when
  there is none), as that client (casampi stand-in patched into the task's module
  there) while the servers serve it from ``synthesisimager().initmpi()``; the images
  are CASA's own, equal to serial. Below ``MIN_CUBE_WORKERS`` cubes run serially
  in the kernel.

Why not a real ``casampi``: with it installed, ``import casatasks`` under
mpiexec turns every rank > 0 into a casampi server and never returns. Where
casampi IS installed beside casatasks, this stand-in in ``sys.modules`` (here,
before anything imports casatasks) hides it in the kernel: casatasks'
``import casampi.private.start_mpi`` finds no such module here (the package has
no path) and is skipped, so the kernel never sets up MPI through casampi; the
servers hide it by ``sys.modules["casampi"] = None`` (casa/loading.py).

casatasks' private names (module names, flags, the release checked at import)
are in casa_kernel/casa/private.py, the fence; here are casampi's own forms: its
server numbering, the command forms (``'<task>()'`` with parameters, ``'push'``,
Python strings) and response fields (``successful``, ``ret``, ``traceback``,
``parameters``, ``command``, ``server``). The served classes (in the other
casampi/ modules, re-exported here) carry the casampi attributes:
tests/test_imaging.py scans casatasks' source and fails when one it uses is not
served.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Any

from casa_kernel.casa import contract, private
from casa_kernel.casa.config import cache_home
from casa_kernel.casa.private import CPP_MPI_COMMAND, CPP_PARALLEL_TASKS, MPI_IMPORTERS
from casa_kernel.errors import ClusterError, RemoteError

_session: Any = None  # the kernel's ClusterSession
# Why casatasks' parallel layer is not served (a release that uses a casampi name
# the kernel does not serve): its tasks then run serially, as in plain CASA.
serial_reason: str | None = None
release_notice: str | None = None  # a release not in private.RELEASES: what was checked
_told = False  # release_notice was shown in a cell


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
    return _session is not None and _session.active and serial_reason is None


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


# -- installation -------------------------------------------------------------

# The served classes live above this module (they use the dispatcher); tests and
# callers may still name them here.
_SERVED = {
    "MPIEnvironment": "casa_kernel.casampi.tasks",
    "MPICommandClient": "casa_kernel.casampi.tasks",
    "MPIInterface": "casa_kernel.casampi.imaging",
    "_InterfaceCore": "casa_kernel.casampi.imaging",
}


def __getattr__(name: str) -> Any:
    if name in _SERVED:
        return getattr(importlib.import_module(_SERVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- what the kernel serves, and a release it has not read ------------------------

# casampi's modules, as casatasks imports them (contract.py's "module" kind)
_MODULES = ("MPIEnvironment", "MPICommandClient", "MPIInterface")


def serves(kind: str, name: str) -> bool:
    """Does the kernel serve this casampi use (a :class:`contract.Use`'s kind, name)?"""
    from casa_kernel.casampi import imaging, tasks

    if kind == "module":
        return name in _MODULES
    if kind == "command":
        return name == CPP_MPI_COMMAND  # casampi/cube.py runs cubes for it
    served = {
        "env": tasks.MPIEnvironment,
        "client": tasks.MPICommandClient,
        "core": imaging._InterfaceCore,
        "iface": imaging.MPIInterface,
    }.get(kind)
    # getattr_static: without running MPIEnvironment's properties (they live on
    # its metaclass, and reading one tells the release notice)
    missing = object()
    return served is not None and any(
        inspect.getattr_static(owner, name, missing) is not missing
        for owner in (served, type(served))
    )


class UnreadReleaseWarning(UserWarning):
    """casatasks is newer than every release whose parallel layer was read."""


def check_release(version: str, package_dir: Path, cache_dir: Path) -> tuple[str, str | None]:
    """A release not in private.RELEASES: scan its parallel layer (the contract
    test's scan) -> (warning, why it cannot be served or None)."""
    uses = contract.cached_scan(package_dir, version, cache_dir)
    problems = contract.problems(uses, serves)
    warning = (
        f"casatasks {version} is newer than the releases casa-kernel was read and tested "
        f"against ({private.OLDEST_READ} to {private.NEWEST_READ}): its parallel layer "
        f"({package_dir}) was scanned for the casampi names it uses, not read"
    )
    if not problems:
        return warning + "; every one is served.", None
    reason = (
        f"casatasks {version} uses what casa-kernel does not serve, so CASA's parallel tasks "
        "run serially in the kernel (%%casa_parallel still uses the servers):\n  "
        + "\n  ".join(problems)
    )
    return warning + ".", reason


def _check_installed_release() -> None:
    global serial_reason, release_notice
    if private.READ:
        return
    spec = importlib.util.find_spec("casatasks")
    if spec is None or not spec.submodule_search_locations:
        return  # private.py refused it already
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    cache_dir = Path(cache_home(os.environ)) / "casa-kernel" / "contract"
    warning, serial_reason = check_release(private.CASATASKS_VERSION, package_dir, cache_dir)
    release_notice = "\n".join(filter(None, (warning, serial_reason)))
    # the kernel's log now; the notebook at its first CASA call (tell_release)
    warnings.warn(release_notice, UnreadReleaseWarning, stacklevel=2)


def tell_release() -> None:
    """Once per kernel, in the cell of the first call that reaches casatasks'
    parallel layer: what the kernel has not read of this release, and what it
    cannot serve (a notice at start-up goes to the kernel's log, not a notebook)."""
    global _told
    if release_notice and not _told:
        _told = True
        print(f"casa-kernel: {release_notice}", file=sys.stderr, flush=True)


def install(session: Any) -> None:
    """Make ``import casampi...`` in this process find our client surface, and
    route the notebook's imaging tasks.

    Must run before casatasks' parallel helpers are imported; refuses to run
    after, since they would already have decided there is no MPI.
    """
    from casa_kernel.casa import tasks as casa_tasks
    from casa_kernel.casampi import imaging, tasks

    global _session
    _session = session
    _check_installed_release()
    for name in MPI_IMPORTERS:
        helper = sys.modules.get(name)
        if helper is None:
            continue
        # imported without casampi (serial for good), or with a real casampi
        # installed beside casatasks (its classes bound, not ours)
        served = helper.__dict__.get("MPIEnvironment", tasks.MPIEnvironment)
        if not getattr(helper, "mpi_available", False) or served is not tasks.MPIEnvironment:
            raise ClusterError(f"{name} was imported before casa-kernel's bridge was installed")
    package = types.ModuleType("casampi")
    package.__path__ = []  # a package, so `import casampi.X` looks in sys.modules
    package.__doc__ = "casa-kernel's stand-in for casampi's client API (kernel process only)"
    modules = {
        "MPIEnvironment": tasks.MPIEnvironment,
        "MPICommandClient": tasks.MPICommandClient,
        "MPIInterface": imaging.MPIInterface,
    }
    sys.modules["casampi"] = package
    for attr, cls in modules.items():
        module = types.ModuleType(f"casampi.{attr}")
        setattr(module, attr, cls)
        setattr(package, attr, module)
        sys.modules[f"casampi.{attr}"] = module
    for name in CPP_PARALLEL_TASKS:
        casa_tasks.routes[name] = imaging.route_imaging(name)
    casa_tasks.new_ms_route = tasks.route_new_ms
    # `from casatasks import tclean` (a cell, a script for mpicasa) gets the
    # notebook's task objects, routes included
    casa_tasks.serve_notebook_tasks()
