"""The kernelspec: assets, packaging, `casa-kernel install`, and what Jupyter sees.

Installs are real (into tmp prefixes) and checked through a real
``jupyter kernelspec list --json``; every Jupyter/home directory points into
tmp_path so nothing leaks into ~. The kernel itself is not started here.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pytest

from casa_kernel import variables
from casa_kernel.cli import main
from casa_kernel.errors import HostfileError, PlacementError
from casa_kernel.kernel import kernelspec
from casa_kernel.kernel.kernelspec import (
    ASSETS_PACKAGE,
    LOGOS,
    KernelSpecError,
)

ROOT = Path(__file__).resolve().parent.parent
JUPYTER = Path(sys.executable).parent / "jupyter"
EXPECTED_ARGV = [sys.executable, "-m", "casa_kernel", "-f", "{connection_file}"]
TIMEOUT = 120  # seconds for one CLI / jupyter subprocess


# --------------------------------------------------------------------------- helpers


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR, without needing Pillow at test time."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment whose home and Jupyter dirs are all inside tmp_path.

    Also applied to this process, for the tests that call main() directly.
    """
    dirs = {
        "HOME": tmp_path / "home",
        "JUPYTER_DATA_DIR": tmp_path / "jupyter-data",
        "JUPYTER_CONFIG_DIR": tmp_path / "jupyter-config",
        "JUPYTER_RUNTIME_DIR": tmp_path / "jupyter-runtime",
        # jupyter_client's KernelSpecManager asks IPython for its dir (legacy
        # kernels path), which IPython creates: keep that out of home too.
        "IPYTHONDIR": tmp_path / "ipython",
    }
    dirs["HOME"].mkdir()
    env = dict(os.environ)
    for name, path in dirs.items():
        env[name] = str(path)
        monkeypatch.setenv(name, str(path))
    for name in ("JUPYTER_PATH", "JUPYTER_PREFER_ENV_PATH"):
        env.pop(name, None)
        monkeypatch.delenv(name, raising=False)
    return env


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "casa_kernel.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def jupyter_kernelspecs(prefix: Path, env: dict[str, str]) -> dict[str, dict]:
    """`jupyter kernelspec list --json`, with prefix's kernels on JUPYTER_PATH."""
    env = {**env, "JUPYTER_PATH": str(prefix / "share" / "jupyter")}
    proc = subprocess.run(
        [str(JUPYTER), "kernelspec", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["kernelspecs"]


def kernel_dir(prefix: Path, name: str = "casa-mpi") -> Path:
    return prefix / "share" / "jupyter" / "kernels" / name


def write_hostfile(path: Path, text: str = "localhost slots=2\nnode2 slots=4\n") -> Path:
    path.write_text(text)
    return path


def fake_mpiexec(path: Path, executable: bool = True) -> Path:
    """A stand-in site mpiexec: install only checks that it is an executable file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    mode = 0o755 if executable else 0o644
    path.chmod(mode)
    return path


def assert_logos_installed(directory: Path) -> None:
    assets = resources.files(ASSETS_PACKAGE)
    for name in LOGOS:
        assert (directory / name).read_bytes() == assets.joinpath(name).read_bytes(), name


# --------------------------------------------------------------------------- assets


def test_assets_resolve_through_importlib_resources() -> None:
    assets = resources.files(ASSETS_PACKAGE)
    template = json.loads(assets.joinpath("kernel.json").read_text())
    assert template == {
        "argv": ["{python}", "-m", "casa_kernel", "-f", "{connection_file}"],
        "display_name": "CASA (MPI)",
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"debugger": False},
    }
    assert png_size(assets.joinpath("logo-32x32.png").read_bytes()) == (32, 32)
    assert png_size(assets.joinpath("logo-64x64.png").read_bytes()) == (64, 64)
    svg = ET.fromstring(assets.joinpath("logo-svg.svg").read_bytes())
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"


def test_assets_package_is_the_root_kernelspec_dir() -> None:
    # An editable install must serve the repository's files, not a stale copy.
    # (In a wheel install the files sit in site-packages: nothing to compare.)
    assets = resources.files(ASSETS_PACKAGE)
    if not (ROOT / "kernelspec" / "kernel.json").exists():
        pytest.skip("not running from a source checkout")
    for name in ("kernel.json", *LOGOS):
        assert assets.joinpath(name).read_bytes() == (ROOT / "kernelspec" / name).read_bytes()


def test_pyproject_lists_every_subpackage() -> None:
    """packages is an explicit list (for the kernelspec/ mapping): catch a forgotten one."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    assert config["package-dir"] == {
        ASSETS_PACKAGE: "kernelspec",
        "casa_kernel.notebooks": "notebooks",
    }
    # Every directory with Python files (resources/ too: setuptools warns about
    # an importable directory left out, even when its files ship as data).
    needed = {ASSETS_PACKAGE, "casa_kernel.notebooks"}
    for py in (ROOT / "casa_kernel").rglob("*.py"):
        rel = py.parent.relative_to(ROOT / "casa_kernel")
        if "__pycache__" not in rel.parts:
            needed.add(".".join(("casa_kernel", *rel.parts)))
    assert needed <= declared, f"add to [tool.setuptools] packages: {sorted(needed - declared)}"


# --------------------------------------------------------------------------- the library


def test_get_kernel_dict_default_records_no_size() -> None:
    spec = kernelspec.get_kernel_dict()
    assert spec["argv"] == EXPECTED_ARGV
    # Nothing recorded: the kernel fills its batch allocation, else runs N=3.
    assert spec["env"] == {}
    assert spec["display_name"] == "CASA (MPI)"


def test_get_kernel_dict_cluster_keys_override_env(tmp_path: Path) -> None:
    spec = kernelspec.get_kernel_dict(
        nprocs=4, env={variables.NPROCS: "99", variables.HOSTFILE: "/stale", "OMP_NUM_THREADS": "1"}
    )
    assert spec["env"] == {variables.NPROCS: "4", "OMP_NUM_THREADS": "1"}


def test_hostfile_alone_uses_every_slot_and_records_no_count(tmp_path: Path) -> None:
    hosts = write_hostfile(tmp_path / "hosts.txt")
    spec = kernelspec.get_kernel_dict(hostfile=str(hosts))
    # No N: the kernel places on all slots at start, as mpicasa without -n.
    assert spec["env"] == {variables.HOSTFILE: str(hosts)}


def test_write_kernel_spec_to_temp_dir() -> None:
    path = Path(kernelspec.write_kernel_spec(nprocs=2))
    try:
        assert sorted(p.name for p in path.iterdir()) == sorted(["kernel.json", *LOGOS])
        assert json.loads((path / "kernel.json").read_text())["env"] == {variables.NPROCS: "2"}
        assert_logos_installed(path)
    finally:
        shutil.rmtree(path.parent)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        pytest.param({"nprocs": 1}, PlacementError, id="n-1"),
        pytest.param({"nprocs": "3"}, PlacementError, id="n-str"),
        pytest.param({"nprocs": True}, PlacementError, id="n-bool"),
        pytest.param({"hostfile": "missing.txt"}, HostfileError, id="no-hostfile"),
        pytest.param({"mpiexec": "/nonexistent/mpiexec"}, KernelSpecError, id="no-mpiexec"),
    ],
)
def test_write_kernel_spec_validates_before_writing(
    tmp_path: Path, kwargs: dict, error: type[Exception]
) -> None:
    target = tmp_path / "spec"
    with pytest.raises(error):
        kernelspec.write_kernel_spec(str(target), **kwargs)
    assert not target.exists()


def test_install_location_options_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(KernelSpecError, match="at most one"):
        kernelspec.install(user=True, prefix=str(tmp_path / "p"))
    with pytest.raises(KernelSpecError, match="at most one"):
        kernelspec.install(sys_prefix=True, prefix=str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()


def test_install_sys_prefix_uses_sys_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandbox: dict[str, str]
) -> None:
    # Pretend this environment lives in tmp_path rather than writing into the venv.
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "env"))
    destination = kernelspec.install(sys_prefix=True)
    assert Path(destination) == kernel_dir(tmp_path / "env")
    assert json.loads((Path(destination) / "kernel.json").read_text())["env"] == {}


def test_spec_env_is_what_the_kernel_reads(tmp_path: Path) -> None:
    """The contract with casa_kernel.config.settings: its reader accepts what install writes."""
    from casa_kernel.config.settings import ClusterConfig

    hosts = write_hostfile(tmp_path / "hosts.txt")
    mpiexec = fake_mpiexec(tmp_path / "bin" / "mpiexec")
    env = kernelspec.get_kernel_dict(nprocs=5, hostfile=str(hosts), mpiexec=str(mpiexec))["env"]
    config = ClusterConfig.from_env(env)
    assert config.placement.nprocs == 5
    assert config.placement.servers == ("localhost", "node2", "node2", "node2")
    assert config.mpiexec == str(mpiexec)

    env = kernelspec.get_kernel_dict(mpiexec=str(mpiexec))["env"]
    assert ClusterConfig.from_env(env).placement.nprocs == kernelspec.DEFAULT_NPROCS


# --------------------------------------------------------------------------- the CLI, for real


def test_install_default_is_listed_by_jupyter(tmp_path: Path, sandbox: dict[str, str]) -> None:
    prefix = tmp_path / "prefix"
    proc = run_cli(["install", "--prefix", str(prefix)], sandbox)
    assert proc.returncode == 0, proc.stderr
    assert str(kernel_dir(prefix)) in proc.stdout

    specs = jupyter_kernelspecs(prefix, sandbox)
    assert "casa-mpi" in specs, sorted(specs)
    assert Path(specs["casa-mpi"]["resource_dir"]) == kernel_dir(prefix)
    spec = specs["casa-mpi"]["spec"]
    assert spec["display_name"] == "CASA (MPI)"
    assert spec["language"] == "python"
    assert spec["argv"] == EXPECTED_ARGV  # argv[0]: the Python that ran the install
    assert spec["interrupt_mode"] == "signal"
    assert spec["metadata"]["debugger"] is False
    assert spec["env"] == {}
    assert_logos_installed(kernel_dir(prefix))
    # Nothing outside the prefix: home stays empty.
    assert list(Path(sandbox["HOME"]).iterdir()) == []


def test_install_sys_prefix_is_seen_by_every_server_of_that_environment(
    tmp_path: Path, sandbox: dict[str, str]
) -> None:
    """`casa-kernel install --sys-prefix`, as examples/jupyterhub/ says a site runs it.

    In a fresh environment (a venv that sees this one's packages, so the test's
    venv is not written into), the kernelspec lands in the environment's
    share/jupyter, and a Jupyter server started from that environment -- for
    any user, with no JUPYTER_PATH -- finds it, and runs it with that Python.
    """
    import sysconfig

    env_dir = tmp_path / "env"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=TIMEOUT
    )
    python = env_dir / "bin" / "python"
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=TIMEOUT,
    ).stdout.strip()
    # addsitedir (not a bare path) so this venv's own .pth files (the editable
    # install of casa_kernel) are processed too
    this_env = sysconfig.get_paths()["purelib"]
    Path(site_packages, "this-venv.pth").write_text(f"import site; site.addsitedir({this_env!r})\n")

    proc = subprocess.run(
        [str(python), "-m", "casa_kernel.cli", "install", "--sys-prefix"],
        env=sandbox,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(kernel_dir(env_dir)) in proc.stdout
    spec = json.loads((kernel_dir(env_dir) / "kernel.json").read_text())
    assert spec["argv"][0] == str(python)
    assert spec["env"] == {}  # fills the batch job it runs in
    assert_logos_installed(kernel_dir(env_dir))

    find = "import json; from jupyter_client.kernelspec import KernelSpecManager as K; "
    find += "print(json.dumps(K().find_kernel_specs()))"
    listed = subprocess.run(
        [str(python), "-c", find], env=sandbox, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["casa-mpi"] == str(kernel_dir(env_dir))
    assert list(Path(sandbox["HOME"]).iterdir()) == []


def test_install_cluster_options_and_custom_name(tmp_path: Path, sandbox: dict[str, str]) -> None:
    prefix = tmp_path / "prefix"
    write_hostfile(tmp_path / "hosts.txt")
    mpiexec = fake_mpiexec(tmp_path / "site" / "bin" / "mpiexec")
    # Relative paths, from another cwd: the spec must record absolute ones.
    args = ["install", "--prefix", str(prefix), "--name", "casa-big"]
    args += ["--display-name", "CASA big", "-n", "5", "--hostfile", "hosts.txt"]
    args += ["--mpiexec", "site/bin/mpiexec"]
    proc = run_cli(args, sandbox, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{variables.HOSTFILE}={tmp_path / 'hosts.txt'}" in proc.stdout

    assert run_cli(["install", "--prefix", str(prefix)], sandbox).returncode == 0

    specs = jupyter_kernelspecs(prefix, sandbox)
    assert {"casa-big", "casa-mpi"} <= set(specs)
    big = specs["casa-big"]["spec"]
    assert big["display_name"] == "CASA big"
    assert big["argv"] == EXPECTED_ARGV
    assert big["env"] == {
        variables.NPROCS: "5",
        variables.HOSTFILE: str(tmp_path / "hosts.txt"),
        variables.MPIEXEC: str(mpiexec),
    }
    assert specs["casa-mpi"]["spec"]["env"] == {}
    assert_logos_installed(kernel_dir(prefix, "casa-big"))


def test_reinstall_replaces(tmp_path: Path, sandbox: dict[str, str]) -> None:
    prefix = tmp_path / "prefix"
    assert main(["install", "--prefix", str(prefix), "-n", "3"]) == 0
    assert main(["install", "--prefix", str(prefix), "-n", "4"]) == 0
    spec = jupyter_kernelspecs(prefix, sandbox)["casa-mpi"]["spec"]
    assert spec["env"] == {variables.NPROCS: "4"}


def test_mpiexec_bare_name_is_resolved_on_path(
    tmp_path: Path, sandbox: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    site = fake_mpiexec(tmp_path / "site" / "site-mpiexec")
    monkeypatch.setenv("PATH", f"{site.parent}{os.pathsep}{os.environ['PATH']}")
    prefix = tmp_path / "prefix"
    assert main(["install", "--prefix", str(prefix), "--mpiexec", "site-mpiexec"]) == 0
    spec = json.loads((kernel_dir(prefix) / "kernel.json").read_text())
    assert spec["env"][variables.MPIEXEC] == str(site)


def test_main_in_process_success(
    tmp_path: Path, sandbox: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = tmp_path / "prefix"
    hosts = write_hostfile(tmp_path / "hosts.txt")
    assert main(["install", "--prefix", str(prefix), "--hostfile", str(hosts)]) == 0
    out = capsys.readouterr().out
    assert f"Installed kernelspec casa-mpi in {kernel_dir(prefix)}" in out
    spec = json.loads((kernel_dir(prefix) / "kernel.json").read_text())
    assert spec["env"] == {variables.HOSTFILE: str(hosts)}
    assert spec["argv"] == EXPECTED_ARGV


def test_help_lists_install(sandbox: dict[str, str]) -> None:
    proc = run_cli(["--help"], sandbox)
    assert proc.returncode == 0
    assert "install" in proc.stdout
    assert main(["install", "--help"]) == 0


# --------------------------------------------------------------------------- bad input

# Each case: (build args and the expected stderr fragments from tmp_path).
BadCase = Callable[[Path], tuple[list[str], list[str]]]


def _n1(tmp: Path) -> tuple[list[str], list[str]]:
    return ["-n", "1"], ["at least 2"]


def _nabc(tmp: Path) -> tuple[list[str], list[str]]:
    return ["-n", "abc"], ["-n/--nprocs", "'abc'"]


def _missing_hostfile(tmp: Path) -> tuple[list[str], list[str]]:
    return ["--hostfile", str(tmp / "nope.txt")], [str(tmp / "nope.txt"), "not found"]


def _malformed_hostfile(tmp: Path) -> tuple[list[str], list[str]]:
    hosts = write_hostfile(tmp / "hosts.txt", "localhost slots=2\nnode2 slots=many\n")
    return ["--hostfile", str(hosts)], [f"{hosts}:2:", "slots=many"]


def _too_many(tmp: Path) -> tuple[list[str], list[str]]:
    hosts = write_hostfile(tmp / "hosts.txt", "localhost slots=2\nnode2 slots=2\n")
    return ["-n", "9", "--hostfile", str(hosts)], [str(hosts), "N=9", "4 slots"]


def _missing_mpiexec(tmp: Path) -> tuple[list[str], list[str]]:
    return ["--mpiexec", str(tmp / "no" / "mpiexec")], [str(tmp / "no" / "mpiexec")]


def _mpiexec_not_executable(tmp: Path) -> tuple[list[str], list[str]]:
    path = fake_mpiexec(tmp / "bin" / "mpiexec", executable=False)
    return ["--mpiexec", str(path)], [str(path), "not an executable"]


def _bad_name(tmp: Path) -> tuple[list[str], list[str]]:
    return ["--name", "casa mpi!"], ["invalid kernel name", "'casa mpi!'"]


BAD_CASES: dict[str, BadCase] = {
    "n-1": _n1,
    "n-abc": _nabc,
    "missing-hostfile": _missing_hostfile,
    "malformed-hostfile": _malformed_hostfile,
    "n-over-slots": _too_many,
    "missing-mpiexec": _missing_mpiexec,
    "mpiexec-not-executable": _mpiexec_not_executable,
    "bad-name": _bad_name,
}


def assert_nothing_written(prefix: Path, sandbox: dict[str, str]) -> None:
    assert not prefix.exists()
    assert list(Path(sandbox["HOME"]).iterdir()) == []
    assert not Path(sandbox["JUPYTER_DATA_DIR"]).exists()


@pytest.mark.parametrize("case", list(BAD_CASES), ids=list(BAD_CASES))
def test_bad_input_subprocess(case: str, tmp_path: Path, sandbox: dict[str, str]) -> None:
    prefix = tmp_path / "prefix"
    args, fragments = BAD_CASES[case](tmp_path)
    proc = run_cli(["install", "--prefix", str(prefix), *args], sandbox)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr
    assert_nothing_written(prefix, sandbox)


@pytest.mark.parametrize(
    "case", ["n-abc", "malformed-hostfile", "n-over-slots", "missing-mpiexec", "bad-name"]
)
def test_bad_input_in_process(
    case: str, tmp_path: Path, sandbox: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = tmp_path / "prefix"
    args, fragments = BAD_CASES[case](tmp_path)
    assert main(["install", "--prefix", str(prefix), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    for fragment in fragments:
        assert fragment in captured.err
    assert_nothing_written(prefix, sandbox)


def test_location_flags_are_mutually_exclusive(
    tmp_path: Path, sandbox: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = tmp_path / "prefix"
    assert main(["install", "--user", "--prefix", str(prefix)]) == 2
    assert "not allowed with" in capsys.readouterr().err
    assert_nothing_written(prefix, sandbox)
