"""How many servers one machine takes when there is no hostfile.

Without a hostfile every server runs on this machine. :func:`check_local_load`
is pure (hostfile.place calls it with the core count); :func:`local_cores`
asks the OS for that count.
"""

from __future__ import annotations

import os

from casa_kernel import variables
from casa_kernel.errors import PlacementError

# Beyond this many servers per core nothing runs faster and memory runs out
# first (`-n 10000` on 2 cores once launched 9999 servers: OOM kills, then the
# kernel died), so it is refused before launching unless forced
# (variables.OVERSUBSCRIBE, or --oversubscribe).
MAX_SERVERS_PER_CORE = 8


def check_local_load(n: int, cores: int) -> None:
    cores = max(1, cores)
    limit = MAX_SERVERS_PER_CORE * cores
    if n - 1 > limit:
        raise PlacementError(
            f"N={n} would start {n - 1} servers on this machine, which has {cores} "
            f"core{'s' if cores != 1 else ''}: more than {MAX_SERVERS_PER_CORE} servers per "
            f"core ({limit}) is refused before launching. Use a hostfile to spread them "
            f"over several machines, a smaller N, or force it with --oversubscribe "
            f"(%casa_cluster) or {variables.OVERSUBSCRIBE}=1"
        )


def local_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1
