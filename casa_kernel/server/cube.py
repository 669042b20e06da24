"""Imaging on the servers: CASA's C++ cube parallelism, and serial imaging.

The kernel (casa_kernel/casampi/cube.py) sends a cube call as one job per
process: :func:`cpp_client` on world rank 0 (CASA's cube client, casa/role.py, or
server rank 0 when there is none) runs the task as CASA's C++ MPI client
(casampi stand-in patched into the task's module, casa/private.py's
``cpp_client_module``), :func:`cpp_server` on the others serves it from
``synthesisimager().initmpi()``; :func:`limit_threads` shares a host's cores
first. A call that is not parallel runs on one server (server/engine.py's
serial_task): while servers run, the kernel writes no image (a full disk aborts
the process that writes one). ipyparallel's canning imports this module on the servers: it imports
nothing of the kernel's side (tests/unit/test_ladder.py checks it).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from casa_kernel.casa.outputs import image_products
from casa_kernel.casa.private import CPP_MPI_COMMAND, cpp_client_module


def limit_threads(servers_on_host: int) -> int:
    """On a server: OpenMP threads = this host's cores / servers on it."""
    from casa_kernel.casa.tasks import _casatasks

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // max(1, servers_on_host))
    _casatasks().casalog.ompSetNumThreads(threads)
    return threads


_START, _SKIP = "initmpi", "skip"


@contextmanager
def _interrupts_held(reraise: bool) -> Iterator[None]:
    """SIGINT recorded instead of raised inside; raised as KeyboardInterrupt when
    it ends if one came and ``reraise``.

    Python raises KeyboardInterrupt at the first bytecode after the C call the
    signal came in: between an MPI call that returned and the line that records
    what it did, the client and its workers would disagree on where they are.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # (signal handlers are the main thread's; cells run there)
        return
    came: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    if came and reraise:
        raise KeyboardInterrupt


def remove_lost_images(imagename: Any, keep: list[str]) -> None:
    """Remove the image products a lost attempt of this call left (all but ``keep``)."""
    if isinstance(imagename, str) and imagename:
        for path in sorted(image_products(imagename) - set(keep)):
            shutil.rmtree(path, ignore_errors=True)


def cpp_server(cwd: str) -> None:
    """Serve rank 0's C++ imaging client until it releases us.

    Interrupts go through the client: it ends an interrupted cube and releases
    its workers (or tells them to skip it). A worker that stopped by itself,
    interrupted while it waited for the client's word and raising as soon as
    the word was "start", would never enter ``initmpi()`` and leave the
    client's C++ waiting for it for ever (the kernel signals every process of
    the call, not all in the same millisecond).
    """
    with _interrupts_held(reraise=False):
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
    """Run task ``name`` here (world rank 0) as CASA's C++ MPI client.

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
    remove_lost_images(params.get("imagename"), keep)
    task = getattr(_casatasks(), name)

    class _Core:
        def pgc(self, command: str, block: bool = True) -> None:
            # The other servers make and start their own synthesisimager
            # (cpp_server); the import and constructor commands need nothing.
            if CPP_MPI_COMMAND in command and not started:
                # the workers were told to start: that must be recorded (the
                # finally then releases them, not tell them to skip)
                with _interrupts_held(reraise=True):
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
