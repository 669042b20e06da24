"""Preflight inside a batch job: servers from the queue run on nodes nobody knows
before the job starts, so the job script runs the probe on each node first."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from casa_kernel import variables
from casa_kernel.config.settings import ClusterConfig, env_flag
from casa_kernel.preflight.agent import REACHED, Agent
from casa_kernel.preflight.judge import Outcome, judge
from casa_kernel.preflight.probe import TAG
from casa_kernel.preflight.report import Report
from casa_kernel.preflight.run import _Probe, time_limit

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
    if not env_flag(environ, variables.PREFLIGHT, default=True):
        return None
    limit = time_limit(environ)
    probe = _Probe.prepare(config, environ, Agent(_JOB_MANAGER[config.batch.system]), limit)
    return JobPreflight(probe, job_script_lines(config.batch.system, probe.line, limit))
