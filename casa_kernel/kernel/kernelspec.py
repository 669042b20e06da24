"""The casa-kernel kernelspec for Jupyter, in the shape of ipykernel's kernelspec.py.

The assets (a ``kernel.json`` template and the logos) live in the project's
root ``kernelspec/`` directory, shipped as the package
``casa_kernel.kernelspec_files``. The cluster configuration travels in the
kernelspec's ``env``, which the kernel reads at start (see
:meth:`casa_kernel.config.settings.ClusterConfig.from_env`):

``NPROCS`` (see :mod:`casa_kernel.variables` for every variable)
    N, the total process count *including the client*, as ``mpicasa -n N``.
    Without it and without a hostfile (the default of ``casa-kernel install``)
    the kernel fills the batch allocation it runs in, or runs DEFAULT_NPROCS
    processes on its own machine outside any batch job.
``HOSTFILE``
    Absolute path of an OpenMPI-syntax hostfile.
``MPIEXEC``
    Absolute path of a site ``mpiexec`` (optional: the one of mpi4py's MPI is the default).

The kernel runs with the Python that installed it, or with ``python`` (another
environment's, e.g. a monolithic CASA's own ``bin/python3``): that Python is
checked first (:func:`check_python`) to hold casa_kernel and casatasks.

Everything is validated before anything is written, so a bad option never leaves
a half-made or unusable kernelspec behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from typing import Any

from casa_kernel import variables
from casa_kernel.config.hostfile import place, read_hostfile
from casa_kernel.config.settings import DEFAULT_NPROCS as DEFAULT_NPROCS  # re-exported: cli, docs
from casa_kernel.errors import CasaKernelError

KERNEL_NAME = "casa-mpi"
DISPLAY_NAME = "CASA (MPI)"

# The reader of these variables is casa_kernel.config.settings.ClusterConfig.from_env
# (light: it imports neither ipyparallel nor CASA).
CLUSTER_ENV_KEYS = (variables.NPROCS, variables.HOSTFILE, variables.MPIEXEC)

ASSETS_PACKAGE = "casa_kernel.kernelspec_files"
LOGOS = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")
PYTHON_PLACEHOLDER = "{python}"

# Jupyter's own rule (jupyter_client.kernelspec._kernel_name_pat, private): checked
# here too so a bad --name fails with the other input errors, before any write.
_KERNEL_NAME_RE = re.compile(r"^[a-z0-9._\-]+$", re.IGNORECASE)


class KernelSpecError(CasaKernelError, ValueError):
    """An install option that cannot make a working kernelspec (bad name, mpiexec)."""


def _template() -> dict[str, Any]:
    """The kernel.json template shipped in ``kernelspec/``."""
    text = resources.files(ASSETS_PACKAGE).joinpath("kernel.json").read_text(encoding="utf-8")
    return json.loads(text)


def _resolve_mpiexec(mpiexec: str) -> str:
    """Absolute path of an executable ``mpiexec``, as the kernel will resolve it.

    A bare name is looked up on PATH (like ``config.find_mpiexec``); anything
    with a separator is a path. Recording the absolute path matters because a
    kernel started by JupyterHub neither shares this cwd nor this PATH.
    """
    expanded = os.path.expanduser(mpiexec)
    path = expanded if os.sep in expanded else shutil.which(expanded)
    if path is None:
        raise KernelSpecError(f"mpiexec {mpiexec!r}: not found on PATH")
    if not os.path.exists(path):
        raise KernelSpecError(f"mpiexec {path}: no such file")
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise KernelSpecError(f"mpiexec {path}: not an executable file")
    return os.path.abspath(path)


# What the kernel and its servers import in the kernelspec's Python. Looked up
# with find_spec, not imported: importing casatasks loads casatools (seconds,
# and measures data), which says nothing more about whether the kernel can run.
REQUIRED_MODULES = ("casa_kernel", "casatasks", "ipyparallel", "mpi4py")
PYTHON_TIMEOUT = 60.0

_PYTHON_SCRIPT = """
import importlib.util, json, sys
missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]
print(json.dumps({"version": sys.version.split()[0], "prefix": sys.prefix, "missing": missing}))
"""


@dataclass(frozen=True)
class PythonFacts:
    """A Python a kernelspec may run: where it is, its version and prefix."""

    path: str
    version: str
    prefix: str


def _python_path(python: str) -> str:
    """Absolute path of ``python`` as given, NOT resolved through symlinks.

    A monolithic CASA's ``bin/python3`` may be a wrapper that sets CASA's
    environment before running the real interpreter, and a venv's
    ``bin/python`` is a symlink whose target would lose the venv: keep the name.
    """
    expanded = os.path.expanduser(python)
    path = expanded if os.sep in expanded else shutil.which(expanded)
    if path is None or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise KernelSpecError(f"--python {python}: not an executable file")
    return os.path.abspath(path)


def check_python(python: str) -> PythonFacts:
    """Check that ``python`` can run the kernel; raise :class:`KernelSpecError` naming
    that Python and every module it lacks, with the command that installs them."""
    path = _python_path(python)
    try:
        done = subprocess.run(
            [path, "-c", _PYTHON_SCRIPT, *REQUIRED_MODULES],
            capture_output=True,
            text=True,
            timeout=PYTHON_TIMEOUT,
            stdin=subprocess.DEVNULL,
            cwd=os.path.expanduser("~"),  # not this checkout's casa_kernel by accident
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelSpecError(f"--python {path}: could not run it: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise KernelSpecError(f"--python {path}: exit code {done.returncode}: {last}")
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    if facts["missing"]:
        missing = ", ".join(facts["missing"])
        hint = f"`{path} -m pip install casa-kernel`"
        if "casatasks" in facts["missing"]:
            hint += " (which also brings casatasks: a CASA Python usually has it already)"
        raise KernelSpecError(
            f"--python {path} (Python {facts['version']}) cannot run the kernel: "
            f"it cannot import {missing}. Install into that Python: {hint}"
        )
    return PythonFacts(path, facts["version"], facts["prefix"])


def mpi_report(python: str, mpiexec: str | None = None) -> str:
    """What the kernel in ``python`` will launch with (config/mpi_match.py), as one line.

    Asked of that Python itself: its mpi4py, its prefix, its PATH. A mismatch
    of an explicit ``mpiexec`` raises :class:`KernelSpecError` (the kernel would
    refuse to start its servers); anything else is reported, never fatal here.
    """
    code = (
        "import sys\n"
        "from casa_kernel.config.mpi_match import MpiMismatchError\n"
        "from casa_kernel.config.mpi_probe import resolve_mpiexec\n"
        "try:\n"
        "    print(resolve_mpiexec(sys.argv[1] or None).describe())\n"
        "except MpiMismatchError as exc:\n"
        "    print(exc); sys.exit(3)\n"
    )
    try:
        done = subprocess.run(
            [python, "-c", code, mpiexec or ""],
            capture_output=True,
            text=True,
            timeout=PYTHON_TIMEOUT,
            stdin=subprocess.DEVNULL,
            cwd=os.path.expanduser("~"),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"MPI not checked: {exc}"
    if done.returncode == 3 and mpiexec:
        raise KernelSpecError(done.stdout.strip())
    if done.returncode != 0:
        text = done.stdout.strip() or (done.stderr.strip().splitlines() or [""])[-1]
        return f"MPI not checked: {text}"
    return done.stdout.strip()


def cluster_env(
    nprocs: int | None = None, hostfile: str | None = None, mpiexec: str | None = None
) -> dict[str, str]:
    """Validate the cluster options; return the cluster's variables (casa_kernel.variables).

    The hostfile is read and the placement worked out exactly as the kernel will
    at start, so an impossible configuration fails now, at install time.
    Raises :class:`~casa_kernel.errors.HostfileError` (naming the file and the
    line), :class:`~casa_kernel.errors.PlacementError` or :class:`KernelSpecError`.
    """
    env: dict[str, str] = {}
    hosts = None
    if hostfile is not None:
        hostfile = os.path.abspath(os.path.expanduser(os.fspath(hostfile)))
        hosts = read_hostfile(hostfile)
    # Neither: nothing recorded, so the kernel sizes its cluster from the batch
    # allocation it runs in (Slurm, PBS, LSF), else DEFAULT_NPROCS on this machine.
    if nprocs is not None or hostfile is not None:
        # place() owns the rules on N (whole number, >= 2, fits the slots).
        place(nprocs, hosts, hostfile)
    if nprocs is not None:
        env[variables.NPROCS] = str(nprocs)
    if hostfile is not None:
        env[variables.HOSTFILE] = hostfile
    if mpiexec is not None:
        env[variables.MPIEXEC] = _resolve_mpiexec(os.fspath(mpiexec))
    return env


def get_kernel_dict(
    nprocs: int | None = None,
    hostfile: str | None = None,
    mpiexec: str | None = None,
    env: dict[str, str] | None = None,
    display_name: str | None = None,
    python: str | None = None,
) -> dict[str, Any]:
    """Construct the dict for kernel.json, validating the cluster options.

    ``python`` (default: this one) runs the kernel; it is checked with
    :func:`check_python`.

    ``env`` adds variables for the kernel; the cluster's variables
    are always the ones computed from ``nprocs``/``hostfile``/``mpiexec``, so a
    stale value in ``env`` cannot contradict them.
    """
    spec_env = {k: v for k, v in (env or {}).items() if k not in CLUSTER_ENV_KEYS}
    spec_env.update(cluster_env(nprocs, hostfile, mpiexec))
    kernel = _template()
    # The kernel must run with this environment's Python (where casa_kernel,
    # casatasks and the MPI are), whatever is first on PATH when Jupyter starts it.
    runner = check_python(python).path if python is not None else sys.executable
    kernel["argv"] = [runner if a == PYTHON_PLACEHOLDER else a for a in kernel["argv"]]
    kernel["env"] = spec_env
    if display_name is not None:
        kernel["display_name"] = display_name
    return kernel


def write_kernel_spec(
    path: str | None = None,
    nprocs: int | None = None,
    hostfile: str | None = None,
    mpiexec: str | None = None,
    env: dict[str, str] | None = None,
    display_name: str | None = None,
    python: str | None = None,
) -> str:
    """Write a kernelspec directory (kernel.json and logos) to ``path``.

    Without ``path`` a temporary directory is made. The options are validated
    first: on an error nothing is created. Returns the directory.
    """
    kernel = get_kernel_dict(nprocs, hostfile, mpiexec, env, display_name, python)
    if path is None:
        path = os.path.join(tempfile.mkdtemp(suffix="_kernels"), KERNEL_NAME)
    os.makedirs(path, exist_ok=True)
    assets = resources.files(ASSETS_PACKAGE)
    for name in LOGOS:
        # as_file: the assets may sit in a zip; copy() also drops the source's
        # mode bits, which could be read-only in a system site-packages.
        with resources.as_file(assets.joinpath(name)) as source:
            shutil.copyfile(source, os.path.join(path, name))
    with open(os.path.join(path, "kernel.json"), "w", encoding="utf-8") as f:
        json.dump(kernel, f, indent=1)
        f.write("\n")
    return str(path)


def install(
    kernel_name: str = KERNEL_NAME,
    user: bool = False,
    prefix: str | None = None,
    sys_prefix: bool = False,
    display_name: str | None = None,
    nprocs: int | None = None,
    hostfile: str | None = None,
    mpiexec: str | None = None,
    env: dict[str, str] | None = None,
    python: str | None = None,
) -> str:
    """Install the casa-kernel kernelspec for Jupyter; returns its directory.

    Location as ipykernel: system-wide by default, ``user`` for the user's
    Jupyter data dir, ``prefix`` for ``PREFIX/share/jupyter/kernels`` and
    ``sys_prefix`` for the prefix of the Python that runs the kernel (``python``'s
    when given; at most one of the three).
    An existing kernelspec of the same name is replaced. Raises on invalid
    input before anything is written.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    if sum((bool(user), prefix is not None, bool(sys_prefix))) > 1:
        raise KernelSpecError("choose at most one of user, prefix and sys_prefix")
    if not _KERNEL_NAME_RE.match(kernel_name):
        raise KernelSpecError(
            f"invalid kernel name {kernel_name!r}: use ASCII letters, digits, '.', '_' and '-'"
        )
    if sys_prefix:
        prefix = check_python(python).prefix if python is not None else sys.prefix
    if prefix is not None:
        prefix = os.path.abspath(os.path.expanduser(os.fspath(prefix)))
    # Validates everything, into a scratch directory that is always removed.
    staging = tempfile.mkdtemp(prefix="casa-kernel-spec-")
    try:
        source = write_kernel_spec(
            os.path.join(staging, kernel_name),
            nprocs,
            hostfile,
            mpiexec,
            env,
            display_name,
            python,
        )
        return KernelSpecManager().install_kernel_spec(
            source, kernel_name, user=user, prefix=prefix
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
