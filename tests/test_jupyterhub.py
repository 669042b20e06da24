"""JupyterHub with batchspawner's SlurmSpawner and the CASA (MPI) kernel, for real.

The hub runs ``examples/jupyterhub/jupyterhub_config.py`` -- the file a site
starts from -- with test-only settings layered on top (ports, a temp folder for
its state, a test authenticator and an API token, the test Slurm's config, the
kernelspec in a temp prefix); the Slurm is the real two-node one of
``tests/slurm_harness.py`` (munged, slurmctld, slurmd for orion and antares in
namespaces of this machine); the proxy is configurable-http-proxy from npm.
Through the hub's REST API (``tests/slurm/hub_driver.py``, on the login node)
a user's server becomes a Slurm job of 4 tasks, a CASA (MPI) kernel is started
in it through the server's REST API and its cells run over its websocket.
Needs root (namespaces), the Slurm packages and npm (``.ci/run`` installs them);
as root, a missing one is a failure, not a skip.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from slurm_harness import Slurm, slurm_for_test

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "jupyterhub" / "jupyterhub_config.py"
DRIVER = Path(__file__).resolve().parent / "slurm" / "hub_driver.py"
VENV_BIN = Path(sys.executable).parent
CHP_VERSION = "4.6.3"  # the newest that runs on Debian 12's nodejs 18
TASKS = 4  # the example's job size: the kernel and 3 servers
USER = "root"  # batchspawner needs a Unix user; this machine's only one
PORT = 8000
# Every process the test starts (hub, proxy, notebook server, kernel, servers)
# carries this in its environment, so that none can escape the final check.
MARKER = "CASA_KERNEL_HUB_TEST"

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux namespaces"),
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0,
        reason="needs root: the Slurm nodes are namespaces",
    ),
]


def proxy_command() -> str:
    """configurable-http-proxy from npm, installed once into a cache folder.

    Pinned, and kept across runs under ``~/.cache`` (``$XDG_CACHE_HOME``), so
    only the first run on a machine needs the npm registry.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "casa-kernel-tests"
    folder = cache / f"configurable-http-proxy-{CHP_VERSION}"
    binary = folder / "node_modules" / ".bin" / "configurable-http-proxy"
    if binary.exists():
        return str(binary)
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm not found: apt-get install -y nodejs npm")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once install it once
        if not binary.exists():
            staging = cache / f".staging-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            done = subprocess.run(
                [npm, "install", "--prefix", str(staging), "--no-audit", "--no-fund"]
                + [f"configurable-http-proxy@{CHP_VERSION}"],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if done.returncode != 0:
                shutil.rmtree(staging, ignore_errors=True)
                pytest.fail(f"npm install configurable-http-proxy failed:\n{done.stderr}")
            staging.rename(folder)  # complete or absent, never half-installed
    return str(binary)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    with slurm_for_test(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def hub_config(folder: Path, cluster: Slurm, token: str, proxy: str, prefix: Path) -> str:
    """The example, then only what this test machine needs on top of it."""
    env = {
        # the test Slurm's config, not /etc/slurm's: for sbatch in the hub, and the job
        "SLURM_CONF": str(cluster.conf),
        # the kernelspec in a temp prefix rather than in the venv every test shares
        "JUPYTER_PATH": str(prefix / "share" / "jupyter"),
        # Jupyter's and IPython's files, and CASA's logs, in the temp folder
        "JUPYTER_RUNTIME_DIR": str(folder / "jupyter-runtime"),
        "JUPYTER_CONFIG_DIR": str(folder / "jupyter-config"),
        "JUPYTER_DATA_DIR": str(folder / "jupyter-data"),
        "IPYTHONDIR": str(folder / "ipython"),
        "CASA_KERNEL_LOG_DIR": os.environ["CASA_KERNEL_LOG_DIR"],
        "CASASITECONFIG": os.environ["CASASITECONFIG"],
        # the two "nodes" share one machine: MPI between them over the veth, not lo
        "OMPI_MCA_btl_tcp_if_include": "va",
        MARKER: str(folder),
    }
    return f"""\
c = get_config()  # noqa: F821
load_subconfig({str(EXAMPLE)!r})  # noqa: F821

# --- test-only settings ---
c.JupyterHub.bind_url = "http://127.0.0.1:{PORT}"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.db_url = "sqlite:///{folder}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{folder}/jupyterhub_cookie_secret"
c.JupyterHub.pid_file = "{folder}/jupyterhub.pid"
c.ConfigurableHTTPProxy.pid_file = "{folder}/jupyterhub-proxy.pid"
c.ConfigurableHTTPProxy.command = [{proxy!r}]
c.JupyterHub.services = [{{"name": "casa-kernel-test", "api_token": {token!r}}}]
c.JupyterHub.load_roles = [
    {{
        "name": "casa-kernel-test",
        "scopes": ["admin:users", "admin:servers", "admin:server_state", "access:servers"],
        "services": ["casa-kernel-test"],
    }}
]
# the job's output file and working directory (the user's home by default)
c.SlurmSpawner.req_homedir = "{folder / "home"}"
c.Spawner.environment = {{**c.Spawner.environment, **{env!r}}}
"""


def marked_processes(folder: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["environ"]):
        try:
            if (proc.info["environ"] or {}).get(MARKER) == str(folder):
                found.append(proc)
        except psutil.Error:
            continue
    return [p for p in found if p.pid != os.getpid()]


def wait_no_marked(
    folder: Path, timeout: float, but: frozenset[int] = frozenset()
) -> list[psutil.Process]:
    """Wait until no process of the test (``but`` those pids) runs; return stragglers."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        left = [
            p
            for p in marked_processes(folder)
            if p.pid not in but and p.is_running() and p.status() != "zombie"
        ]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid} {' '.join(p.cmdline())}")
    return out


@contextlib.contextmanager
def running_hub(folder: Path, cluster: Slurm, config: Path) -> Iterator[subprocess.Popen]:
    """The hub on the Slurm's login node; stopped with SIGTERM, as an admin would
    (it stops the servers it started and its proxy), however the test ends.
    Anything of the test still running then is killed; when the test itself
    passed, that, or a hub deaf to SIGTERM, is a failure."""
    log = open(folder / "jupyterhub.log", "w")
    hub = subprocess.Popen(
        cluster.command([str(VENV_BIN / "jupyterhub"), "-f", str(config)]),
        cwd=folder,
        env=cluster.env(
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **{MARKER: str(folder)}
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    stopped = True
    try:
        yield hub
    finally:
        if hub.poll() is None:
            hub.send_signal(signal.SIGTERM)
            try:
                hub.wait(timeout=60)
            except subprocess.TimeoutExpired:
                stopped = False
                os.killpg(hub.pid, signal.SIGKILL)
                hub.wait()
        log.close()
        left = wait_no_marked(folder, 30)
        named = describe(left)
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
    assert stopped, f"the hub did not stop within 60 s of SIGTERM\n{hub_log(folder)}"
    assert named == [], f"left running after the hub stopped: {named}"


def report(text: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith("{"):
            merged.update(json.loads(line))
    return merged


def hub_log(folder: Path) -> str:
    path = folder / "jupyterhub.log"
    return "".join(path.read_text().splitlines(True)[-60:]) if path.exists() else ""


@pytest.mark.timeout(420)
def test_user_server_is_a_slurm_job_with_a_casa_kernel(cluster: Slurm, tmp_path: Path) -> None:
    """Spawn a user's server through the hub (a Slurm job of 4 tasks), start the
    CASA (MPI) kernel in it, run %%casa_parallel (3 servers, one MPI world) and
    %casa_cluster status (the job's id), stop the server: nothing left in the
    queue, nothing left running."""
    started = time.monotonic()
    assert EXAMPLE.is_file()  # load_subconfig would silently skip a missing file
    proxy = proxy_command()
    folder = tmp_path / "hub"
    (folder / "home").mkdir(parents=True)
    prefix = tmp_path / "prefix"
    install = subprocess.run(
        [str(VENV_BIN / "casa-kernel"), "install", "--prefix", str(prefix)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    token = secrets.token_hex(16)
    config = folder / "test_config.py"
    config.write_text(hub_config(folder, cluster, token, proxy, prefix))

    with running_hub(folder, cluster, config) as hub:
        done = cluster.run(
            sys.executable,
            str(DRIVER),
            "--url",
            f"http://127.0.0.1:{PORT}",
            "--token",
            token,
            "--hub-pid",
            str(hub.pid),
            "--user",
            USER,
            "--marker",
            f"{MARKER}={folder}",
            timeout=360,
            check=False,
        )
        got = report(done.stdout)
        context = (
            f"driver ({done.returncode}):\n{json.dumps(got, indent=1)}\n{done.stderr[-3000:]}\n"
            f"--- hub log\n{hub_log(folder)}\n{cluster.logs()}"
        )
        assert done.returncode == 0, context

        # the server was a Slurm job of the example's 4 tasks, named by batchspawner
        (job,) = got["queue_with_server"]
        job_id, state, name, _nodes = job.split()
        assert (state, name) == ("RUNNING", "spawner-jupyterhub"), context
        assert got["server"]["state"]["job_id"] == job_id, context
        assert got["job"]["NumTasks"] == str(TASKS), context
        # the kernel runs with the notebook server, on the job's first node
        assert got["kernel_start"][0] == 201, context
        assert got["kernel_info"]["status"] == "ok", context
        kernel_pid, kernel_host = ast.literal_eval(got["where"]["result"])
        assert got["job"]["BatchHost"] == kernel_host, context

        # 4 tasks: the kernel (the client) holds one, its servers the other 3, one MPI world
        parallel = got["parallel"]
        assert parallel["status"] == "ok", context
        ranks = ast.literal_eval(parallel["result"])
        assert [r[0] for r in ranks] == [0, 1, 2], context
        assert {r[1] for r in ranks} == {3}, context  # comm.Get_size()
        assert {r[3] for r in ranks} == {0 + 1 + 2}, context  # allreduce over that world
        assert {r[2] for r in ranks} <= {"orion", "antares"}, context

        status = got["status"]
        assert status["status"] == "ok", context
        assert status["result"].startswith(
            f"CASA cluster (running): client on {kernel_host}, 3 servers, N={TASKS} "
            f"(Slurm job {job_id}: "
        ), context

        # what the final checks look for: every process of the test carries the marker
        running = got["processes_while_running"]
        for what, count in (
            ("/bin/jupyterhub ", 1),
            ("configurable-http-proxy", 1),
            ("batchspawner-singleuser", 1),
            ("-m casa_kernel", 1),
            ("prterun", 1),
            ("ipyparallel.engine", 3),
        ):
            assert sum(what in cmd for cmd in running) >= count, (what, running)

        # stopped through the hub: the job left the queue, its processes are gone
        assert got["stop"][0] in (202, 204), context
        assert got["queue_after_stop"] == [], context
        assert cluster.wait_queue_empty(timeout=30) == [], context
        assert not psutil.pid_exists(kernel_pid) or (
            psutil.Process(kernel_pid).status() == psutil.STATUS_ZOMBIE
        ), context
        hub_and_proxy = [hub.pid] + [p.pid for p in psutil.Process(hub.pid).children()]
        left = wait_no_marked(folder, 30, but=frozenset(hub_and_proxy))
        assert left == [], describe(left)

    # (running_hub checked that the hub stopped its proxy as it went: nothing is left)
    timings = ("hub_ready_seconds", "spawn_seconds", "kernel_start_seconds", "stop_seconds")
    print({key: got[key] for key in timings}, f"cells {got['parallel']['seconds']} s,")
    print(f"status {status['result']!r}; wall time {time.monotonic() - started:.1f} s")
