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
(:mod:`casa_kernel.preflight.probe`) reports versions, paths and marker files,
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
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from casa_kernel import variables
from casa_kernel.config import allocation
from casa_kernel.config.hostfile import is_local_host
from casa_kernel.config.mpiexec import FORWARDED_ENV
from casa_kernel.config.security import key_base_dir, keyfile_wanted, private_key_base
from casa_kernel.config.settings import ClusterConfig, env_flag
from casa_kernel.errors import CasaKernelError
from casa_kernel.preflight.agent import (
    CONNECT_TIMEOUT,
    Agent,
    agent_command,
    find_agent,
    remote_line,
)
from casa_kernel.preflight.judge import DEFAULT_TIMEOUT, Context, Outcome, judge
from casa_kernel.preflight.probe import collect, encode_request
from casa_kernel.preflight.report import Report

#: The seed's variables whose paths must exist on every host (those that are
#: set): lists of folders, single files, and CASAPATH ("root arch site host").
PATH_LISTS = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH")
SINGLE_PATHS = ("CASASITECONFIG",)
CASAPATH = "CASAPATH"

MARKER_PREFIX = ".casa-kernel-preflight-"


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
    """What the probe is asked (see :func:`casa_kernel.preflight.probe.collect`)."""
    return {
        "folders": dict(folders),
        "paths": list(paths),
        "env": {name: list(entries) for name, entries in env_paths.items()},
        "mpiexec": mpiexec,
    }


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
    if config.batch is not None or not env_flag(environ, variables.PREFLIGHT, default=True):
        return False
    return bool(remote_hosts(_mpi_hosts(config)))


def _mpi_hosts(config: ClusterConfig) -> list[str]:
    """The hosts mpiexec starts processes on: the servers', and the client's when
    CASA's cube client takes its slot there (casa/role.py)."""
    servers = list(config.placement.servers)
    return [config.placement.client_host, *servers] if config.cube_client else servers


def time_limit(environ: Mapping[str, str]) -> float:
    raw = environ.get(variables.PREFLIGHT_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise CasaKernelError(
            f"{variables.PREFLIGHT_TIMEOUT}={raw!r} is not a positive number of seconds"
        )
    return value


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What mpiexec forwards to every server (``-x``), as the probe must see it."""
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
    hosts = remote_hosts(_mpi_hosts(config))
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
        if keyfile_wanted(config.encrypted, False, config.batch is not None):
            keydir = private_key_base(key_base_dir(environ))
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
