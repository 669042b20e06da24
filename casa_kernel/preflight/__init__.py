"""Preflight: the seed's multi-node requirements, checked on every host before a launch.

One module per step: :mod:`~casa_kernel.preflight.agent` (how a command reaches
a host), :mod:`~casa_kernel.preflight.probe` (what runs there: standard library
only), :mod:`~casa_kernel.preflight.judge` (the host's facts against the
client's), :mod:`~casa_kernel.preflight.report` (the table and ONE error),
:mod:`~casa_kernel.preflight.run` (every host at once: :func:`check`,
:func:`require`) and :mod:`~casa_kernel.preflight.job` (inside a batch job).

The names the rest of casa-kernel uses are served here, loaded on first use, so
``python -m casa_kernel.preflight.probe`` on a remote host imports nothing else.
"""

from __future__ import annotations

import importlib

_API = {
    "REQUIREMENTS": "judge",
    "Agent": "agent",
    "Check": "judge",
    "Report": "report",
    "check": "run",
    "needed": "run",
    "probe_request": "run",
    "remote_hosts": "run",
    "require": "run",
    "run_probes": "run",
    "time_limit": "run",
    "JOB_DONE": "job",
    "JOB_NODES": "job",
    "JOB_TAG": "job",
    "JobPreflight": "job",
    "for_job": "job",
    "job_script_lines": "job",
    "parse_job_output": "job",
    "without_job_lines": "job",
}


def __getattr__(name: str) -> object:
    if name in _API:
        return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_API)
