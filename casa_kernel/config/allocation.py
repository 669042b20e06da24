"""Batch allocations: which hosts, and how many slots on each, a job was given.

A kernel started inside a batch job (``salloc``, ``sbatch``, ``qsub``, ``bsub``,
or a JupyterHub single-user server that batchspawner runs as a job) sizes its
cluster from the job rather than from ``-n``/``--hostfile``.  This module reads
the resource manager's environment and turns it into the same ordered
``(host, slots)`` list a hostfile gives, so :func:`casa_kernel.config.hostfile.place`
applies the mpicasa rule unchanged: the client takes one slot on the node the
kernel runs on (the job's first node), the servers fill the remaining slots in
order.

Formats read (all pure: the environment and file text come in as arguments):

* Slurm: ``SLURM_JOB_NODELIST`` in hostlist syntax (``node[01-04,07]``,
  ``rack[1-2]-n[1-2]``, ``a,b[3-4]``) and ``SLURM_TASKS_PER_NODE`` (``2(x3),1``);
  ``SLURM_JOB_ID``.
* PBS / Torque / PBS Pro: ``PBS_NODEFILE``, one line per slot, a host repeated
  once per slot; ``PBS_JOBID``.
* LSF: ``LSB_MCPU_HOSTS``, ``"hostA 4 hostB 2"``; ``LSB_JOBID``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from casa_kernel.config.hostfile import HostEntry, Placement, place
from casa_kernel.errors import CasaKernelError, PlacementError


class AllocationError(CasaKernelError, ValueError):
    """The resource manager's description of the job cannot be read."""


@dataclass(frozen=True)
class Allocation:
    """The hosts of a batch job with their slots, in the resource manager's order."""

    manager: str  # "Slurm" | "PBS" | "LSF"
    job_id: str
    hosts: tuple[tuple[str, int], ...]

    @property
    def source(self) -> str:
        """What the layout came from, e.g. ``"Slurm job 1234"``."""
        return f"{self.manager} job {self.job_id}" if self.job_id else f"{self.manager} job"

    @property
    def slots(self) -> int:
        return sum(count for _, count in self.hosts)

    def describe(self) -> str:
        """``"Slurm job 1234: antares 2, orion 3"``."""
        return f"{self.source}: " + ", ".join(f"{host} {count}" for host, count in self.hosts)

    def host_entries(self) -> list[HostEntry]:
        """The hosts as a parsed hostfile, for :func:`casa_kernel.config.hostfile.place`."""
        return [
            HostEntry(host, count, None, line)
            for line, (host, count) in enumerate(self.hosts, start=1)
        ]

    def client_first(self, hostname: str) -> Allocation:
        """The same allocation with the node the kernel runs on first.

        A batch script runs on the job's first node, so this changes nothing
        there; a kernel started on another node of the job (``srun`` of a
        notebook server) must still hold the client's slot where it runs.  A
        kernel outside the job (a login node) keeps the order.
        """
        short = hostname.split(".", 1)[0].lower()
        for index, (host, _) in enumerate(self.hosts):
            if host.lower() in (hostname.lower(), short) or host.split(".", 1)[0].lower() == short:
                if index == 0:
                    return self
                hosts = (self.hosts[index], *self.hosts[:index], *self.hosts[index + 1 :])
                return Allocation(self.manager, self.job_id, hosts)
        return self


# -- Slurm ----------------------------------------------------------------------

_RANGE = re.compile(r"(\d+)(?:-(\d+))?\Z")


def expand_hostlist(text: str) -> list[str]:
    """Slurm's hostlist syntax expanded, in order: ``n[01-03,07]`` -> n01 n02 n03 n07.

    Zero padding follows the range's first number, as in Slurm; several bracket
    groups in one name multiply (``r[1-2]-n[1-2]`` -> r1-n1 r1-n2 r2-n1 r2-n2).
    """
    hosts: list[str] = []
    for item in _split_top_level(text.strip(), text):
        hosts += _expand_item(item, text)
    if not hosts:
        raise AllocationError(f"empty Slurm node list {text!r}")
    return hosts


def _split_top_level(text: str, whole: str) -> list[str]:
    """Split on commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise AllocationError(f"nested brackets in Slurm node list {whole!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise AllocationError(f"unbalanced ']' in Slurm node list {whole!r}")
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise AllocationError(f"unbalanced '[' in Slurm node list {whole!r}")
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str, whole: str) -> list[str]:
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1 : close_at], item[close_at + 1 :]
    numbers: list[str] = []
    for part in body.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise AllocationError(f"bad range {part!r} in Slurm node list {whole!r}")
        first, last = match.group(1), match.group(2)
        if last is None:
            numbers.append(first)
            continue
        if int(last) < int(first):
            raise AllocationError(f"range {part!r} runs backwards in Slurm node list {whole!r}")
        width = len(first)
        numbers += [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    tails = _expand_item(rest, whole) if rest else [""]
    return [f"{prefix}{number}{tail}" for number in numbers for tail in tails]


_TASKS = re.compile(r"(\d+)(?:\(x(\d+)\))?\Z")


def expand_tasks_per_node(text: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` expanded: ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in text.split(","):
        match = _TASKS.match(part.strip())
        if not match:
            raise AllocationError(f"bad part {part!r} in SLURM_TASKS_PER_NODE={text!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def slurm_allocation(env: Mapping[str, str]) -> Allocation | None:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or ""
    hosts = expand_hostlist(nodelist)
    tasks = env.get("SLURM_TASKS_PER_NODE")
    # Without a task count (a job asked for nodes only), Slurm runs one task a node.
    counts = expand_tasks_per_node(tasks) if tasks else [1] * len(hosts)
    if len(counts) != len(hosts):
        raise AllocationError(
            f"Slurm job {job_id}: SLURM_JOB_NODELIST={nodelist!r} names {len(hosts)} nodes "
            f"but SLURM_TASKS_PER_NODE={tasks!r} gives {len(counts)} counts"
        )
    return Allocation("Slurm", job_id, _merge(zip(hosts, counts)))


# -- PBS ------------------------------------------------------------------------


def parse_pbs_nodefile(text: str) -> tuple[tuple[str, int], ...]:
    """``PBS_NODEFILE`` text: one host per slot -> (host, slots) in first-seen order."""
    return _merge((line.strip(), 1) for line in text.splitlines() if line.strip())


def pbs_allocation(
    env: Mapping[str, str], read: Callable[[str], str] | None = None
) -> Allocation | None:
    path = env.get("PBS_NODEFILE")
    if not path:
        return None
    job_id = env.get("PBS_JOBID", "")
    try:
        text = (read or _read_text)(path)
    except OSError as exc:
        raise AllocationError(
            f"PBS job {job_id}: cannot read PBS_NODEFILE={path}: {exc.strerror or exc}"
        ) from None
    hosts = parse_pbs_nodefile(text)
    if not hosts:
        raise AllocationError(f"PBS job {job_id}: PBS_NODEFILE={path} lists no host")
    return Allocation("PBS", job_id, hosts)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# -- LSF ------------------------------------------------------------------------


def parse_lsb_mcpu_hosts(text: str) -> tuple[tuple[str, int], ...]:
    """``LSB_MCPU_HOSTS`` = ``"hostA 4 hostB 2"`` -> ((hostA, 4), (hostB, 2))."""
    words = text.split()
    if not words or len(words) % 2:
        raise AllocationError(f"LSB_MCPU_HOSTS={text!r} is not 'host count' pairs")
    pairs = []
    for host, count in zip(words[::2], words[1::2]):
        if not (count.isascii() and count.isdigit()) or int(count) < 1:
            raise AllocationError(f"LSB_MCPU_HOSTS={text!r}: bad slot count {count!r} for {host}")
        pairs.append((host, int(count)))
    return _merge(pairs)


def lsf_allocation(env: Mapping[str, str]) -> Allocation | None:
    text = env.get("LSB_MCPU_HOSTS")
    if not text:
        return None
    return Allocation("LSF", env.get("LSB_JOBID", ""), parse_lsb_mcpu_hosts(text))


# -- all of them -----------------------------------------------------------------


def detect(
    env: Mapping[str, str] | None = None, read: Callable[[str], str] | None = None
) -> Allocation | None:
    """The allocation this process runs in, or None outside any batch job."""
    env = os.environ if env is None else env
    for reader in (slurm_allocation, lsf_allocation):
        found = reader(env)
        if found is not None:
            return found
    return pbs_allocation(env, read)


def place_in(allocation: Allocation, nprocs: int | None = None) -> Placement:
    """Client + servers in the allocation: the first ``nprocs`` slots, or all of them.

    More processes than the job has slots is a :class:`PlacementError` naming
    the job and its slots ("... Slurm job 1234 has 5 slots (antares 2, orion 3)").
    """
    if allocation.slots < 2 and nprocs is None:
        raise PlacementError(
            f"{allocation.describe()}: only {allocation.slots} slot, which the client "
            "takes; ask the resource manager for at least 2 tasks"
        )
    return place(nprocs, allocation.host_entries(), allocation.source)


def _merge(pairs: object) -> tuple[tuple[str, int], ...]:
    """Add up the slots of a host named several times, keeping first-seen order."""
    counts: dict[str, int] = {}
    for host, count in pairs:  # type: ignore[attr-defined]
        counts[host] = counts.get(host, 0) + count
    return tuple(counts.items())


def describe_placement(source: str, placement: Placement) -> str:
    """``"Slurm job 1234: antares 2, orion 3"``: processes per host, the client counted."""
    counts: dict[str, int] = {placement.client_host: 1}
    for host in placement.servers:
        counts[host] = counts.get(host, 0) + 1
    return f"{source}: " + ", ".join(f"{host} {count}" for host, count in counts.items())


# Servers of a batch job land where the resource manager puts them: unknown until
# they register, and never this host (so the controller listens on the network).
BATCH_HOST = "(batch job)"


def batch_placement(nservers: int, label: str) -> tuple[Placement, str]:
    """The placement of servers from the batch queue, and its layout source."""
    return Placement("localhost", (BATCH_HOST,) * nservers, None), label
