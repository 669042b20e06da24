"""The cluster's configuration: one room for every setting and where it comes from.

A kernelspec (:mod:`casa_kernel.kernel.kernelspec`) writes the variables of
:mod:`casa_kernel.variables`;
the kernel reads them with :meth:`ClusterConfig.from_env`, and ``%casa_cluster
start/restart -n N --hostfile F --mpiexec M`` replaces only the settings it names
(:meth:`ClusterConfig.replace`): the kernelspec's hostfile, extra mpiexec
arguments, start timeout and controller location survive a restart with a new N.

Without a hostfile, a batch allocation the kernel runs in (Slurm, PBS, LSF:
:mod:`casa_kernel.config.allocation`) gives the hosts, read again at every (re)start;
``batch`` (``--slurm``/``--pbs``, or ``variables.BATCH``) asks for the servers
as ONE job of the batch queue instead (:mod:`casa_kernel.config.batch`).

Pure apart from reading the hostfile and choosing mpiexec (config/mpi_probe.py); imports nothing
heavy, so ``casa-kernel install`` stays quick.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from casa_kernel import variables
from casa_kernel.config import allocation
from casa_kernel.config.batch import BatchJob, parse_batch_spec
from casa_kernel.config.hostfile import Placement, place, read_hostfile
from casa_kernel.config.local_load import local_cores
from casa_kernel.config.mpi_match import MpiChoice
from casa_kernel.config.mpi_probe import resolve_mpiexec
from casa_kernel.config.security import encrypt_wanted
from casa_kernel.errors import ClusterError, PlacementError

# The variables are described in casa_kernel/variables.py.
DEFAULT_NPROCS = 3  # 1 client + 2 servers, as `casa-kernel install` without options
DEFAULT_START_TIMEOUT = 120.0
# Servers from the batch queue may wait for their job to start: an hour.
BATCH_START_TIMEOUT = 3600.0

_UNSET = object()


@dataclass(frozen=True)
class ClusterConfig:
    """What to start: placement of client + servers, and which mpiexec."""

    placement: Placement
    mpiexec: str
    extra_mpi_args: tuple[str, ...] = ()
    start_timeout: float = DEFAULT_START_TIMEOUT
    controller_location: str | None = None  # None: socket.getfqdn() when not all local
    # The N the user asked for (None: every slot of the hostfile), so that a
    # restart with a new hostfile but no -n fills that hostfile as mpicasa would.
    requested_nprocs: int | None = field(default=None, compare=False)
    # Load CASA in the kernel and on the servers at start, not on first use.
    preload_casa: bool = True
    # Lift the cap on servers per core of this machine (no hostfile only).
    oversubscribe: bool = False
    # Where the layout came from when not a hostfile, for status
    # ("Slurm job 1234: antares 2, orion 3"); None: a hostfile or this machine.
    layout_source: str | None = None
    batch: BatchJob | None = None  # servers from the batch queue (one job)
    encrypt: bool | None = None  # variables.ENCRYPT; None: when servers may be remote
    # Which mpiexec and why, for status (config/mpi_match.py); the user's own
    # choice (None: chosen to fit mpi4py's MPI), kept so a restart chooses again
    # the same way rather than taking the chosen path as the user's.
    mpi: MpiChoice | None = field(default=None, compare=False)
    requested_mpiexec: str | None = field(default=None, compare=False)

    @property
    def encrypted(self) -> bool:
        """Are the controller's connections encrypted (CurveZMQ)?"""
        return encrypt_wanted(self.encrypt, self.placement.is_local)

    @property
    def nservers(self) -> int:
        return len(self.placement.servers)

    @property
    def cube_client(self) -> bool:
        """Does the servers' mpiexec start CASA's cube client as world rank 0
        (casa/role.py)? With 2 servers or more, when the kernel runs mpiexec: 2
        servers then give a cube 2 workers, as under ``mpicasa -n 3``. Not for
        servers from the batch queue (their job asks for one task per server)."""
        return self.batch is None and self.nservers >= 2

    @property
    def nranks(self) -> int:
        """The processes of the servers' mpiexec: the servers and the cube client."""
        return self.nservers + (1 if self.cube_client else 0)

    @property
    def hostfile(self) -> str | None:
        """The user's hostfile (None when the layout came from a batch allocation)."""
        return None if self.layout_source is not None else self.placement.hostfile

    @classmethod
    def from_options(
        cls,
        nprocs: int | None = None,
        hostfile: str | None = None,
        mpiexec: str | None = None,
        extra_mpi_args: tuple[str, ...] = (),
        start_timeout: float = DEFAULT_START_TIMEOUT,
        controller_location: str | None = None,
        preload_casa: bool = True,
        oversubscribe: bool | None = None,
        env: Mapping[str, str] | None = None,
        batch: BatchJob | None = None,
        encrypt: bool | None = None,
    ) -> ClusterConfig:
        """Validate everything that can be checked before launching anything.

        ``oversubscribe`` (None: from ``variables.OVERSUBSCRIBE``) lifts the cap
        on servers per core of this machine when there is no hostfile. Without a
        hostfile, the batch allocation described by ``env`` (default
        ``os.environ``) gives the hosts; ``batch`` asks the queue for the servers.
        """
        env = os.environ if env is None else env
        if oversubscribe is None:
            oversubscribe = env_flag(env, variables.OVERSUBSCRIBE, default=False)
        if hostfile:
            hostfile = os.path.abspath(os.path.expanduser(hostfile))
        layout_source = None
        found = None if hostfile or batch else allocation.detect(env)
        if batch is not None:
            placement, layout_source = allocation.batch_placement(batch.nservers, batch.describe())
            start_timeout = max(start_timeout, BATCH_START_TIMEOUT)
            nprocs = batch.nservers + 1
        elif found is not None:
            found = found.client_first(socket.gethostname())
            placement = allocation.place_in(found, nprocs)
            layout_source = allocation.describe_placement(found.source, placement)
        else:
            hosts = read_hostfile(hostfile) if hostfile else None
            if nprocs is None and not hostfile:
                nprocs = DEFAULT_NPROCS
            placement = place(
                nprocs, hosts, hostfile or None, cores=local_cores(), oversubscribe=oversubscribe
            )
        choice = resolve_mpiexec(mpiexec, env)
        return cls(
            placement,
            choice.mpiexec,
            tuple(extra_mpi_args),
            _timeout(start_timeout),
            controller_location or None,
            requested_nprocs=nprocs,
            preload_casa=bool(preload_casa),
            oversubscribe=oversubscribe,
            layout_source=layout_source,
            batch=batch,
            encrypt=encrypt,
            mpi=choice,
            requested_mpiexec=mpiexec,
        )

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        nprocs: int | None | object = _UNSET,
        hostfile: str | None | object = _UNSET,
        mpiexec: str | None | object = _UNSET,
        extra_mpi_args: tuple[str, ...] | object = _UNSET,
        start_timeout: float | object = _UNSET,
        controller_location: str | None | object = _UNSET,
        oversubscribe: bool | object = _UNSET,
        batch: BatchJob | None | object = _UNSET,
    ) -> ClusterConfig:
        """The kernelspec's configuration (``env``, default ``os.environ``), with overrides.

        A setting given as a keyword replaces the variable, which is then not even
        read (a bad ``variables.NPROCS`` does not stop ``start -n 3``). A new
        hostfile without a new N uses every slot of that hostfile. A hostfile
        given as a keyword leaves the kernelspec's batch queue (``variables.BATCH``).
        """
        env = os.environ if env is None else env
        hostfile_given = hostfile is not _UNSET
        if hostfile is not _UNSET and nprocs is _UNSET:
            nprocs = None
        if nprocs is _UNSET:
            nprocs = _env_nprocs(env)
        if hostfile is _UNSET:
            hostfile = env.get(variables.HOSTFILE) or None
        if mpiexec is _UNSET:
            mpiexec = env.get(variables.MPIEXEC) or None
        if extra_mpi_args is _UNSET:
            extra_mpi_args = _env_mpi_args(env)
        if start_timeout is _UNSET:
            start_timeout = _env_timeout(env)
        if controller_location is _UNSET:
            controller_location = env.get(variables.CONTROLLER_LOCATION, "").strip() or None
        if oversubscribe is _UNSET:
            oversubscribe = env_flag(env, variables.OVERSUBSCRIBE, default=False)
        if batch is _UNSET:
            spec = env.get(variables.BATCH, "").strip()
            batch = _env_batch(spec, nprocs) if spec and not hostfile_given else None  # type: ignore[arg-type]
        return cls.from_options(
            nprocs=nprocs,  # type: ignore[arg-type]
            hostfile=hostfile,  # type: ignore[arg-type]
            mpiexec=mpiexec,  # type: ignore[arg-type]
            extra_mpi_args=tuple(extra_mpi_args),  # type: ignore[arg-type]
            start_timeout=start_timeout,  # type: ignore[arg-type]
            controller_location=controller_location,  # type: ignore[arg-type]
            preload_casa=env_flag(env, variables.PRELOAD, default=True),
            oversubscribe=oversubscribe,  # type: ignore[arg-type]
            env=env,
            batch=batch,  # type: ignore[arg-type]
            encrypt=_env_encrypt(env),
        )

    def replace(
        self,
        *,
        nprocs: int | None | object = _UNSET,
        hostfile: str | None | object = _UNSET,
        mpiexec: str | None | object = _UNSET,
        oversubscribe: bool | object = _UNSET,
        batch: BatchJob | None | object = _UNSET,
    ) -> ClusterConfig:
        """This configuration with the settings a ``%casa_cluster`` line names.

        Everything else (hostfile unless replaced, extra mpiexec arguments, start
        timeout, controller location) is kept; the result is validated again.
        A batch allocation the kernel runs in is read again. Servers from the
        queue stay so (a new ``-n`` resizes the job) unless a hostfile is given;
        ``batch`` gives a new job.
        """
        if batch is _UNSET:
            batch = self.batch
            if hostfile is not _UNSET:
                batch = None  # a hostfile places the servers: not the queue
            elif batch is not None and isinstance(nprocs, int):
                if nprocs < 2:
                    raise PlacementError(f"-n {nprocs}: N counts the client too, so at least 2")
                batch = dataclasses.replace(batch, nservers=nprocs - 1)
        if hostfile is _UNSET:
            hostfile = self.hostfile
            if nprocs is _UNSET:
                nprocs = self.requested_nprocs if self.batch is None else None
        elif nprocs is _UNSET:
            nprocs = None  # a new hostfile without -n: all of its slots
        return ClusterConfig.from_options(
            nprocs=nprocs,  # type: ignore[arg-type]
            hostfile=hostfile,  # type: ignore[arg-type]
            mpiexec=self.requested_mpiexec if mpiexec is _UNSET or mpiexec is None else mpiexec,  # type: ignore[arg-type]
            extra_mpi_args=self.extra_mpi_args,
            # leaving the queue: the kernelspec's timeout, not the queue's hour
            start_timeout=_env_timeout(os.environ)
            if self.batch is not None and batch is None
            else self.start_timeout,
            controller_location=self.controller_location,
            preload_casa=self.preload_casa,
            oversubscribe=self.oversubscribe if oversubscribe is _UNSET else oversubscribe,  # type: ignore[arg-type]
            batch=batch,  # type: ignore[arg-type]
            encrypt=self.encrypt,
        )


def env_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A yes/no variable: 1/yes/true/on or 0/no/false/off (any case); unset: default."""
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "yes", "true", "on"):
        return True
    if raw in ("0", "no", "false", "off"):
        return False
    raise ClusterError(f"{name}={env.get(name)!r} is neither 1/yes/true/on nor 0/no/false/off")


def _env_encrypt(env: Mapping[str, str]) -> bool | None:
    """``variables.ENCRYPT``: a yes/no, or None when unset (decided by placement)."""
    if not env.get(variables.ENCRYPT, "").strip():
        return None
    return env_flag(env, variables.ENCRYPT, default=False)


def _env_batch(spec: str, nprocs: int | None) -> BatchJob:
    """``variables.BATCH``'s job, sized by N (the client counted)."""
    if nprocs is not None and nprocs < 2:
        raise PlacementError(f"{variables.NPROCS}={nprocs}: N counts the client too")
    return parse_batch_spec(spec, (nprocs or DEFAULT_NPROCS) - 1)


def _env_mpi_args(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get(variables.MPI_ARGS, "")
    try:
        return tuple(shlex.split(raw))
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise ClusterError(
            f"{variables.MPI_ARGS}={raw!r} cannot be split into arguments as a shell would: {exc}"
        ) from None


def _env_nprocs(env: Mapping[str, str]) -> int | None:
    raw = env.get(variables.NPROCS, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise PlacementError(f"{variables.NPROCS}={raw!r} is not a whole number") from None


def _env_timeout(env: Mapping[str, str]) -> float:
    raw = env.get(variables.START_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_START_TIMEOUT
    try:
        return _timeout(float(raw))
    except (ValueError, ClusterError):
        raise ClusterError(f"{variables.START_TIMEOUT}={raw!r} is not a positive number") from None


def _timeout(value: float) -> float:
    if not value > 0:  # also refuses NaN
        raise ClusterError(f"start timeout {value!r} is not a positive number of seconds")
    return float(value)


def find_mpiexec(explicit: str | None = None) -> str:
    """The mpiexec to use: explicit (site MPI, checked), else the one of mpi4py's MPI.

    ipyparallel calls a bare ``mpiexec`` by default, which fails when the venv's
    ``bin/`` is not on PATH (a kernel started by JupyterHub): resolve it here.
    The choice and its rules: :mod:`casa_kernel.config.mpi_match`.
    """
    return resolve_mpiexec(explicit).mpiexec
