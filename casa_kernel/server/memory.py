"""A server's share of its host's memory, for CASA's own planning; the
out-of-memory killer's count, to tell its kills from other deaths.

CASA sizes its work (a cube's chunks, gridding buffers) from casacore's
HostInfo: the host's memory, unless ``system.resources.memory`` (MiB) is set in
a casarc file, and every process assumes the whole host is its own. With N
servers on a host each one planning for all of it is how large cubes get
OOM-killed. So each server gets 1/N of what it may use (the host's memory, or
its cgroup's limit: a batch job's), written to a casarc file put first in
CASARCFILES before CASA is imported (casacore reads it once per process; the
first file that sets a keyword wins). The OpenMP threads are shared the same
way (server/cube.py's limit_threads).

Servers also ask the OOM killer to take them before the kernel
(``oom_score_adj``): a server is replaced, a killed kernel loses the session.
"""

from __future__ import annotations

import os
from pathlib import Path

# Raised for servers (the range is -1000..1000; raising it needs no privilege).
OOM_SCORE_ADJ = 500
# A share below this is not given (CASA plans badly with almost nothing).
MIN_SHARE = 16 * 2**20


_UNITS = {
    **{"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40},
    **{"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12},
    **{"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40},
}


def parse_size(text: str) -> int:
    """'8GiB', '500MB', '1.5g', '0' -> bytes; ValueError naming what is wrong."""
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("kmgtib")
    unit = value[len(number) :]
    try:
        size = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"not a size: {text!r} (say 8GiB, 500MB or 0)") from None
    if size < 0:
        raise ValueError(f"not a size: {text!r} (negative)")
    return int(size)


def servers_here() -> int:
    """How many servers share this host (the MPI launcher says; 1 if it does not)."""
    for name in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def share_for_this_server(setting: str) -> int:
    """The bytes this server tells CASA it has: ``setting`` (variables.SERVER_MEMORY)
    if given (0: none, CASA sees the whole host), else what it may use / servers here."""
    if setting.strip():
        return parse_size(setting)
    return max(MIN_SHARE, memory_limit() // servers_here())


def memory_limit() -> int:
    """What this process may use: the host's memory, or less if its cgroup says so."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    return min(total, limit) if limit else total


def cgroup_dir() -> str:
    """This process's memory cgroup folder ('' when there is none to read)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # cgroup v1
            folder = f"/sys/fs/cgroup/memory{path}"
            return folder if os.path.isdir(folder) else ""
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2 (unified)
            folder = f"/sys/fs/cgroup{path}"
            if os.path.exists(os.path.join(folder, "memory.max")):
                return folder
    return ""


def _cgroup_limit() -> int:
    """The lowest memory limit of this process's cgroup and its parents (0: none)."""
    folder = cgroup_dir()
    lowest = 0
    while folder.startswith("/sys/fs/cgroup") and os.path.isdir(folder):
        for name in ("memory.max", "memory.limit_in_bytes"):
            try:
                text = Path(folder, name).read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 2**60:  # "max" / ~2**63: no limit
                lowest = int(text) if not lowest else min(lowest, int(text))
        folder = os.path.dirname(folder)
    return lowest


def oom_kills(folder: str) -> int | None:
    """How many processes of cgroup ``folder`` the OOM killer took (None: unknown)."""
    for name, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
        try:
            lines = Path(folder, name).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            field, _, value = line.partition(" ")
            if field == key and value.strip().isdigit():
                return int(value)
    return None


def cgroup_peak(folder: str) -> tuple[int | None, int | None]:
    """(the most memory cgroup ``folder`` held, its limit), None where unknown or
    unlimited: after an OOM kill, how full it was (the killed process is gone)."""

    def read(*names: str) -> int | None:
        for name in names:
            try:
                text = Path(folder, name).read_text().strip()
            except OSError:
                continue
            return int(text) if text.isdigit() and int(text) < 2**60 else None
        return None

    return (
        read("memory.peak", "memory.max_usage_in_bytes"),
        read("memory.max", "memory.limit_in_bytes"),
    )


def give_casa_share(share: int, rc: str) -> None:
    """Make CASA in this process plan for ``share`` bytes (before CASA is imported),
    through the casarc file ``rc`` (written here)."""
    rc_file = Path(rc)
    rc_file.write_text(f"system.resources.memory: {max(1, share // 2**20)}\n")
    # CASARCFILES replaces casacore's own list: the user's files stay after ours
    theirs = os.environ.get("CASARCFILES") or ":".join(
        str(Path.home() / name) for name in (".casarc", ".casa/rc", ".aipsrc")
    )
    os.environ["CASARCFILES"] = f"{rc_file}:{theirs}"


def be_the_oom_killers_first_choice() -> None:
    try:
        Path("/proc/self/oom_score_adj").write_text(str(OOM_SCORE_ADJ))
    except OSError:
        pass  # not Linux, or a kernel that refuses: nothing else depends on it
