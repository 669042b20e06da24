"""The project's exceptions: one base class and a few children that say where."""

from __future__ import annotations


class CasaKernelError(Exception):
    """Base class of every error casa-kernel raises on purpose."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback: the message names the file,
        # line, host, sub-MS or rank at fault; casa-kernel's own frames would
        # only hide it (servers' tracebacks are in the message of RemoteError).
        return [f"{type(self).__name__}: {self}"]


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


class RemoteError(CasaKernelError):
    """Work failed on one or more servers.

    ``failures`` is a list of :class:`ServerFailure`; ``results`` holds what did
    succeed, so nothing is lost when one sub-MS fails.
    """

    max_shown = 4  # cap on the tracebacks printed, as ipyparallel's CompositeError

    def __init__(self, failures: list[ServerFailure], results: object = None):
        self.failures = failures
        self.results = results
        super().__init__(self._summary())

    def _summary(self) -> str:
        lines = [f"{len(self.failures)} task(s) failed on the servers:"]
        for failure in self.failures[: self.max_shown]:
            lines.append(failure.headline())
            if failure.traceback:
                lines.append(failure.traceback.rstrip())
        hidden = len(self.failures) - self.max_shown
        if hidden > 0:
            lines.append(f"... and {hidden} more (see .failures)")
        return "\n".join(lines)


class ServerFailure:
    """One failed piece of work: where it ran and why it failed."""

    def __init__(
        self,
        rank: int | None,
        host: str | None,
        ename: str,
        evalue: str,
        traceback: str = "",
        submms: str | None = None,
    ):
        self.rank = rank
        self.host = host
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.submms = submms
        self.engine_id: int | None = None
        self.died = False  # the server died (killed, crashed) while running it

    def headline(self) -> str:
        where = f"server rank {self.rank} on {self.host}"
        what = f"sub-MS {self.submms}: " if self.submms else ""
        return f"[{where}] {what}{self.ename}: {self.evalue}"

    def __repr__(self) -> str:
        return f"<ServerFailure {self.headline()}>"


class TaskTimeout(CasaKernelError, TimeoutError):
    """Work did not finish within the task timeout; names the servers still busy."""
