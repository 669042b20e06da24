"""CASA's C++ cube parallelism, run on our servers: the kernel's side.

tclean's cubes (and deconvolve, sdintimaging where CASA parallelises them)
need their C++ client inside the servers' MPI world, which the kernel is not.
So the call runs on server rank 0 as that client (casampi stand-in patched
into the task's module there, through casa/private.py's cpp_client_module) while
the other servers serve it from ``synthesisimager().initmpi()``. Kernel side
(here): run_cpp_parallel; server side (casa_kernel/server/cube.py): cpp_client,
cpp_server, limit_threads.
"""

from __future__ import annotations

import os
from typing import Any

from casa_kernel import display
from casa_kernel.casa.outputs import image_products
from casa_kernel.casa.private import CPP_PARALLEL_TASKS
from casa_kernel.casa.tasks import record_failure
from casa_kernel.casampi.bridge import _cluster
from casa_kernel.client.dispatch import Dispatcher, Job
from casa_kernel.client.interrupts import say
from casa_kernel.errors import RemoteError
from casa_kernel.server.cube import (
    cpp_client,
    cpp_server,
    limit_threads,
    serial_imager,
)


def goes_cpp_parallel(name: str, params: dict[str, Any]) -> bool:
    """Would casatasks, under mpicasa, hand this call to its C++ MPI servers?"""
    if name == "tclean":
        # task_tclean's own test: every specmode but 'mfs' (cube, cubedata,
        # cubesource, and 'mvc', mtmfs via a cube) goes C++-parallel
        return params.get("specmode", "mfs") != "mfs"
    if name == "deconvolve":
        # task_deconvolve's own test: not mtmfs, and a psf of more than one channel
        # (else it stays serial under mpicasa too, and here in the kernel)
        if params.get("deconvolver", "hogbom") == "mtmfs":
            return False
        return _channels(f"{params.get('imagename')}.psf") > 1
    # sdintimaging puts its servers in C++ MPI mode whenever there are servers
    return name in CPP_PARALLEL_TASKS


def _channels(path: str) -> int:
    """Channels of the image at ``path`` (0 when there is none: the task says why)."""
    if not os.path.isdir(path):
        return 0
    from casatools import image

    ia = image()
    try:
        ia.open(path)
        return int(ia.shape()[3])
    except Exception:
        return 0
    finally:
        ia.done()


def server_pids() -> frozenset[int]:
    return frozenset(info.pid for info in _cluster().servers.values())


def labels(ranks: Any) -> str:
    by_rank = {info.rank: info.host for info in _cluster().servers.values()}
    return ", ".join(display.server_label(r, by_rank.get(r)) for r in ranks)


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
    keep = sorted(image_products(imagename)) if isinstance(imagename, str) and imagename else []
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


def run_on_a_server(name: str, params: dict[str, Any]) -> Any:
    """Run imaging task ``name`` serially on server rank 0; return its value.

    While servers run, the kernel writes no image: casacore on a full disk
    aborts the process that writes (server/cube.py's serial_imager).
    """
    imagename = params.get("imagename")
    keep = sorted(image_products(imagename)) if isinstance(imagename, str) and imagename else []
    job = Job(f"{name} (serial)", serial_imager, (name, params, os.getcwd(), keep), target=0)
    [outcome] = Dispatcher(_cluster(), title=name).execute([job])
    if outcome.failure is not None:
        outcome.failure.submms = f"images {imagename}" if imagename else ""
        record_failure(outcome.failure)
        raise RemoteError([outcome.failure])
    return outcome.value
