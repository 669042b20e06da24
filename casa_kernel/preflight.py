"""Preflight: the seed's multi-node requirements, checked on every host before a launch.

mpicasa's documentation asks for password-less ssh from the client to every
node, the data at the same path on a shared file system, and a mirrored
installation (PATH, LD_LIBRARY_PATH and the CASA variables pointing at valid
installs). When one is missing, mpiexec fails with its own words ("A daemon
failed to report back") or a server fails later with an ImportError. Here each
host of the servers is asked first, all at once, a time limit each, through
the remote agent mpiexec itself would use (ssh with ``BatchMode=yes``, or the
configured ``plm_ssh_agent``; inside a Slurm/PBS/LSF allocation the resource
manager's launcher, with no ssh to check): a small probe
(:mod:`casa_kernel.preflight_probe`) reports versions, paths and marker files,
and :func:`judge` compares them with the client's. The result is a
:class:`Report`: a host x requirement table and, when something fails, ONE
:class:`~casa_kernel.errors.PreflightError` naming the host, the requirement
and what to do. Servers from the batch queue run on nodes unknown before their
job starts: the job script runs the probe on each of its nodes first
(:func:`job_script_lines`) and the kernel judges the job's output
(:class:`JobPreflight`).

Pure: :func:`find_agent`, :func:`agent_command`, :func:`remote_line`,
:func:`parse_output`, :func:`judge`, :func:`parse_job_output` and the report
(table-tested); the runner is :func:`run_probes` and the entry points
:func:`check`, :func:`require` and :func:`for_job`.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from casa_kernel import allocation, keyfile
from casa_kernel.config import (
    ENV_KEY_DIR,
    ENV_PREFLIGHT,
    ENV_PREFLIGHT_TIMEOUT,
    ClusterConfig,
    env_flag,
)
from casa_kernel.errors import CasaKernelError, PreflightError
from casa_kernel.hostfile import is_local_host
from casa_kernel.preflight_probe import DISTRIBUTIONS, TAG, collect, encode_request

#: The requirements, in the table's column order ("data" only with --vis paths,
#: "keys" only when the servers read their connection key from a shared folder).
REQUIREMENTS = (
    "ssh",
    "workdir",
    "keys",
    "data",
    "python",
    "casa-kernel",
    *DISTRIBUTIONS,
    "openmpi",
    "env",
)

#: The seed's variables whose paths must exist on every host (those that are
#: set): lists of folders, single files, and CASAPATH ("root arch site host").
PATH_LISTS = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH")
SINGLE_PATHS = ("CASASITECONFIG",)
CASAPATH = "CASAPATH"

# A probe answers in ~0.2 s; ssh to a slow login node, a cold NFS home and a
# Python start on a loaded node can take seconds, a dead host takes ssh's
# ConnectTimeout.
DEFAULT_TIMEOUT = 20.0
CONNECT_TIMEOUT = 10  # seconds, ssh's ConnectTimeout

# What the remote shell prints first (the agent reached the host) and when the
# client's Python is not there.
REACHED = "CASA-KERNEL-PREFLIGHT-REACHED"
NO_PYTHON = "CASA-KERNEL-PREFLIGHT-NO-PYTHON"
MARKER_PREFIX = ".casa-kernel-preflight-"

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


# ----------------------------------------------------------------------------- agent


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
        f"if [ -x {py} ]; then exec {py} -m casa_kernel.preflight_probe {request_word}; "
        f"else echo {NO_PYTHON}; fi"
    )


# ----------------------------------------------------------------------------- the probe


def seed_env_paths(
    environ: Mapping[str, str], exists: Callable[[str], bool] = os.path.exists
) -> dict[str, list[str]]:
    """Variable -> the paths it names that exist here (so must exist on every host).

    An entry that does not exist on the client either (a stale PATH entry) is
    nobody's requirement.
    """
    found: dict[str, list[str]] = {}
    for name in PATH_LISTS:
        value = environ.get(name, "")
        entries = [e for e in dict.fromkeys(value.split(os.pathsep)) if e and os.path.isabs(e)]
        if entries:
            found[name] = [e for e in entries if exists(e)]
    for name in SINGLE_PATHS:
        if environ.get(name):
            found[name] = [p for p in [environ[name]] if exists(p)]
    if environ.get(CASAPATH, "").split():
        found[CASAPATH] = [p for p in environ[CASAPATH].split()[:1] if exists(p)]
    return {name: paths for name, paths in found.items() if paths}


def probe_request(
    folders: Mapping[str, str | None],
    paths: Sequence[str],
    env_paths: Mapping[str, list[str]],
    mpiexec: str,
) -> dict[str, Any]:
    """What the probe is asked (see :func:`casa_kernel.preflight_probe.collect`)."""
    return {
        "folders": dict(folders),
        "paths": list(paths),
        "env": {name: list(entries) for name, entries in env_paths.items()},
        "mpiexec": mpiexec,
    }


@dataclass
class Outcome:
    """What running the probe on one host gave."""

    host: str
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    start_error: str = ""  # the agent could not even be started
    seconds: float = 0.0


def parse_output(stdout: str) -> tuple[bool, bool, dict[str, Any] | None]:
    """(the host was reached, its Python is missing, the probe's facts or None) (pure)."""
    import json

    reached = no_python = False
    facts = None
    for line in stdout.splitlines():
        line = line.strip()
        if line == REACHED:
            reached = True
        elif line == NO_PYTHON:
            no_python = True
        elif line.startswith(TAG + " "):
            try:
                facts = json.loads(line[len(TAG) + 1 :])
            except ValueError:
                facts = None
    return reached or facts is not None, no_python, facts


# ----------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Check:
    """One cell of the table: a requirement on a host."""

    host: str
    requirement: str
    ok: bool | None  # None: not checked (skipped, or an earlier requirement failed)
    reason: str = ""
    fix: str = ""  # what to do, when it fails


@dataclass(frozen=True)
class Context:
    """What judging a host needs to know of the client (pure data)."""

    client_host: str
    facts: dict[str, Any]  # the client's own probe facts
    agent: Agent
    python: str
    workdir: str
    vis: tuple[str, ...] = ()
    markers: dict[str, str] = field(default_factory=dict)  # folder -> marker text ("": none)
    timeout: float = DEFAULT_TIMEOUT
    keydir: str = ""  # the shared folder of the connection key (casa_kernel.keyfile); "": none


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _fix_ssh(host: str, ctx: Context) -> str:
    if ctx.agent.kind == "agent":
        return (
            f"check the launcher agent {ctx.agent.describe()}: mpiexec starts its daemon on "
            f"{host} through it"
        )
    return (
        f"set up password-less ssh from {ctx.client_host} to {host} (ssh-keygen; "
        f"ssh-copy-id {host}; accept its host key once): "
        f"`ssh -o BatchMode=yes {host} true` must succeed without a prompt"
    )


def _not_checked(host: str, requirements: Iterable[str], why: str) -> list[Check]:
    return [Check(host, r, None, why) for r in requirements]


def judge(outcome: Outcome, ctx: Context) -> list[Check]:
    """Every requirement on one host from what its probe gave (pure)."""
    host = outcome.host
    wanted = [r for r in REQUIREMENTS if (r != "data" or ctx.vis) and (r != "keys" or ctx.keydir)]
    later = wanted[1:]
    reached, no_python, facts = parse_output(outcome.stdout)
    ssh = "ssh"
    if outcome.start_error:
        fix = f"install ssh on {ctx.client_host}, or set PRTE_MCA_plm_ssh_agent"
        if ctx.agent.source:
            fix = f"make {ctx.agent.source} name an executable launcher agent"
        if ctx.agent.kind in _ALLOCATION_LAUNCHERS:
            fix = f"run the kernel where the {ctx.agent.kind} commands are on PATH"
        return [
            Check(
                host, ssh, False, f"cannot run {ctx.agent.describe()}: {outcome.start_error}", fix
            )
        ] + _not_checked(host, later, "host not reached")
    if not reached:
        if outcome.timed_out:
            reason = f"no answer within {ctx.timeout:g} s"
        else:
            said = _last_line(outcome.stderr) or _last_line(outcome.stdout)
            reason = (
                f"{said} (exit code {outcome.returncode})"
                if said
                else (f"exit code {outcome.returncode}")
            )
        if ctx.agent.ssh_checked:
            return [Check(host, ssh, False, reason, _fix_ssh(host, ctx))] + _not_checked(
                host, later, "host not reached"
            )
        fix = f"check that {host} is a node of this {ctx.agent.kind} job and is up"
        return [Check(host, ssh, False, f"{ctx.agent.describe()}: {reason}", fix)] + (
            _not_checked(host, later, "host not reached")
        )
    if ctx.agent.ssh_checked:
        checks = [Check(host, ssh, True, "password-less" if ctx.agent.kind == "ssh" else "reached")]
    else:
        checks = [Check(host, ssh, None, f"inside a {ctx.agent.kind} job: not used")]
    if facts is None:
        return checks + _judge_no_facts(outcome, ctx, no_python, later)
    for requirement in later:
        checks.append(_judge_one(requirement, host, facts, ctx))
    return checks


def _judge_no_facts(
    outcome: Outcome, ctx: Context, no_python: bool, later: list[str]
) -> list[Check]:
    host = outcome.host
    fix_python = (
        f"install the same Python at the same path on {host} (a virtual environment or "
        f"conda on a file system {host} shares, at the same path, does it)"
    )
    rest = [r for r in later if r not in ("python", "casa-kernel")]
    if no_python:
        return [
            Check(host, "python", False, f"{ctx.python} not found", fix_python),
            *_not_checked(host, ["casa-kernel", *rest], "no Python there"),
        ]
    said = _last_line(outcome.stderr)
    if "No module named" in said and "casa_kernel" in said:
        return [
            Check(host, "python", True, ctx.facts["python"]["version"]),
            Check(
                host,
                "casa-kernel",
                False,
                f"{ctx.python} cannot import casa_kernel ({said})",
                f"install casa-kernel in that environment on {host} (or share the client's)",
            ),
            *_not_checked(host, rest, "no casa-kernel there"),
        ]
    if outcome.timed_out:
        reason = f"the probe gave no answer within {ctx.timeout:g} s"
    else:
        reason = f"the probe failed: {said or 'no output'} (exit code {outcome.returncode})"
    return [
        Check(host, "python", False, reason, fix_python),
        *_not_checked(host, ["casa-kernel", *rest], "probe failed"),
    ]


def _judge_one(requirement: str, host: str, facts: dict[str, Any], ctx: Context) -> Check:
    mine = ctx.facts
    if requirement in ("workdir", "keys", "data"):
        return _judge_paths(requirement, host, facts, ctx)
    if requirement == "python":
        here, there = mine["python"], facts.get("python", {})
        same = (here["implementation"], here["version"]) == (
            there.get("implementation"),
            there.get("version"),
        )
        if same:
            return Check(host, requirement, True, here["version"])
        return Check(
            host,
            requirement,
            False,
            f"{ctx.python} is {there.get('implementation')} {there.get('version')} there, "
            f"{here['implementation']} {here['version']} here",
            f"install Python {here['version']} at {ctx.python} on {host}",
        )
    if requirement == "openmpi":
        here, there = mine["mpiexec"], facts.get("mpiexec", {})
        if there.get("version") and there.get("version") == here.get("version"):
            return Check(host, requirement, True, str(here["version"]).split(")")[-1].strip())
        what = (
            there.get("problem") or f"{there.get('version')!r} there, {here.get('version')!r} here"
        )
        return Check(
            host,
            requirement,
            False,
            f"{here.get('path')}: {what}",
            f"install the same MPI at {here.get('path')} on {host} (its daemon prted too)",
        )
    if requirement == "env":
        missing = {name: paths for name, paths in facts.get("env", {}).items() if paths}
        if not missing:
            names = ", ".join(ctx.facts.get("env", {})) or "none set"
            return Check(host, requirement, True, names)
        reason = "; ".join(f"{name}: {', '.join(paths)} missing" for name, paths in missing.items())
        return Check(
            host,
            requirement,
            False,
            reason,
            f"mirror the installation on {host} (same paths), or remove those entries "
            f"from {', '.join(missing)} before starting the kernel",
        )
    # casa-kernel and the distributions: the same version
    here, there = mine["versions"].get(requirement), facts.get("versions", {}).get(requirement)
    if there == here:
        return Check(host, requirement, True, str(here) if here else "absent on both")
    reason = (
        f"not installed for {ctx.python} there, {here} here"
        if there is None
        else f"{there} there, {here} here"
    )
    return Check(
        host,
        requirement,
        False,
        reason,
        f"install {requirement}=={here} for {ctx.python} on {host} "
        "(or share the client's environment)",
    )


def _judge_paths(requirement: str, host: str, facts: dict[str, Any], ctx: Context) -> Check:
    """workdir: the kernel's folder; data: each --vis path and the folder holding it.

    A folder is the same folder when the marker file the client wrote in it is
    there too (a folder of the same name on a local disk is not); where the
    client could not write one, existence is all that is checked.
    """
    if requirement == "workdir":
        targets = {ctx.workdir: ctx.workdir}  # what must exist -> the folder marked
        fix = (
            f"start the notebook in a folder that {host} mounts at the same path "
            "(a shared file system: home, project or scratch space)"
        )
    elif requirement == "keys":
        targets = {ctx.keydir: ctx.keydir}
        fix = (
            f"set {ENV_KEY_DIR} to a folder {host} mounts at the same path (home or project "
            "space): encrypted across hosts, the servers read their connection key there"
        )
    else:
        targets = {path: os.path.dirname(path) for path in ctx.vis}
        fix = f"put the data on a file system {host} mounts at the same path"
    problems: list[str] = []
    for target, folder in targets.items():
        if requirement == "data" and not facts.get("paths", {}).get(target):
            here = ctx.facts.get("paths", {}).get(target)
            problems.append(f"{target} not found" + ("" if here else " (nor here)"))
            continue
        seen = facts.get("folders", {}).get(folder, {})
        if not seen.get("exists"):
            problems.append(f"{folder} not found")
        elif ctx.markers.get(folder) and seen.get("marker") != ctx.markers[folder]:
            problems.append(
                f"{folder} is another folder there (the marker file written here is not "
                "in it): not the same file system"
            )
    if problems:
        return Check(host, requirement, False, "; ".join(problems), fix)
    marked = all(ctx.markers.get(folder) for folder in targets.values())
    how = "same folder (marker seen)" if marked else "exists (not writable here: no marker)"
    if requirement == "data":
        how = f"{len(targets)} path{'s' if len(targets) != 1 else ''}: {how}"
    return Check(host, requirement, True, how)


# ----------------------------------------------------------------------------- the report


@dataclass
class Report:
    """The preflight's answer: every requirement on every host, and how long it took."""

    client_host: str
    hosts: list[str]
    checks: list[Check]
    seconds: float = 0.0
    agent: str = ""
    note: str = ""  # why nothing was checked, when nothing was

    @property
    def requirements(self) -> list[str]:
        seen = {c.requirement for c in self.checks}
        return [r for r in REQUIREMENTS if r in seen]

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    @property
    def ok(self) -> bool:
        return not self.failures()

    def title(self) -> str:
        if not self.hosts:
            return f"casa-kernel preflight: {self.note or 'no other host to check'}"
        failed = self.failures()
        verdict = (
            "all pass"
            if not failed
            else f"{len(failed)} failed on {', '.join(dict.fromkeys(c.host for c in failed))}"
        )
        return (
            f"casa-kernel preflight from {self.client_host}: {len(self.hosts)} "
            f"host{'s' if len(self.hosts) != 1 else ''} in {self.seconds:.2f} s "
            f"via {self.agent}: {verdict}"
        )

    def table(self) -> Any:
        """The host x requirement table (text and HTML, see display.CheckTable)."""
        from casa_kernel.display import CheckTable

        cells = {(c.host, c.requirement): c for c in self.checks}
        rows = [(host, [cells.get((host, r)) for r in self.requirements]) for host in self.hosts]
        notes = [
            f"{c.host} {c.requirement}: {c.reason}" + (f" -> {c.fix}" if c.fix else "")
            for c in self.checks
            if c.ok is False
        ]
        return CheckTable(self.title(), self.requirements, rows, notes)

    def error(self) -> PreflightError:
        """ONE error naming each failing host, requirement and what to do."""
        failed = self.failures()
        hosts = ", ".join(dict.fromkeys(c.host for c in failed))
        lines = [
            f"the servers cannot be launched on {hosts}: the preflight found "
            f"{len(failed)} problem{'s' if len(failed) != 1 else ''}"
        ]
        lines += [f"  {c.host}: {c.requirement}: {c.reason}\n    do: {c.fix}" for c in failed]
        lines.append(
            f"(%casa_cluster check shows every host and requirement; {ENV_PREFLIGHT}=0 "
            "skips this check)"
        )
        return PreflightError("\n".join(lines), report=self)


# ----------------------------------------------------------------------------- running


def run_probes(
    hosts: Sequence[str],
    agent: Agent,
    line: str,
    timeout: float,
    connect_timeout: int = CONNECT_TIMEOUT,
) -> list[Outcome]:
    """Run ``line`` on every host at once; each gets ``timeout`` seconds from the start.

    Each probe runs in a session of its own, so a probe past its limit is
    killed with everything it started (an ssh and its children).
    """
    started = time.monotonic()
    deadline = started + timeout
    running: list[tuple[Outcome, subprocess.Popen[str] | None]] = []
    for host in hosts:
        outcome = Outcome(host)
        if agent.kind == "missing":
            outcome.start_error = "not found"
            running.append((outcome, None))
            continue
        try:
            proc = subprocess.Popen(
                agent_command(agent, host, line, connect_timeout),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        except OSError as exc:
            outcome.start_error = exc.strerror or str(exc)
            proc = None
        running.append((outcome, proc))
    try:
        for outcome, proc in running:
            if proc is None:
                continue
            try:
                outcome.stdout, outcome.stderr = proc.communicate(
                    timeout=max(0.0, deadline - time.monotonic())
                )
            except subprocess.TimeoutExpired:
                outcome.timed_out = True
                _kill_session(proc)
                outcome.stdout, outcome.stderr = proc.communicate()
            outcome.returncode = proc.returncode
            outcome.seconds = time.monotonic() - started
    finally:  # an interrupt (Ctrl-C in the notebook) leaves no probe behind
        for _, proc in running:
            if proc is not None and proc.poll() is None:
                _kill_session(proc)
                proc.wait()
    return [outcome for outcome, _ in running]


def _kill_session(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()


def remote_hosts(servers: Iterable[str]) -> list[str]:
    """The servers' hosts other than this machine, in order, once each."""
    return [host for host in dict.fromkeys(servers) if not is_local_host(host)]


def needed(config: ClusterConfig, environ: Mapping[str, str] | None = None) -> bool:
    """Whether a launch of ``config`` is checked first: servers on other hosts, not
    from the batch queue (its hosts are not known before the job runs), and the
    check not turned off."""
    environ = os.environ if environ is None else environ
    if config.batch is not None or not env_flag(environ, ENV_PREFLIGHT, default=True):
        return False
    return bool(remote_hosts(config.placement.servers))


def time_limit(environ: Mapping[str, str]) -> float:
    raw = environ.get(ENV_PREFLIGHT_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise CasaKernelError(
            f"{ENV_PREFLIGHT_TIMEOUT}={raw!r} is not a positive number of seconds"
        )
    return value


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What mpiexec forwards to every server (``-x``), as the probe must see it."""
    from casa_kernel.launcher import FORWARDED_ENV

    return {
        name: environ[name]
        for name in FORWARDED_ENV
        if name in environ and name != "IPP_CONNECTION_INFO"
    }


def check(
    config: ClusterConfig,
    env: Mapping[str, str] | None = None,
    vis: Sequence[str] = (),
    workdir: str | None = None,
    timeout: float | None = None,
) -> Report:
    """Check every host of ``config``'s servers; the report (raises nothing for a failure).

    ``env`` adds to ``os.environ`` what the servers get (the kernel's CASA
    variables); ``vis`` are data paths that must be visible at the same path.
    """
    environ = {**os.environ, **(env or {})}
    client = socket.gethostname()
    limit = time_limit(environ) if timeout is None else timeout
    if config.batch is not None:
        return Report(
            client,
            [],
            [],
            note="servers from the batch queue: hosts not known yet (checked inside "
            "the job, on each of its nodes, before its mpiexec)",
        )
    hosts = remote_hosts(config.placement.servers)
    if not hosts:
        return Report(client, [], [], note="every server runs on this machine: nothing to check")
    manager = None
    if config.layout_source is not None:  # inside a batch allocation: mpiexec reads it
        found = allocation.detect(environ)
        manager = found.manager if found is not None else None
    agent = find_agent(environ, config.extra_mpi_args, manager)
    probe = _Probe.prepare(config, environ, agent, limit, vis, workdir)
    try:
        started = time.monotonic()
        outcomes = run_probes(hosts, agent, probe.line, limit)
        seconds = time.monotonic() - started
    finally:
        probe.remove_markers()
    checks = [c for outcome in outcomes for c in judge(outcome, probe.ctx)]
    return Report(client, hosts, checks, seconds, agent.describe())


@dataclass
class _Probe:
    """One preflight's request: marker files written, the client's own facts,
    the shell line each host runs, and what judging needs (the Context)."""

    ctx: Context
    line: str
    folders: list[str]
    token: str

    @classmethod
    def prepare(
        cls,
        config: ClusterConfig,
        environ: Mapping[str, str],
        agent: Agent,
        limit: float,
        vis: Sequence[str] = (),
        workdir: str | None = None,
    ) -> _Probe:
        client = socket.gethostname()
        workdir = os.path.abspath(workdir or os.getcwd())
        vis = tuple(os.path.abspath(os.path.expanduser(v)) for v in vis)
        keydir = ""
        if keyfile.wanted(config.encrypted, False, config.batch is not None):
            keydir = keyfile.private_base(keyfile.base_dir(environ))
        folders = [workdir, *([keydir] if keydir else []), *(os.path.dirname(v) for v in vis)]
        folders = list(dict.fromkeys(folders))
        token = secrets.token_hex(8)
        markers = _write_markers(folders, token, client)
        try:
            marked = {f: _marker_path(f, token) if markers[f] else None for f in folders}
            request = probe_request(
                marked,
                vis,
                seed_env_paths(environ),
                config.mpiexec,
            )
            mine = collect(request)
        except BaseException:
            _remove_markers(folders, token)
            raise
        line = remote_line(sys.executable, encode_request(request), forwarded_env(environ))
        ctx = Context(client, mine, agent, sys.executable, workdir, vis, markers, limit, keydir)
        return cls(ctx, line, folders, token)

    def marker_paths(self) -> list[str]:
        return [_marker_path(f, self.token) for f in self.folders]

    def remove_markers(self) -> None:
        _remove_markers(self.folders, self.token)


def require(config: ClusterConfig, env: Mapping[str, str] | None = None) -> Report | None:
    """The automatic check before a launch: raise ONE PreflightError if a host fails."""
    environ = {**os.environ, **(env or {})}
    if not needed(config, environ):
        return None
    report = check(config, env)
    if not report.ok:
        raise report.error()
    return report


# ----------------------------------------------------------------------------- inside a batch job

# Servers from the batch queue run on nodes nobody knows before the job starts:
# the job script itself runs the probe on each of its nodes (the manager's
# launcher: srun, pbsdsh) before its mpiexec, each output line tagged with the
# node; the kernel reads them from the job's output file and judges them as
# above. A failure cancels the job (the start fails with ONE PreflightError)
# before servers that could not work are waited for.
JOB_TAG = "CASA-KERNEL-PREFLIGHT-JOB"  # "JOB_TAG node line": a node's probe said line
JOB_NODES = "CASA-KERNEL-PREFLIGHT-NODES"  # the job's nodes (Slurm)
JOB_DONE = "CASA-KERNEL-PREFLIGHT-DONE"  # "JOB_DONE exit-code milliseconds"
_JOB_LAUNCH = {
    # once per node of the job; the node named as the manager names it
    "slurm": (
        'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" '
        "--ntasks-per-node=1 --export=ALL --quiet",
        '"${SLURMD_NODENAME:-$(uname -n)}"',
    ),
    "pbs": ("pbsdsh -u", '"$(uname -n)"'),
}
_JOB_MANAGER = {"slurm": "Slurm", "pbs": "PBS"}


def job_script_lines(system: str, line: str, limit: float) -> list[str]:
    """The job script's preflight: ``line`` (see :func:`remote_line`) on each node
    of the job, at most ``limit`` seconds in all (pure)."""
    launch, node = _JOB_LAUNCH[system]
    tagged = (
        f"h={node}; {{ {line}; }} 2>&1 | "
        f'while IFS= read -r l; do printf "%s %s %s\\n" {JOB_TAG} "$h" "$l"; done'
    )
    lines = ["# casa-kernel preflight: what each node has (the kernel judges it)"]
    if system == "slurm":
        nodes = 'scontrol show hostnames "$SLURM_JOB_NODELIST" | tr "\\n" " "'
        lines.append(f'echo "{JOB_NODES} $({nodes})"')
    lines += [
        "t0=$(date +%s%N)",
        f"timeout -k 5 {limit:g} {launch} /bin/sh -c {shlex.quote(tagged)}",
        f'echo "{JOB_DONE} $? $(( ($(date +%s%N) - t0) / 1000000 ))"',
    ]
    return lines


def parse_job_output(output: str) -> tuple[list[Outcome], float] | None:
    """Each node's outcome and the seconds the probes took, from the job's output
    (pure); None until the job has run them all."""
    done = re.search(rf"^{JOB_DONE} (\d+) (\d+)", output, re.M)
    if done is None:
        return None
    returncode, seconds = int(done.group(1)), int(done.group(2)) / 1000
    said: dict[str, list[str]] = {}
    listed: list[str] = []
    other: list[str] = []  # the launcher's own words (srun: error: ...)
    for text in output[: done.start()].splitlines():
        if text.startswith(JOB_NODES + " "):
            listed = text.split()[1:]
        elif text.startswith(JOB_TAG + " "):
            node, _, rest = text[len(JOB_TAG) + 1 :].partition(" ")
            said.setdefault(node, []).append(rest)
        elif text.strip():
            other.append(text)
    outcomes = []
    for node in dict.fromkeys([*listed, *said]):
        lines = said.get(node)
        if lines is None:  # its probe never ran or never answered
            outcomes.append(
                Outcome(node, returncode, "", "\n".join(other), timed_out=returncode == 124)
            )
            continue
        quiet = [t for t in lines if t != REACHED and not t.startswith(TAG + " ")]
        outcomes.append(Outcome(node, returncode, "\n".join(lines), "\n".join(quiet)))
    return outcomes, seconds


def without_job_lines(output: str) -> str:
    """The job's output without the preflight's lines (mpiexec's words alone)."""
    tags = (JOB_TAG + " ", JOB_NODES + " ", JOB_DONE + " ")
    return "\n".join(t for t in output.splitlines() if not t.startswith(tags))


@dataclass
class JobPreflight:
    """The preflight a batch job carries: the lines for its script, and the
    judging of what its nodes answered (:meth:`report`)."""

    probe: _Probe
    script_lines: list[str]

    def report(self, output: str) -> Report | None:
        """The report once the job's output has every node's answer (else None)."""
        parsed = parse_job_output(output)
        if parsed is None:
            return None
        outcomes, seconds = parsed
        ctx = self.probe.ctx
        checks = [c for outcome in outcomes for c in judge(outcome, ctx)]
        hosts = [outcome.host for outcome in outcomes]
        return Report(ctx.client_host, hosts, checks, seconds, ctx.agent.describe())

    def marker_paths(self) -> list[str]:
        return self.probe.marker_paths()

    def remove_markers(self) -> None:
        self.probe.remove_markers()


def for_job(config: ClusterConfig, env: Mapping[str, str] | None = None) -> JobPreflight | None:
    """The preflight for a launch of servers from the batch queue (None: not one,
    or the check turned off). Its marker files exist until :meth:`remove_markers`."""
    environ = {**os.environ, **(env or {})}
    if config.batch is None or config.batch.system not in _JOB_LAUNCH:
        return None
    if not env_flag(environ, ENV_PREFLIGHT, default=True):
        return None
    limit = time_limit(environ)
    probe = _Probe.prepare(config, environ, Agent(_JOB_MANAGER[config.batch.system]), limit)
    return JobPreflight(probe, job_script_lines(config.batch.system, probe.line, limit))


def _marker_path(folder: str, token: str) -> str:
    return os.path.join(folder, MARKER_PREFIX + token)


def _write_markers(folders: Sequence[str], token: str, client: str) -> dict[str, str]:
    """Folder -> the text of the marker file written in it ("" where none could be)."""
    written: dict[str, str] = {}
    for folder in folders:
        text = f"casa-kernel preflight {token} from {client}\n"
        try:
            fd = os.open(
                _marker_path(folder, token),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                0o644,
            )
            with os.fdopen(fd, "w") as f:
                f.write(text)
            written[folder] = text
        except OSError:
            written[folder] = ""
    return written


def _remove_markers(folders: Sequence[str], token: str) -> None:
    for folder in folders:
        try:
            os.unlink(_marker_path(folder, token))
        except OSError:
            pass
