"""Every ``CASA_KERNEL_*`` environment variable, defined once.

A kernelspec writes them in its ``env`` (``casa-kernel install``), the kernel
reads them at start, and the kernel sets some for its own cluster's processes.
Every other module names a variable through the constant here (no other module
spells the prefix: ``tests/unit/test_ladder.py`` checks it), and the docs build
their reference page from :data:`VARIABLES`. Imports nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, its default (as text) and what it means."""

    name: str
    default: str
    meaning: str


NPROCS = "CASA_KERNEL_NPROCS"
HOSTFILE = "CASA_KERNEL_HOSTFILE"
MPIEXEC = "CASA_KERNEL_MPIEXEC"
MPI_ARGS = "CASA_KERNEL_MPI_ARGS"
START_TIMEOUT = "CASA_KERNEL_START_TIMEOUT"
CONTROLLER_LOCATION = "CASA_KERNEL_CONTROLLER_LOCATION"
PRELOAD = "CASA_KERNEL_PRELOAD"
SERVER_MEMORY = "CASA_KERNEL_SERVER_MEMORY"
OVERSUBSCRIBE = "CASA_KERNEL_OVERSUBSCRIBE"
BATCH = "CASA_KERNEL_BATCH"
ENCRYPT = "CASA_KERNEL_ENCRYPT"
KEY_DIR = "CASA_KERNEL_KEY_DIR"
PREFLIGHT = "CASA_KERNEL_PREFLIGHT"
PREFLIGHT_TIMEOUT = "CASA_KERNEL_PREFLIGHT_TIMEOUT"
LOG_DIR = "CASA_KERNEL_LOG_DIR"
LOG_TAG = "CASA_KERNEL_LOG_TAG"
CUBE_CLIENT = "CASA_KERNEL_CUBE_CLIENT"
OWNER = "CASA_KERNEL_OWNER"

#: The table, in the order a reader meets them: what a kernelspec sets, then
#: security and the preflight, then what the kernel sets for its processes.
VARIABLES: tuple[Variable, ...] = (
    Variable(
        NPROCS,
        "",
        "N, the total process count including the client, as in `mpicasa -n N`; "
        "unset: every slot of the hostfile, else the batch allocation the kernel runs in, "
        "else 3 on this machine",
    ),
    Variable(
        HOSTFILE,
        "",
        "absolute path of an OpenMPI-syntax hostfile placing the client and the servers; "
        "unset: this machine, or the batch allocation the kernel runs in",
    ),
    Variable(
        MPIEXEC,
        "",
        "the mpiexec that starts the servers (a site MPI); refused if its --version names "
        "another MPI than mpi4py's library; unset: the mpiexec of mpi4py's MPI, looked for "
        "beside its libmpi, in the environment's bin/, beside mpicasa, then on PATH",
    ),
    Variable(
        MPI_ARGS,
        "",
        "extra mpiexec arguments (shell words), appended to the ones casa-kernel builds",
    ),
    Variable(
        START_TIMEOUT,
        "120",
        "seconds the servers get to start and register, and each server to import CASA "
        "(servers from the batch queue get at least 3600)",
    ),
    Variable(
        CONTROLLER_LOCATION,
        "",
        "the name or address servers on other hosts use to reach the controller; "
        "unset: this machine's fully qualified name",
    ),
    Variable(
        PRELOAD,
        "1",
        "1: load CASA in the kernel and on every server at start; 0: on first use "
        "(less memory while idle, ~4 s on the first task)",
    ),
    Variable(
        OVERSUBSCRIBE,
        "0",
        "1: allow more than 8 servers per core of this machine (without a hostfile)",
    ),
    Variable(
        BATCH,
        "",
        "start the servers as ONE job of the batch queue: `slurm` or `pbs` with "
        "%casa_cluster's options (`slurm --time 2:00:00 --partition P --account A`)",
    ),
    Variable(
        ENCRYPT,
        "",
        "encrypt the controller's traffic (CurveZMQ): 1 always, 0 never; "
        "unset: whenever a server may run on another host",
    ),
    Variable(
        SERVER_MEMORY,
        "",
        "the memory each server tells CASA it has, for CASA's own planning (a cube's "
        "chunks), e.g. 8GiB; unset: what the server may use (the host's memory, or its "
        "batch job's or cgroup's limit) divided by the servers on its host; 0: the whole "
        "host for every server, as under mpicasa",
    ),
    Variable(
        KEY_DIR,
        "~/.local/state/casa-kernel/clusters",
        "a folder every host mounts at the same path, where encrypted servers on other "
        "hosts read their connection key while they start (default under $XDG_STATE_HOME)",
    ),
    Variable(
        PREFLIGHT,
        "1",
        "0: skip the automatic check of the servers' other hosts before a multi-host launch",
    ),
    Variable(
        PREFLIGHT_TIMEOUT,
        "20",
        "seconds each host gets to answer the preflight's probe",
    ),
    Variable(
        LOG_DIR,
        "~/.local/state/casa-kernel/logs",
        "the folder of CASA's log files, one per process (the kernel sets it for its "
        "servers; default under $XDG_STATE_HOME)",
    ),
    Variable(
        LOG_TAG,
        "kernel<pid>",
        "set by the kernel: names one kernel's log files, so notebooks running at the "
        "same time on one machine do not share them",
    ),
    Variable(
        CUBE_CLIENT,
        "",
        "set by the kernel: 1 when world rank 0 of the servers' mpiexec is CASA's cube "
        "client (the servers are world ranks 1..N)",
    ),
    Variable(
        OWNER,
        "",
        "set by the kernel on every process of its cluster: the kernel's pid, so they "
        "can be found even after being orphaned",
    ),
)
