"""The project's exceptions: one base class and a few children that say where.

A failure on a server is a :class:`ServerFailure` that is ALSO an instance of
the remote exception's type when that type is a built-in one (a failed sub-MS
whose server raised ``FileNotFoundError`` can be caught with ``except
FileNotFoundError``), with the server's traceback attached, headed by rank,
host and sub-MS -- what mpi4py.futures does by re-raising with ``__cause__``.
"""

from __future__ import annotations

import builtins
import os
from typing import Any


class CasaKernelError(Exception):
    """Base class of every error casa-kernel raises on purpose."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback: the message names the file,
        # line, host, sub-MS or rank at fault; casa-kernel's own frames would
        # only hide it (servers' tracebacks are in the message of RemoteError).
        return [f"{type(self).__name__}: {self}"]


class SettingError(CasaKernelError, ValueError):
    """A setting (an environment variable) has a value that cannot be used; the
    message names the variable and the value."""


class WorkdirError(CasaKernelError, FileNotFoundError):
    """The kernel's working directory no longer exists (servers follow it)."""

    def __init__(self, path: str):
        self.message = (
            f"the kernel's working directory {path} no longer exists; the servers work "
            "in the kernel's directory: change to an existing one first (%cd DIR or "
            "os.chdir(DIR))"
        )
        Exception.__init__(self, self.message)
        self.filename = path

    def __str__(self) -> str:  # not OSError's "[Errno None] None: ..."
        return self.message


def kernel_cwd() -> str:
    """``os.getcwd()``, or a WorkdirError naming the directory when it was removed."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        try:
            path = os.readlink("/proc/self/cwd").removesuffix(" (deleted)")
        except OSError:
            path = os.environ.get("PWD", "(unknown)")
        raise WorkdirError(path) from None


class SpaceError(CasaKernelError, OSError):
    """A task's output does not fit on its file system; names task and path."""

    def __str__(self) -> str:  # not OSError's "[Errno ...]" form
        return str(self.args[0])


class HostfileError(CasaKernelError, ValueError):
    """A hostfile line is malformed; names the file and the line."""

    def __init__(self, message: str, path: str = "<hostfile>", line: int | None = None):
        self.path = path
        self.line = line
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")


class PlacementError(CasaKernelError, ValueError):
    """The requested process count does not fit the slots (or is too small)."""


class ClusterError(CasaKernelError, RuntimeError):
    """The cluster could not start, died, or is not running."""


class ClusterLost(ClusterError):
    """The controller died or went silent: the cell's work on the servers is lost;
    the next cell that needs servers starts a whole new cluster."""


class TaskTimeout(CasaKernelError, TimeoutError):
    """Work did not finish within the task timeout; names the servers still busy."""


class RemoteTraceback(Exception):
    """The server's traceback, as text: the ``__cause__`` of a ServerFailure."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text.rstrip()


# How the part of a serial call that writes a new MS is named ("output out.ms").
SERIAL_OUTPUT = "output "


class ServerFailure(CasaKernelError):
    """One failed piece of work: where it ran (rank, host, sub-MS) and why.

    Build with :func:`server_failure`, which picks a subclass that is also the
    remote exception's built-in type.
    """

    def __init__(
        self,
        rank: int | None,
        host: str | None,
        ename: str,
        evalue: str,
        traceback: str = "",
        submms: str | None = None,
    ):
        # Exception's own __init__: the mixed-in built-in's (SyntaxError, OSError)
        # would read these arguments as its own fields
        Exception.__init__(self, ename, evalue)
        self.rank = rank
        self.host = host
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.submms = submms
        if traceback:
            self.__cause__ = RemoteTraceback(traceback)

    def part(self) -> str:
        """The part of the work that failed: 'sub-MS <path>', or what it was
        (an imager's data partition, images, the assembly of a Multi-MS, the
        output of a serial call)."""
        if not self.submms:
            return ""
        if self.submms.endswith(".ms") and not self.submms.startswith(SERIAL_OUTPUT):
            return f"sub-MS {self.submms}"
        return self.submms

    def headline(self) -> str:
        if self.rank is None:  # lost with a server whose rank was not known
            where = "a server"
        elif self.rank < 0:  # the extra world rank 0 (casa/role.py)
            where = f"CASA's cube client on {self.host}"
        else:
            where = f"server rank {self.rank} on {self.host}"
        what = f"{self.part()}: " if self.submms else ""
        return f"[{where}] {what}{self.ename}: {self.evalue}"

    def __str__(self) -> str:
        return self.headline()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.headline()}>"


_failure_types: dict[str, type[ServerFailure]] = {}


def server_failure(
    rank: int | None,
    host: str | None,
    ename: str,
    evalue: str,
    traceback: str = "",
    submms: str | None = None,
) -> ServerFailure:
    """A ServerFailure that is also an instance of the remote built-in exception type.

    ``ename`` names the remote type; only built-in exception types are mixed in
    (a user's own class need not exist in the kernel, and importing modules by a
    name received from a server is not something to do).
    """
    cls = _failure_type(ename)
    try:
        failure = _instance(cls, evalue, traceback)
    except TypeError:
        # a built-in whose constructor we cannot satisfy: the plain class,
        # which still names the remote type (``ename``) with rank and host
        _failure_types[ename] = cls = ServerFailure
        failure = ServerFailure.__new__(ServerFailure)
    ServerFailure.__init__(failure, rank, host, ename, evalue, traceback, submms)
    return failure


def _instance(cls: type[ServerFailure], evalue: str, traceback: str) -> ServerFailure:
    """An uninitialised ``cls``: built-ins differ in what their ``__new__`` needs."""
    groups = getattr(builtins, "BaseExceptionGroup", ())  # Python >= 3.11
    if groups and issubclass(cls, groups):
        # needs a message and a non-empty list: the sub-exceptions exist only as
        # text in the server's traceback, which becomes the one member
        member = RemoteTraceback(traceback or evalue)
        return cls.__new__(cls, evalue, [member])  # type: ignore[call-arg]
    try:
        return cls.__new__(cls)
    except TypeError:
        # MemoryError's __new__ (a free list) refuses heap subclasses
        return Exception.__new__(cls)


def _failure_type(ename: str) -> type[ServerFailure]:
    base: Any = getattr(builtins, ename, None)
    if not (isinstance(base, type) and issubclass(base, Exception)) or issubclass(
        base, (KeyboardInterrupt, SystemExit)
    ):
        return ServerFailure
    cls = _failure_types.get(ename)
    if cls is None:
        try:
            cls = type(f"Remote{ename}", (ServerFailure, base), {"__module__": __name__})
        except TypeError:  # layout conflict (e.g. OSError's C fields): plain type
            cls = ServerFailure
        _failure_types[ename] = cls
    return cls


class RemoteError(CasaKernelError):
    """Work failed on one or more servers.

    ``failures`` is a list of :class:`ServerFailure`; ``results`` holds what did
    succeed, so nothing is lost when one sub-MS fails. Each failure's type is
    also the remote one (``isinstance(exc.failures[0], FileNotFoundError)``).
    One failure prints one headline and one trimmed traceback; the same
    traceback from several servers is printed once.
    """

    max_shown = 4  # cap on the tracebacks printed, as ipyparallel's CompositeError

    def __init__(self, failures: list[ServerFailure], results: object = None):
        self.failures = failures
        self.results = results
        super().__init__(self._summary())

    def _summary(self) -> str:
        if len(self.failures) == 1:
            failure = self.failures[0]
            text = failure.headline()
            if failure.traceback:
                text += "\n" + failure.traceback.rstrip()
            return text
        lines = [f"{len(self.failures)} task(s) failed on the servers:"]
        shown: set[tuple[str, str, str]] = set()
        for failure in self.failures[: self.max_shown]:
            lines.append(failure.headline())
            # The same cell fails the same way on every server: one traceback
            key = (failure.ename, failure.evalue, failure.traceback)
            if failure.traceback and key not in shown:
                lines.append(failure.traceback.rstrip())
            shown.add(key)
        hidden = len(self.failures) - self.max_shown
        if hidden > 0:
            lines.append(f"... and {hidden} more (see .failures)")
        return "\n".join(lines)


class PreflightError(ClusterError):
    """The hosts of a launch miss a requirement (ssh, shared paths, same installation).

    Raised before anything is launched; ``report`` is the preflight's report
    (``report.table()`` is the host x requirement table) and the message names
    each failing host, the requirement and what to do.
    """

    def __init__(self, message: str, report: Any = None):
        super().__init__(message)
        self.report = report
