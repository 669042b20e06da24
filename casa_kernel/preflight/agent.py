"""Preflight: how a command reaches another host (ssh, a configured agent, or a
batch job's launcher), and the shell line each host runs (pure but ``which``)."""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

# Python start on a loaded node can take seconds, a dead host takes ssh's
# ConnectTimeout.
CONNECT_TIMEOUT = 10  # seconds, ssh's ConnectTimeout

# What the remote shell prints first (the agent reached the host) and when the
# client's Python is not there.
REACHED = "CASA-KERNEL-PREFLIGHT-REACHED"
NO_PYTHON = "CASA-KERNEL-PREFLIGHT-NO-PYTHON"

# PRRTE's default agent list, tried in order.
DEFAULT_AGENT = "ssh : rsh"
_AGENT_PARAMS = ("plm_ssh_agent", "plm_rsh_agent")
_AGENT_ARGS_PARAMS = ("plm_ssh_args", "plm_rsh_args")

# The resource managers' own launchers, one command on one host of the job
# (what PRRTE uses there instead of ssh).
_ALLOCATION_LAUNCHERS: dict[str, Callable[[str], list[str]]] = {
    "Slurm": lambda host: [
        "srun",
        "--overlap",
        "--nodes=1",
        "--ntasks=1",
        f"--nodelist={host}",
        "--export=ALL",
        "--quiet",
    ],
    "PBS": lambda host: ["pbsdsh", "-h", host],
    "LSF": lambda host: ["blaunch", host],
}


@dataclass(frozen=True)
class Agent:
    """How a command reaches another host: ssh, a configured agent, or a job launcher."""

    kind: str  # "ssh" | "agent" | "Slurm" | "PBS" | "LSF" | "missing"
    argv: tuple[str, ...] = ()  # the launcher, before the host (ssh, agent)
    source: str = ""  # where it was configured ("PRTE_MCA_plm_ssh_agent")

    @property
    def ssh_checked(self) -> bool:
        """Whether reaching the host is the ssh requirement (not inside a job)."""
        return self.kind in ("ssh", "agent", "missing")

    def describe(self) -> str:
        if self.kind in _ALLOCATION_LAUNCHERS:
            return f"the {self.kind} job's launcher"
        if self.kind == "missing":
            return f"{self.argv[0] if self.argv else 'ssh'} (not found)" + (
                f" (from {self.source})" if self.source else ""
            )
        return shlex.join(self.argv) + (f" (from {self.source})" if self.source else "")


def _mca_value(
    names: Sequence[str], environ: Mapping[str, str], mpi_args: Sequence[str]
) -> tuple[str, str] | None:
    """(value, where) of an MCA parameter from mpiexec's arguments or the environment.

    The arguments win, as for mpiexec; ``--mca``, ``--prtemca`` and ``--gmca``
    (one or two dashes) name PRRTE's parameters.
    """
    args = list(mpi_args)
    found = None
    for i, arg in enumerate(args[:-2]):
        if arg.lstrip("-") in ("mca", "prtemca", "gmca") and args[i + 1] in names:
            found = (args[i + 2], f"mpiexec {arg} {args[i + 1]}")
    if found:
        return found
    for name in names:
        # (not OMPI_MCA_plm_*: OpenMPI 5 ignores it, so an agent set there is not used)
        if environ.get("PRTE_MCA_" + name):
            return environ["PRTE_MCA_" + name], "PRTE_MCA_" + name
    return None


def find_agent(
    environ: Mapping[str, str],
    mpi_args: Sequence[str] = (),
    manager: str | None = None,
    which: Callable[[str], str | None] = shutil.which,
) -> Agent:
    """The agent mpiexec would use to start its daemon on another host (pure but ``which``).

    ``manager`` ("Slurm", "PBS", "LSF") when the kernel runs inside such a job
    and mpiexec reads its allocation: then the resource manager launches.
    """
    if manager in _ALLOCATION_LAUNCHERS:
        return Agent(manager)
    configured = _mca_value(_AGENT_PARAMS, environ, mpi_args)
    value, source = configured if configured else (DEFAULT_AGENT, "")
    extra = _mca_value(_AGENT_ARGS_PARAMS, environ, mpi_args)
    extra_args = shlex.split(extra[0]) if extra else []
    # PRRTE takes the first alternative of "a : b" that is found on PATH
    for alternative in value.split(":"):
        words = shlex.split(alternative)
        if not words:
            continue
        path = which(words[0]) if os.sep not in words[0] else words[0]
        if path and (os.sep not in words[0] or os.access(path, os.X_OK)):
            kind = "ssh" if os.path.basename(words[0]) == "ssh" else "agent"
            return Agent(kind, (words[0], *words[1:], *extra_args), source)
    return Agent("missing", tuple(shlex.split(value.split(":")[0])), source)


def agent_command(
    agent: Agent, host: str, line: str, connect_timeout: int = CONNECT_TIMEOUT
) -> list[str]:
    """The command that runs the shell ``line`` on ``host`` (pure).

    ssh never prompts (``BatchMode=yes``: a password or passphrase prompt, or an
    unknown host key, is a failure, as it would hang mpiexec) and gives up on a
    dead host after ``connect_timeout`` seconds.
    """
    if agent.kind in _ALLOCATION_LAUNCHERS:
        return [*_ALLOCATION_LAUNCHERS[agent.kind](host), "/bin/sh", "-c", line]
    argv = list(agent.argv)
    if agent.kind == "ssh":
        argv += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout}"]
    return [*argv, host, line]


def remote_line(python: str, request_word: str, forwarded: Mapping[str, str]) -> str:
    """The shell line run on each host (pure): say it got there, set what mpiexec
    forwards to the servers (``-x``), then run the probe with the client's Python."""
    exports = "".join(f"export {name}={shlex.quote(value)}; " for name, value in forwarded.items())
    py = shlex.quote(python)
    return (
        f"echo {REACHED}; {exports}"
        f"if [ -x {py} ]; then exec {py} -m casa_kernel.preflight.probe {request_word}; "
        f"else echo {NO_PYTHON}; fi"
    )
