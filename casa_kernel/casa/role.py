"""What this process is in the servers' MPI world: a server, or CASA's cube client.

A cube's C++ parallelism (casacore's applicator) takes world rank 0 as its
controller and every other rank as a worker, and the kernel is not in that world.
So when the kernel starts one (``variables.CUBE_CLIENT`` = 1), world rank 0 of
the servers' mpiexec is a light extra process that is only CASA's cube client:
it idles as an engine between cubes, and the servers are world ranks 1..N, so
2 servers give a cube 2 workers, as under ``mpicasa -n 3``. Read from what
mpiexec puts in the environment, so the site config and the output stream (before
MPI is initialised) name files the same way as the engine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from casa_kernel import variables

# The rank the kernel gives the cube client in its tables (servers are 0..N-1).
CUBE_CLIENT_RANK = -1
# mpiexec's variable for a process's world rank: OpenMPI, PMIx, MPICH/Hydra
WORLD_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


def world_rank(environ: Mapping[str, str] = os.environ) -> int | None:
    """This process's rank in mpiexec's world (None: not started by mpiexec)."""
    for name in WORLD_RANK_VARIABLES:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def has_cube_client(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(variables.CUBE_CLIENT) == "1"


def server_rank(environ: Mapping[str, str] = os.environ) -> int | None:
    """This server's rank among the servers; CUBE_CLIENT_RANK for the cube client;
    None outside mpiexec."""
    world = world_rank(environ)
    if world is None or not has_cube_client(environ):
        return world
    return CUBE_CLIENT_RANK if world == 0 else world - 1


def role_name(rank: int | None) -> str:
    """How files name a process: 'client' (the kernel), 'rank<R>', 'cubeclient'."""
    if rank is None:
        return "client"
    return "cubeclient" if rank == CUBE_CLIENT_RANK else f"rank{int(rank)}"


def world_to_server(world: int, cube_client: bool) -> int:
    """The server rank (or CUBE_CLIENT_RANK) of world rank ``world`` (kernel side:
    mpiexec names the ranks of the world it ended)."""
    if not cube_client:
        return world
    return CUBE_CLIENT_RANK if world == 0 else world - 1
