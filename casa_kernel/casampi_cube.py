"""CASA's C++ cube parallelism, run on our servers.

tclean's cubes (and deconvolve, sdintimaging where CASA parallelises them)
need their C++ client inside the servers' MPI world, which the kernel is not.
So the call runs on server rank 0 as that client (casampi stand-in patched
into the task's module there, through bridge.cpp_client_module) while the other
servers serve it from ``synthesisimager().initmpi()``. Kernel side:
run_cpp_parallel; server side: cpp_client, cpp_server, limit_threads.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from typing import Any

from casa_kernel import display
from casa_kernel.bridge import CPP_MPI_COMMAND, _cluster, cpp_client_module
from casa_kernel.dispatch import Dispatcher, Job
from casa_kernel.errors import RemoteError


def products(imagename: str) -> set[str]:
    return set(glob.glob(glob.escape(imagename) + ".*"))


def server_pids() -> frozenset[int]:
    return frozenset(info.pid for info in _cluster().servers.values())


def labels(ranks: Any) -> str:
    by_rank = {info.rank: info.host for info in _cluster().servers.values()}
    return ", ".join(display.server_label(r, by_rank.get(r)) for r in ranks)


def say(text: str) -> None:
    """Which servers do what, as the call starts (the notebook's progress line)."""
    print(f"casa-kernel: {text}", file=sys.stderr, flush=True)


def _servers_per_host() -> dict[int, int]:
    """rank -> how many servers share its host."""
    servers = list(_cluster().servers.values())
    hosts = [info.host for info in servers]
    return {info.rank: hosts.count(info.host) for info in servers}


def share_cores() -> None:
    """Give each server its share of its host's cores for CASA's OpenMP.

    CASA's gridders and deconvolvers start one OpenMP thread per core; with
    several servers on a host each would, and busy-waiting threads of one
    server then slow the others (on a 2-core box: 2 servers x 2 threads made a
    cube 4x slower than with 1 thread each).
    """
    shared = _servers_per_host()
    jobs = [Job(f"rank {r}", limit_threads, (n,), target=r) for r, n in shared.items()]
    failures = [o.failure for o in Dispatcher(_cluster()).execute(jobs) if o.failure]
    if failures:
        raise RemoteError(failures)


def limit_threads(servers_on_host: int) -> int:
    """On a server: OpenMP threads = this host's cores / servers on it."""
    from casa_kernel.casa.tasks import _casatasks

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // max(1, servers_on_host))
    _casatasks().casalog.ompSetNumThreads(threads)
    return threads


def run_cpp_parallel(name: str, params: dict[str, Any]) -> Any:
    """Run task ``name`` on server rank 0 as CASA's C++ parallel client, the
    other servers serving it; return its value. Servers work in our folder."""
    cluster = _cluster()
    cwd = os.getcwd()
    nservers = cluster.config.nservers
    share_cores()
    say(
        f"{name}: CASA's cube client on {labels([0])}, channels gridded by "
        f"{labels(range(1, nservers))}"
    )
    # A server that dies ends the MPI world and the dispatcher re-runs both jobs on
    # new servers: the client then first removes what the lost attempt wrote, so
    # the re-run is not taken for a restart.
    imagename = params.get("imagename")
    keep = sorted(products(imagename)) if isinstance(imagename, str) and imagename else []
    client = Job(f"{name} (C++ parallel client)", cpp_client, (name, params, cwd, keep), target=0)
    worker_args = (cwd,)
    workers = [
        Job(f"{name} (C++ parallel server)", cpp_server, worker_args, target=r)
        for r in range(1, nservers)
    ]
    outcomes = Dispatcher(cluster).execute([client, *workers])
    failures = [o.failure for o in outcomes if o.failure is not None]
    if failures:
        for failure in failures:
            failure.submms = f"channels of {params.get('imagename') or params.get('vis')}"
        raise RemoteError(failures)
    return outcomes[0].value


# -- what runs on the servers -------------------------------------------------

_START, _SKIP = "initmpi", "skip"


def cpp_server(cwd: str) -> None:
    """Serve rank 0's C++ imaging client until it releases us."""
    from mpi4py import MPI

    os.chdir(cwd)
    # rank 0 says whether the task went C++-parallel (casatasks decides inside)
    if MPI.COMM_WORLD.bcast(None, root=0) == _START:
        from casatools import synthesisimager

        si = synthesisimager()
        try:
            si.initmpi()  # returns when the client calls releasempi()
        finally:
            si.done()


def cpp_client(name: str, params: dict[str, Any], cwd: str, keep: list[str]) -> Any:
    """Run task ``name`` on this server (rank 0) as CASA's C++ MPI client.

    Image products other than ``keep`` (those that existed before the call) are
    left-overs of an attempt lost with its servers: removed first.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    started: list[bool] = []
    try:
        return _as_cpp_client(comm, started, name, params, cwd, keep)
    finally:
        # Whatever happened before the task asked for its servers (an interrupt
        # during the import, a bad argument), they wait in bcast: free them.
        if not started:
            comm.bcast(_SKIP, root=0)


def _as_cpp_client(
    comm: Any, started: list[bool], name: str, params: dict[str, Any], cwd: str, keep: list[str]
) -> Any:
    from casa_kernel.casa.tasks import _casatasks

    os.chdir(cwd)
    imagename = params.get("imagename")
    if isinstance(imagename, str) and imagename:
        for path in sorted(products(imagename) - set(keep)):
            shutil.rmtree(path, ignore_errors=True)
    task = getattr(_casatasks(), name)

    class _Core:
        def pgc(self, command: str, block: bool = True) -> None:
            # The other servers make and start their own synthesisimager
            # (cpp_server); the import and constructor commands need nothing.
            if CPP_MPI_COMMAND in command and not started:
                comm.bcast(_START, root=0)
                started.append(True)

    class _Interface:
        _cluster = _Core()

        @staticmethod
        def getCluster() -> Any:
            return _Interface

        def __init__(self) -> None:
            pass

    class _Environment:
        is_mpi_enabled = True
        is_mpi_client = True

    # The task releases its servers in a `finally` that starts only after its
    # imager is built: interrupted in between, it never does and they wait in
    # initmpi() for ever. Record its releasempi() to do it for it then.
    released: list[bool] = []

    def recording(real_imager: Any) -> Any:
        class _Released:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self._tool = real_imager(*args, **kwargs)

            def __getattr__(self, attr: str) -> Any:
                return getattr(self._tool, attr)

            def releasempi(self) -> Any:
                released.append(True)
                return self._tool.releasempi()

        return _Released

    real_imager: Any = None
    try:
        with cpp_client_module(name, _Environment, _Interface, recording) as real_imager:
            return task(**params)
    finally:
        if started and not released:
            real_imager().releasempi()
