"""Preflight: judging what one host's probe gave against the client's own facts (pure).

:func:`judge` turns an :class:`Outcome` into one :class:`Check` per requirement,
each failure with what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from casa_kernel import variables
from casa_kernel.preflight.agent import _ALLOCATION_LAUNCHERS, NO_PYTHON, REACHED, Agent
from casa_kernel.preflight.probe import DISTRIBUTIONS, TAG

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

# A probe answers in ~0.2 s; ssh to a slow login node, a cold NFS home and a
# Python start on a loaded node can take seconds, a dead host takes ssh's
# ConnectTimeout.
DEFAULT_TIMEOUT = 20.0


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
    keydir: str = ""  # the shared folder of the connection key (cluster/keyfile.py); "": none


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
            f"set {variables.KEY_DIR} to a folder {host} mounts at the same path (home or project "
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
