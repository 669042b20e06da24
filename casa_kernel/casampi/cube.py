"""CASA's C++ cube parallelism, run on our servers: the kernel's side.

tclean's cubes (and deconvolve, sdintimaging where CASA parallelises them)
need their C++ client inside the servers' MPI world, which the kernel is not.
So the call runs on CASA's cube client, the extra world rank 0 the kernel starts
with its servers (casa/role.py; server rank 0 when there is none), as that
client (casampi stand-in patched into the task's module there, through
casa/private.py's cpp_client_module) while the servers serve it from
``synthesisimager().initmpi()``. Kernel side
(here): run_cpp_parallel; server side (casa_kernel/server/cube.py): cpp_client,
cpp_server, limit_threads.
"""

from __future__ import annotations

import os
import re
from typing import Any

from casa_kernel import display, variables
from casa_kernel.casa.config import logfile_path
from casa_kernel.casa.logs import LogTail
from casa_kernel.casa.outputs import image_products
from casa_kernel.casa.private import CPP_PARALLEL_TASKS
from casa_kernel.casa.role import CUBE_CLIENT_RANK
from casa_kernel.casampi.bridge import _cluster
from casa_kernel.client import progress
from casa_kernel.client.dispatch import Dispatcher, Job
from casa_kernel.client.interrupts import say
from casa_kernel.errors import RemoteError
from casa_kernel.server.cube import (
    cpp_client,
    cpp_server,
    limit_threads,
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


def _per_host(ranks: list[int]) -> dict[int, int]:
    """rank -> how many of ``ranks`` share its host."""
    infos = [info for info in _cluster().servers.values() if info.rank in ranks]
    hosts = [info.host for info in infos]
    return {info.rank: hosts.count(info.host) for info in infos}


def share_cores(cube_client: bool = False) -> None:
    """Give each server (and CASA's cube client, for a cube) its share of its
    host's cores for CASA's OpenMP.

    CASA's gridders and deconvolvers start one OpenMP thread per core; with
    several servers on a host each would, and busy-waiting threads of one
    server then slow the others (on a 2-core box: 2 servers x 2 threads made a
    cube 4x slower than with 1 thread each). The cube client works only in a
    cube (and imports CASA at its first): left alone otherwise.
    """
    ranks = list(range(_cluster().config.nservers))
    ranks += [CUBE_CLIENT_RANK] if cube_client and _cluster().config.cube_client else []
    shared = _per_host(ranks)
    jobs = [
        Job(display.server_label(r, None), limit_threads, (n,), target=r) for r, n in shared.items()
    ]
    failures = [o.failure for o in Dispatcher(_cluster()).execute(jobs) if o.failure]
    if failures:
        raise RemoteError(failures)


def run_cpp_parallel(name: str, params: dict[str, Any]) -> Any:
    """Run task ``name`` on CASA's cube client (world rank 0: casa/role.py; server
    rank 0 when the cluster has none) as CASA's C++ parallel client, the servers
    serving it; return its value. They work in our folder."""
    cluster = _cluster()
    cwd = os.getcwd()
    nservers = cluster.config.nservers
    head = CUBE_CLIENT_RANK if cluster.config.cube_client else 0
    ranks = range(head + 1, nservers)  # the workers: every server, or all but rank 0
    share_cores(cube_client=True)
    client_at = labels([head]).replace("cube client@", "world rank 0 on ")
    say(f"{name}: CASA's cube client ({client_at}), channels gridded by {labels(ranks)}")
    # A server that dies ends the MPI world and the dispatcher re-runs both jobs on
    # new servers: the client then first removes what the lost attempt wrote, so
    # the re-run is not taken for a restart.
    imagename = params.get("imagename")
    keep = sorted(image_products(imagename)) if isinstance(imagename, str) and imagename else []
    client = Job(
        f"{name} (C++ parallel client)", cpp_client, (name, params, cwd, keep), target=head
    )
    worker_args = (cwd,)
    workers = [
        Job(f"{name} (C++ parallel server)", cpp_server, worker_args, target=r) for r in ranks
    ]
    steps = WorkerSteps([head, *ranks])
    title = f"{name} cube" + (f" {imagename!r}" if imagename else "")
    with progress.operation(title, live=steps) as op:
        outcomes = Dispatcher(cluster).execute([client, *workers])
        if not steps.read_any:
            op.stage = "each server's step not shown: their CASA logs are not readable here"
    failures = [o.failure for o in outcomes if o.failure is not None]
    if failures:
        for failure in failures:
            failure.submms = f"channels of {params.get('imagename') or params.get('vis')}"
        raise RemoteError(failures)
    return outcomes[0].value


# What CASA's cube client and workers log as they go (casatasks 6.6-6.7), read
# from their CASA logs while a cube runs: each server's step in the live display.
_STEPS = (
    (re.compile(r"Processing channels in range \[(\d+), (\d+)\]"), "minor cycle, channels {0}-{1}"),
    (re.compile(r"Run Major Cycle (\d+)"), "major cycle {0}"),
    (re.compile(r"- Make PSF -"), "making the psf"),
    (re.compile(r"Evaluating Primary Beam"), "making the primary beam"),
    (re.compile(r"Restoring model image"), "restoring"),
)


_LEVELS = ("INFO", "INFO1", "INFO2", "WARN")  # the steps are INFO lines


class WorkerSteps:
    """rank -> its current step in a cube, from the CASA log it writes (the log
    folder is the kernel's: servers on other hosts show theirs only if it is shared)."""

    def __init__(self, ranks: Any):
        log_dir = os.environ.get(variables.LOG_DIR, "")
        tag = os.environ.get(variables.LOG_TAG)
        hosts = {info.rank: info.host for info in _cluster().servers.values()}
        self.tails = {
            r: LogTail(logfile_path(log_dir, rank=r, host=hosts.get(r), tag=tag))
            for r in ranks
            if log_dir
        }
        self.steps: dict[int, str] = {}
        self.read_any = False

    def __call__(self, rank: int) -> str | None:
        tail = self.tails.get(rank)
        if tail is not None:
            for line in tail.read_new(levels=_LEVELS):
                for pattern, text in _STEPS:
                    match = pattern.search(line)
                    if match:
                        self.steps[rank] = text.format(*match.groups())
                        self.read_any = True
                        break
        return self.steps.get(rank)
