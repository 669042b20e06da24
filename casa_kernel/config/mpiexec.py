"""The servers' mpiexec command line, built in one pure function (a test checks
the list and the environment without starting anything).

:func:`mpiexec_command` is what :class:`casa_kernel.cluster.launcher.CasaEngineSetLauncher`
runs; :data:`FORWARDED_ENV` is also what the preflight's probe must see on
every host (casa_kernel/preflight/).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from casa_kernel import variables

# Variables every server needs even on another host (mpiexec only forwards the
# local environment to local ranks; -x forwards to all). Only those that are
# set are forwarded: `-x NAME` of an unset NAME makes OpenMPI open its error
# text with "Could not find the environment variable".
FORWARDED_ENV = (
    "PATH",
    "LD_LIBRARY_PATH",
    "PYTHONPATH",
    "CASASITECONFIG",
    variables.LOG_DIR,
    variables.LOG_TAG,
    variables.SERVER_MEMORY,
    variables.CUBE_CLIENT,
    # set by ipyparallel only when not encrypted across hosts: then the HMAC key
    # it holds goes in a shared file instead (casa_kernel/cluster/keyfile.py)
    "IPP_CONNECTION_INFO",
)


# A rank waiting in MPI (CASA's cube client while its workers grid, a worker
# between channel chunks, a server in a bcast) polls in a loop; with servers
# sharing the cores that loop takes CPU from the ones working. These make the
# poll sleep 100 us when idle instead (OpenMPI 5's pthreads yield strategy);
# measured on a loaded 2-core box: a C++ cube 1.5-2x faster (BENCHMARKS.md,
# Imaging). A message waits at most one sleep longer; the user's values win.
SLEEP_WHEN_IDLE = {
    "OMPI_MCA_mpi_yield_when_idle": "1",
    "OMPI_MCA_threads_pthreads_yield_strategy": "nanosleep",
    "OMPI_MCA_threads_pthreads_nanosleep_time": "100000",
}


@dataclass(frozen=True)
class LaunchSpec:
    """What the command line depends on, besides the environment."""

    mpiexec: str
    nservers: int
    hostfile: str | None  # None: mpiexec reads the batch job's allocation itself
    local: bool  # every server on this machine
    extra_args: tuple[str, ...] = ()


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def mpi_environment(local: bool, as_root: bool, environ: Mapping[str, str]) -> dict[str, str]:
    """Variables to add for mpiexec and the servers (pure)."""
    env: dict[str, str] = {}
    if as_root:
        # OpenMPI refuses to run as root unless both are set; only set them
        # when we really are root (containers, CI).
        env.update(
            OMPI_ALLOW_RUN_AS_ROOT="1",
            OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
            PRTE_ALLOW_RUN_AS_ROOT="1",
            PRTE_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        )
    if local and "OMPI_MCA_btl" not in environ:
        # The ofi BTL costs ~1 s of MPI_Init probing fabrics a single machine
        # does not have; on real multi-host clusters it may be the fast path.
        env["OMPI_MCA_btl"] = "^ofi"
    if local:
        env.update({k: v for k, v in SLEEP_WHEN_IDLE.items() if k not in environ})
    return env


def mpiexec_command(
    spec: LaunchSpec, program: Sequence[str], environ: Mapping[str, str], as_root: bool
) -> tuple[list[str], dict[str, str]]:
    """The whole mpiexec command line and the variables it adds (pure).

    ``environ`` is the environment mpiexec will see without the additions.
    """
    added = mpi_environment(spec.local, as_root, environ)
    seen = {**environ, **added}
    argv = [spec.mpiexec, "-n", str(spec.nservers)]
    if spec.hostfile:
        argv += ["--hostfile", spec.hostfile]
    # Binding more ranks than cores fails on small machines ("request to bind
    # ... more cpus than are available"); --bind-to none keeps the slot check.
    argv += ["--bind-to", "none"]
    for name in FORWARDED_ENV:
        if name in seen:
            argv += ["-x", name]
    return argv + list(spec.extra_args) + list(program), added
