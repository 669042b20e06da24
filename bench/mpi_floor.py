"""Raw mpi4py floors, run under ``mpiexec -n N`` (rank 0 plays the client).

``python mpi_floor.py ROUNDS MB``: rank 0 prints one marked JSON line with
- ``init_s``: time of ``from mpi4py import MPI`` (MPI_Init) on rank 0;
- ``roundtrip_s``: per-round times of a no-op dispatch done the MPI way: rank 0
  bcasts a small command, every rank answers, rank 0 gathers the answers;
- ``gather``: per-round times of gathering ``MB`` MiB of float64 from every other
  rank into rank 0 (``Gatherv`` of numpy buffers, no pickling).
"""

import json
import sys
import time

t0 = time.perf_counter()
from mpi4py import MPI  # noqa: E402

init_s = time.perf_counter() - t0

import numpy as np  # noqa: E402

MARK = "@@BENCH@@"


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    mib = float(sys.argv[2]) if len(sys.argv) > 2 else 0
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()

    def noop_round():
        cmd = comm.bcast({"code": "pass"} if rank == 0 else None, root=0)
        return comm.gather(None if cmd else 0, root=0)

    for _ in range(5):
        noop_round()
    rts = []
    for _ in range(rounds):
        comm.Barrier()
        t = time.perf_counter()
        noop_round()
        rts.append(time.perf_counter() - t)

    gather = []
    nbytes = 0
    if mib > 0 and size > 1:
        n = int(mib * 2**20 / 8)
        send = np.ones(n if rank else 0, dtype=np.float64)
        counts = [0] + [n] * (size - 1)
        recv = np.empty(sum(counts), dtype=np.float64) if rank == 0 else None
        nbytes = recv.nbytes if rank == 0 else 0
        for i in range(6):
            comm.Barrier()
            t = time.perf_counter()
            comm.Gatherv(send, [recv, counts] if rank == 0 else None, root=0)
            if i:  # first one warms up
                gather.append(time.perf_counter() - t)
    if rank == 0:
        print(
            MARK
            + json.dumps(
                {
                    "size": size,
                    "init_s": init_s,
                    "roundtrip_s": rts,
                    "gather_s": gather,
                    "gather_bytes": nbytes,
                }
            ),
            flush=True,
        )


main()
