"""The preflight's probe: what one host has, printed as one JSON line.

Run on every host the servers will use, through the same remote agent mpiexec
uses (``python -m casa_kernel.preflight.probe REQUEST``, see
:mod:`casa_kernel.preflight`), and in the kernel itself for the client's side:
the same :func:`collect` on both ends, so the comparison is like for like.

It reports facts only (versions, which paths exist, what the marker files
say); judging them is the client's business. Standard library only and no
CASA import: ``import casatools`` takes seconds, its installed metadata does
not, and a probe must answer in a fraction of a second.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from typing import Any

#: The line of the probe's answer starts with this (an ssh banner or a login
#: script may print other lines before it).
TAG = "CASA-KERNEL-PREFLIGHT"

#: Distributions whose versions must match the client's.
DISTRIBUTIONS = ("casatasks", "casatools", "mpi4py")

# `mpiexec --version` answers in ~10 ms; a broken one must not hold the probe.
MPIEXEC_TIMEOUT = 5.0


def encode_request(request: dict[str, Any]) -> str:
    """The request as one shell-safe word (URL-safe base64 of its JSON)."""
    return base64.urlsafe_b64encode(json.dumps(request).encode()).decode()


def decode_request(word: str) -> dict[str, Any]:
    return dict(json.loads(base64.urlsafe_b64decode(word.encode())))


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _mpiexec_version(mpiexec: str) -> dict[str, Any]:
    """First line of ``mpiexec --version`` ("mpiexec (Open MPI) 5.0.11")."""
    if not os.path.isfile(mpiexec):
        return {"path": mpiexec, "version": None, "problem": "not found"}
    try:
        done = subprocess.run(
            [mpiexec, "--version"],
            capture_output=True,
            text=True,
            timeout=MPIEXEC_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"path": mpiexec, "version": None, "problem": str(exc)}
    first = (done.stdout.strip().splitlines() or [""])[0].strip()
    if done.returncode != 0 or not first:
        problem = f"`{mpiexec} --version` failed (exit code {done.returncode})"
        return {"path": mpiexec, "version": None, "problem": problem}
    return {"path": mpiexec, "version": first, "problem": ""}


def _marker(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(200)
    except (OSError, UnicodeDecodeError):
        return None


def _missing(entries: list[str]) -> list[str]:
    return [entry for entry in entries if not os.path.exists(entry)]


def collect(request: dict[str, Any]) -> dict[str, Any]:
    """This host's facts for ``request`` (see :func:`casa_kernel.preflight.probe_request`).

    ``request`` keys: ``folders`` (path -> marker file in it, or None), ``paths``
    (must exist), ``env`` (variable -> the paths it names on the client),
    ``mpiexec`` (path).
    """
    from casa_kernel import __version__

    return {
        "host": socket.gethostname(),
        "python": {
            "executable": sys.executable,
            "version": platform.python_version(),
            "implementation": sys.implementation.name,
        },
        "versions": {
            "casa-kernel": __version__,
            **{name: _version(name) for name in DISTRIBUTIONS},
        },
        "mpiexec": _mpiexec_version(request.get("mpiexec") or ""),
        "folders": {
            folder: {
                "exists": os.path.isdir(folder),
                "marker": _marker(marker) if marker else None,
            }
            for folder, marker in request.get("folders", {}).items()
        },
        "paths": {path: os.path.exists(path) for path in request.get("paths", [])},
        "env": {name: _missing(list(entries)) for name, entries in request.get("env", {}).items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(
            f"usage: python -m casa_kernel.preflight.probe REQUEST (got {args!r})", file=sys.stderr
        )
        return 2
    facts = collect(decode_request(args[0]))
    print(f"{TAG} {json.dumps(facts)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
