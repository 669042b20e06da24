"""Hostfiles and process placement, the mpicasa way.

A hostfile lists the machines of the cluster and how many processes ("slots")
each may run, in OpenMPI's syntax::

    # comment
    orion   slots=5
    antares slots=4 max_slots=8
    sirius                      # one slot: see DEFAULT_SLOTS

mpicasa counts the client in the process total N: ``mpicasa -n 13`` on the file
above runs the client on orion and 12 servers on the 12 remaining slots.  The
kernel *is* the client but is not started by mpiexec, so :func:`place` works out
where the N-1 servers go and :meth:`Placement.server_hostfile_text` writes the
hostfile given to the one mpiexec that starts them: the same hosts, in the same
order, minus the client's slot on the first host.

Everything here is pure except :func:`read_hostfile` (reads the file) and
:func:`is_local_host` (asks the OS for this machine's names).
"""

from __future__ import annotations

import ipaddress
import operator
import os
import re
import socket
from dataclasses import dataclass
from functools import lru_cache

from casa_kernel.config.local_load import check_local_load
from casa_kernel.errors import HostfileError, PlacementError

# Slots of a host written without ``slots=``.  OpenMPI would give it the number
# of cores it detects on that host, which the kernel cannot know before
# launching (and needs now, to place the servers).  mpicasa's documentation
# always writes ``slots=``, and 1 is what ``mpiexec --host h`` gives, so 1 it is.
DEFAULT_SLOTS = 1

# Beyond any cluster of ipyparallel engines, even forced or from a hostfile
# (`-n 99999999999999999999` must be an error, not a tuple the size of RAM).
MAX_PROCS = 100_000

# The keys a hostfile line may carry, with OpenMPI's spellings, mapped to one
# canonical name (so "max_slots=2 max-slots=3" is caught as a duplicate).
# OpenMPI also knows cpu=, count=, slot= and more; mpicasa never uses them and
# silently accepting a key we then ignore would be worse than an error.
_KEYS = {"slots": "slots", "max_slots": "max_slots", "max-slots": "max_slots"}

# No machine has a billion slots, and int() refuses strings of over 4300 digits
# with a ValueError: cap the digits so an absurd count is a HostfileError.
_MAX_DIGITS = 9

# OpenMPI's lexer separates tokens with these only; any other whitespace
# (no-break space, ...) stays inside a token and is reported, quoted, as a bad
# character rather than silently splitting the line differently than mpiexec.
_BLANKS = re.compile(r"[ \t\f\v\r]+")
# OpenMPI lexes "=" as its own token, so "slots = 4" is as valid as "slots=4".
_EQUALS = re.compile(r"[ \t\f\v]*=[ \t\f\v]*")
# Host names (RFC 952/1123 letters, digits, "-", ".", plus the "_" OpenMPI
# accepts) and IPv4 addresses; IPv6 addresses are checked by ipaddress.
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


@dataclass(frozen=True)
class HostEntry:
    """One host of a hostfile, with its lines added up.

    ``max_slots`` is None when any line naming the host had no cap.  ``line`` is
    the 1-based line where the host first appears (its place in the order).
    """

    host: str
    slots: int
    max_slots: int | None
    line: int


def parse_hostfile(text: str, path: str = "<hostfile>") -> list[HostEntry]:
    """Parse hostfile ``text``; ``path`` is only used in error messages.

    Returns the hosts in order of first appearance; a host named on several
    lines gets the sum of their slots.  Raises :class:`HostfileError` naming
    ``path`` and the line for any malformed line, and naming ``path`` alone when
    there is no host at all.
    """
    hosts: dict[str, HostEntry] = {}  # insertion-ordered: first appearance
    # Only "\n" ends a line (with "\r\n" the "\r" is a blank), as for mpiexec
    # and editors; str.splitlines() would also split on \v, \f, \x1c, ... and
    # report line numbers the user cannot find.
    for number, line in enumerate(text.split("\n"), start=1):
        parsed = _parse_line(line, number, path)
        if parsed is None:
            continue
        host, slots, max_slots = parsed
        seen = hosts.get(host)
        if seen is None:
            hosts[host] = HostEntry(host, slots, max_slots, number)
        else:
            # A line without max_slots does not cap its slots, so neither
            # does the sum.
            cap = (
                None if seen.max_slots is None or max_slots is None else seen.max_slots + max_slots
            )
            hosts[host] = HostEntry(host, seen.slots + slots, cap, seen.line)
    if not hosts:
        raise HostfileError("no hosts in the hostfile (only comments and blank lines)", path)
    return list(hosts.values())


def read_hostfile(path: str | os.PathLike[str]) -> list[HostEntry]:
    """Read and parse the hostfile at ``path`` (UTF-8).

    Every way the file can fail to be read (missing, a directory, unreadable,
    not UTF-8) is a :class:`HostfileError` naming the path, so the kernel
    reports all hostfile problems the same way.
    """
    name = os.fspath(path)
    try:
        # utf-8-sig: a byte-order mark left by a Windows editor is not a host.
        with open(name, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise HostfileError("hostfile not found", name) from None
    except IsADirectoryError:
        raise HostfileError("is a directory, not a hostfile", name) from None
    except PermissionError:
        raise HostfileError("cannot read the hostfile: permission denied", name) from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        bad = exc.object[exc.start : exc.start + 1]
        raise HostfileError(f"not UTF-8 text (byte {bad!r})", name, line) from None
    except OSError as exc:
        raise HostfileError(f"cannot read the hostfile: {exc.strerror or exc}", name) from None
    return parse_hostfile(text, name)


def _parse_line(line: str, number: int, path: str) -> tuple[str, int, int | None] | None:
    """(host, slots, max_slots) of one line, or None for a blank/comment line."""
    content = line.split("#", 1)[0]  # as in OpenMPI, "#" starts a comment anywhere
    tokens = [t for t in _BLANKS.split(_EQUALS.sub("=", content)) if t]
    if not tokens:
        return None
    host, *fields = tokens
    _check_host(host, number, path)

    given: dict[str, tuple[str, int]] = {}  # canonical key -> (token as written, value)
    for field in fields:
        key, equals, value = field.partition("=")
        if not equals:
            raise HostfileError(
                f"expected key=value after the host name, got {field!r}", path, number
            )
        canonical = _KEYS.get(key)
        if canonical is None:
            raise HostfileError(
                f"unknown key {key!r} in {field!r} (a line takes slots=K and max_slots=M)",
                path,
                number,
            )
        if canonical in given:
            raise HostfileError(
                f"{given[canonical][0]!r} and {field!r}: the same key twice on one line",
                path,
                number,
            )
        given[canonical] = (field, _parse_count(field, value, number, path))

    slots = given.get("slots")
    cap = given.get("max_slots")
    if slots is not None and cap is not None and slots[1] > cap[1]:
        raise HostfileError(f"{slots[0]!r} is more than {cap[0]!r}", path, number)
    max_slots = cap[1] if cap else None
    if slots is not None:
        return host, slots[1], max_slots
    # OpenMPI: max_slots alone means the host may run that many.
    return host, max_slots if max_slots is not None else DEFAULT_SLOTS, max_slots


def _check_host(host: str, number: int, path: str) -> None:
    if "=" in host:
        raise HostfileError(f"expected a host name first, got {host!r}", path, number)
    if ":" in host:
        address, _, scope = host.partition("%")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise HostfileError(f"not a valid IPv6 address: {host!r}", path, number) from None
        # ipaddress takes any text as a zone ("fe80::1%eth0"); keep it a name.
        if "%" in host and not _HOSTNAME.match(scope):
            raise HostfileError(f"bad IPv6 zone in {host!r}", path, number)
        return
    if not _HOSTNAME.match(host):
        raise HostfileError(f"bad character in host name {host!r}", path, number)


def _parse_count(field: str, value: str, number: int, path: str) -> int:
    # isascii() first: int() and isdigit() accept non-ASCII digits like "٣".
    if not (value.isascii() and value.isdigit()):
        raise HostfileError(f"{field!r}: the count must be a positive whole number", path, number)
    if len(value.lstrip("0")) > _MAX_DIGITS:
        raise HostfileError(f"{field!r}: the count is absurdly large", path, number)
    count = int(value)
    if count < 1:
        raise HostfileError(f"{field!r}: the count must be at least 1", path, number)
    return count


@dataclass(frozen=True)
class Placement:
    """Where the client and each server run.

    ``servers[r]`` is the host of server rank ``r``.  Each host's servers are
    consecutive, in hostfile order: that is the order in which mpiexec's default
    by-slot mapping fills :meth:`server_hostfile_text`, so ranks land where
    ``servers`` says.
    """

    client_host: str
    servers: tuple[str, ...]
    hostfile: str | None = None  # the user's hostfile, None for a plain process count

    def __post_init__(self) -> None:
        # A host coming back after another one cannot be written as a hostfile
        # that mpiexec maps in this rank order, so refuse to represent it.
        runs = [h for i, h in enumerate(self.servers) if i == 0 or self.servers[i - 1] != h]
        if len(runs) != len(set(runs)):
            raise ValueError(f"each host's servers must be consecutive: {self.servers!r}")

    @property
    def nprocs(self) -> int:
        """The mpicasa process count: the servers plus the client."""
        return 1 + len(self.servers)

    def server_slots(self) -> list[tuple[str, int]]:
        """(host, number of servers) in rank order; hosts with no server are left out."""
        counts: dict[str, int] = {}
        for host in self.servers:
            counts[host] = counts.get(host, 0) + 1
        return list(counts.items())

    def server_hostfile_text(self, cube_client: bool = False) -> str:
        """The hostfile for the servers' mpiexec, run with ``-n len(servers)``
        (``+ 1`` with the ``cube_client``, world rank 0: it takes the client's slot
        on the client's host, where the kernel waits while a cube runs).

        Exactly those slots, so mpiexec neither oversubscribes nor leaves a
        gap that would shift ranks onto another host.
        """
        source = self.hostfile if self.hostfile is not None else f"a process count of {self.nprocs}"
        # A newline in the path would end the comment and turn the rest into a host.
        source = source.replace("\n", "\\n")
        lines = [
            f"# Derived by casa-kernel from {source}; regenerated at every start.",
            f"# The client (this kernel) holds one slot on {self.client_host}; "
            f"these are the slots of its {len(self.servers)} servers, in rank order.",
        ]
        slots = self.server_slots()
        if cube_client:
            lines[1] = (
                f"# The client's slot on {self.client_host} is CASA's cube client's "
                f"(world rank 0); then the slots of the {len(self.servers)} servers."
            )
            if slots and slots[0][0] == self.client_host:
                slots[0] = (self.client_host, slots[0][1] + 1)
            else:
                slots.insert(0, (self.client_host, 1))
        lines += [f"{host} slots={count}" for host, count in slots]
        return "\n".join(lines) + "\n"

    @property
    def is_local(self) -> bool:
        """True when the client and every server run on this machine."""
        return all(is_local_host(host) for host in {self.client_host, *self.servers})


def place(
    nprocs: int | None,
    hosts: list[HostEntry] | None = None,
    path: str | None = None,
    *,
    cores: int | None = None,
    oversubscribe: bool = False,
) -> Placement:
    """Place the client and N-1 servers, N = ``nprocs`` counting the client.

    With ``hosts`` (from :func:`parse_hostfile`, ``path`` naming its file), the
    client takes one slot on the first host and the servers fill the remaining
    slots in file order; ``nprocs=None`` uses every slot.  Without ``hosts``
    everything runs on localhost.  Raises :class:`PlacementError`, before
    anything is launched, when N is not a whole number, is below 2, exceeds
    the slots, or when neither N nor hosts is given; and, without ``hosts``,
    when the servers exceed ``MAX_SERVERS_PER_CORE`` per core of this machine
    (``cores``, its count; None skips the check; see local_load) unless ``oversubscribe``.
    """
    source = path if path is not None else "<hostfile>"
    where = f" (hostfile {source})" if hosts is not None else ""
    n: int | None = None
    if nprocs is not None:
        # bool is an int to Python but never a process count; operator.index
        # takes numpy integers and refuses floats and strings.
        try:
            if isinstance(nprocs, bool):
                raise TypeError
            n = operator.index(nprocs)
        except TypeError:
            raise PlacementError(
                f"the process count must be a whole number, got {nprocs!r}{where}"
            ) from None

    if hosts is None:
        if n is None:
            raise PlacementError(
                "no process count and no hostfile: give N (which counts the client) or a hostfile"
            )
        _check_at_least_two(n, where)
        _check_at_most(n, where)
        if cores is not None and not oversubscribe:
            check_local_load(n, cores)
        return Placement("localhost", ("localhost",) * (n - 1), None)

    if not hosts:
        raise PlacementError(f"{source} has no hosts")
    total = sum(h.slots for h in hosts)
    if n is None:
        if total < 2:
            raise PlacementError(
                f"{source} has only {total} slot, which the client takes: "
                "no slot is left for a server"
            )
        n = total
    _check_at_least_two(n, where)
    if n > total:
        breakdown = ", ".join(f"{h.host} {h.slots}" for h in hosts)
        raise PlacementError(
            f"N={n} processes requested but {source} has {total} "
            f"slot{'s' if total != 1 else ''} ({breakdown})"
        )
    _check_at_most(n, where)

    free = [hosts[0].slots - 1] + [h.slots for h in hosts[1:]]  # client's slot taken
    servers: list[str] = []
    left = n - 1
    for entry, capacity in zip(hosts, free, strict=True):
        take = min(capacity, left)
        servers += [entry.host] * take
        left -= take
    return Placement(hosts[0].host, tuple(servers), source)


def _check_at_most(n: int, where: str) -> None:
    if n > MAX_PROCS:
        raise PlacementError(
            f"N={n} processes{where} is beyond any cluster casa-kernel can run "
            f"(at most {MAX_PROCS})"
        )


def _check_at_least_two(n: int, where: str) -> None:
    if n < 2:
        raise PlacementError(
            f"N={n} processes requested{where}: N counts the client (this kernel) too, "
            "so it must be at least 2 for one server"
        )


def is_local_host(name: str) -> bool:
    """Whether ``name`` is this machine: localhost, a loopback address, or its own name.

    An address of one of this machine's network interfaces counts as remote:
    telling would need interface enumeration, and "remote" is the safe answer.
    """
    name = name.strip().lower().rstrip(".")  # DNS names are case-blind; "a.b." is "a.b"
    if not name:
        return False
    if name in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(name.split("%", 1)[0]).is_loopback  # 127/8, ::1
    except ValueError:
        pass  # not an address: compare names
    hostname = socket.gethostname().lower().rstrip(".")
    if name in (hostname, hostname.split(".", 1)[0]):
        return True
    return name == _fqdn()


@lru_cache(maxsize=1)
def _fqdn() -> str:
    # getfqdn() may ask DNS, which can take seconds on a badly configured
    # network: only when the cheap checks failed, and only once.
    return socket.getfqdn().lower().rstrip(".")
