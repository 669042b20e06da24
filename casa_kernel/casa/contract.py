"""What a casatasks release asks of casampi, read from its source: the contract scan.

casatasks reaches its MPI servers through ``casampi`` and casa-kernel serves the
part of casampi it uses (casa_kernel/casampi/). This module reads a casatasks
source tree (an installed one, or a release's wheel unzipped) and lists every
casampi name it uses, where: the casampi modules it imports, the attributes it
reads of ``MPIEnvironment``, of ``MPICommandClient`` (``self._cluster`` in the
task helpers, ``client`` in the parallel task helper), of ``MPIInterface`` (and
the parallel imager helper's ``mpi_clustermanager`` / ``self.sc``), of
MPIInterface's core (``_cluster.`` in the tasks, ``self.CL.`` in the imager
helper), and the command forms the kernel interprets (the ``initmpi`` command
that puts the servers in C++ MPI mode for a cube).

Pure: text in, :class:`Use` out (:func:`cached_scan` alone reads and writes
files). ONE scan, used by the contract test of every supported release
(tests/test_casa_releases.py, each release's wheel) and by
the kernel at start-up for a release it has not read (casampi/bridge.py's
``check_release``); the served side is the bridge's (``bridge.serves``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# casampi's server loop: casatasks imports it under MPI to turn a rank into a
# casampi server. Never served, on purpose (the kernel's servers are ipyparallel
# engines): casatasks catches the ImportError.
NOT_SERVED = frozenset({("module", "private.start_mpi")})

# Every release scanned so far uses at least these: a scan that finds fewer read
# the wrong tree, or casatasks reaches its servers another way now.
REQUIRED = frozenset(
    {
        ("client", "push_command_request"),
        ("client", "get_command_response"),
        ("core", "pgc"),
        ("core", "odo"),
        ("core", "check_job"),
        ("core", "get_engines"),
        ("command", "initmpi"),
    }
)

_MODULE = (
    re.compile(r"\bfrom\s+casampi\.([\w.]+)\s+import\b"),
    re.compile(r"\bimport\s+casampi\.([\w.]+)"),
)
_FROM_PACKAGE = re.compile(r"\bfrom\s+casampi\s+import\s+([\w ,]+)")
_ENV = re.compile(r"\bMPIEnvironment\.(\w+)")
_CORE_CL = re.compile(r"\bCL\.(\w+)")
_CLUSTER_CALL = re.compile(r"(\w*)\._cluster\.(\w+)\(")
# A ParallelTaskHelper subclass (ParallelDataHelper) inherits its self._cluster.
_HELPER = re.compile(r"MPICommandClient|class\s+\w+\(\s*ParallelTaskHelper\s*\)")
_CLIENT_VAR = re.compile(r"\bclient\.(\w+)\(")
_IFACE = (
    re.compile(r"\bmpi_clustermanager\.(\w+)"),
    re.compile(r"\bself\.sc\.(\w+)"),
    re.compile(r"\bMPIInterface\.(\w+)"),
)
_PGC_LITERAL = re.compile(r"\.pgc\(\s*(['\"])(.*?)\1")
# A line without any of these holds none of the names above (most lines: the
# patterns run on a few hundred lines of a release instead of 30,000).
_TRIGGERS = re.compile(r"casampi|MPI|CL\.|_cluster|client\.|self\.sc\.|pgc")


@dataclass(frozen=True, order=True)
class Use:
    """One casampi name a casatasks file uses, and where."""

    kind: str  # module, env, client, core, iface, command
    name: str
    path: str  # relative to the casatasks package folder
    line: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.name)

    def __str__(self) -> str:
        return f"casatasks/{self.path}:{self.line}: {self.kind} {self.name}"


def scan_text(text: str, path: str) -> list[Use]:
    """The casampi names one casatasks source file uses (nothing if it never
    names casampi: then none of these names are casampi's)."""
    helper = _HELPER.search(text) is not None
    if "casampi" not in text and not helper:
        return []
    uses: list[Use] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not _TRIGGERS.search(line):
            continue
        code = line.split("#", 1)[0]

        def add(kind: str, names: Iterable[str], _n: int = number) -> None:
            uses.extend(Use(kind, name, path, _n) for name in names)

        for pattern in _MODULE:
            add("module", pattern.findall(code))
        for group in _FROM_PACKAGE.findall(code):
            add("module", [n.strip() for n in group.split(",") if n.strip()])
        add("env", _ENV.findall(code))
        add("core", _CORE_CL.findall(code))
        # The task helpers hold MPICommandClient as self._cluster (and as
        # ``client``); the tasks hold MPIInterface.getCluster()'s core as
        # ``cl._cluster``.
        for owner, name in _CLUSTER_CALL.findall(code):
            add("client" if helper and owner == "self" else "core", [name])
        if helper:
            add("client", _CLIENT_VAR.findall(code))
        for pattern in _IFACE:
            add("iface", [n for n in pattern.findall(code) if n != "MPIInterface"])
        for _quote, command in _PGC_LITERAL.findall(code):
            if "initmpi" in command:
                add("command", ["initmpi"])
    return uses


def scan_tree(package_dir: Path) -> list[Use]:
    """Every casampi use in a casatasks package folder (``.../casatasks``)."""
    uses: list[Use] = []
    for path in sorted(package_dir.rglob("*.py")):
        data = path.read_bytes()
        if b"casampi" not in data and b"ParallelTaskHelper" not in data:
            continue  # most files: no need to decode them
        text = data.decode(errors="replace")
        uses.extend(scan_text(text, path.relative_to(package_dir).as_posix()))
    return uses


def cached_scan(package_dir: Path, release: str, cache_dir: Path) -> list[Use]:
    """:func:`scan_tree`, kept in ``cache_dir`` per release and install path
    (reading a release's ~300 files took 0.15-1 s on a loaded 2-core box; the
    kernel scans at every start)."""
    key = hashlib.sha256(f"{release}\0{package_dir.resolve()}".encode()).hexdigest()[:16]
    cache = cache_dir / f"casatasks-{release}-{key}.json"
    try:
        with contextlib.suppress(FileNotFoundError):
            return [Use(*row) for row in json.loads(cache.read_text())]
    except (ValueError, TypeError):
        pass  # a cache written by another version of this module: scan again
    uses = scan_tree(package_dir)
    with contextlib.suppress(OSError):  # a read-only home still gets the scan
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps([[u.kind, u.name, u.path, u.line] for u in uses]))
        os.replace(tmp, cache)  # never a half-written cache for another kernel
    return uses


def unserved(uses: Iterable[Use], serves: Callable[[str, str], bool]) -> list[Use]:
    """The uses ``serves(kind, name)`` says the kernel does not serve."""
    return sorted(u for u in uses if u.key not in NOT_SERVED and not serves(u.kind, u.name))


def missing_required(uses: Iterable[Use]) -> list[tuple[str, str]]:
    """Names every release read so far uses and this scan did not find."""
    found = {u.key for u in uses}
    return sorted(REQUIRED - found)


def problems(uses: list[Use], serves: Callable[[str, str], bool]) -> list[str]:
    """What stops the kernel from serving this tree, one line each (empty: nothing)."""
    lines = [f"{u}: not served by casa-kernel" for u in unserved(uses, serves)]
    lines += [
        f"casatasks no longer uses {kind} {name} (every release read so far does)"
        for kind, name in missing_required(uses)
    ]
    return lines
