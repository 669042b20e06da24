"""The controller's ports: chosen here, outside the range the kernel gives outgoing connections.

Left to itself, ipyparallel's controller picks its ~20 ports by binding port 0
and closing (``util.select_random_ports``), then binds them for real later, some
in processes it forks (heart monitor, schedulers). Port 0 draws from the same
range (``net.ipv4.ip_local_port_range``) the kernel draws the LOCAL port of
every outgoing connection from, and the client and the servers start connecting
to the hub as soon as its connection file exists. When one of those
connections is given a port the heart monitor has not bound yet, the heart
monitor dies ("Address already in use"), the hub lives on, the servers register
and never get a heartbeat: the start hangs with a silent controller (CI saw it
once in ~600 tests; in a network namespace with a 300-port range, most starts).
Ports below that range are never handed out to outgoing connections, so a port
found free here stays free unless another program binds it explicitly.
"""

from __future__ import annotations

import random
import socket

# How many ports the controller may draw (it needs 16 with our settings: its
# log says "Exhausted N common ports" when it needs more and then falls back).
CONTROLLER_PORTS = 32
# Where to look when the kernel's range is not known (not Linux): IANA's
# registered range below the usual ephemeral start (32768 on Linux, 49152 IANA).
FALLBACK_RANGE = (20000, 32767)
_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def ephemeral_range(path: str = _RANGE_FILE) -> tuple[int, int] | None:
    """The kernel's range for outgoing connections' local ports (None: unknown)."""
    try:
        with open(path) as f:
            low, high = (int(word) for word in f.read().split()[:2])
    except (OSError, ValueError):
        return None
    return low, high


def candidate_range(ephemeral: tuple[int, int] | None) -> tuple[int, int]:
    """Ports to choose from: below the ephemeral range (pure).

    With an unusual range that starts low (under 2048), above it instead.
    """
    if ephemeral is None:
        return FALLBACK_RANGE
    low, high = ephemeral
    if low > 2048:
        return max(1024, low - 20000), low - 1
    return high + 1, 65535


def free_ports(count: int, host: str = "127.0.0.1", rng: random.Random | None = None) -> list[int]:
    """``count`` distinct ports that no socket on ``host`` uses now, outside the
    ephemeral range; ``[]`` when not enough were found (ipyparallel then picks)."""
    rng = rng or random.SystemRandom()
    first, last = candidate_range(ephemeral_range())
    bind_host = "" if host in ("*", "0.0.0.0") else host
    found: list[int] = []
    tried: set[int] = set()
    while len(found) < count and len(tried) < min(20 * count, last - first + 1):
        port = rng.randint(first, last)
        if port in tried:
            continue
        tried.add(port)
        with socket.socket() as sock:
            try:
                sock.bind((bind_host, port))
            except OSError:
                continue
        found.append(port)
    return found if len(found) == count else []


def controller_args(host: str) -> list[str]:
    """``--IPController.ports=...`` for the controller's command line."""
    ports = free_ports(CONTROLLER_PORTS, host)
    return [f"--IPController.ports={','.join(map(str, ports))}"] if ports else []
