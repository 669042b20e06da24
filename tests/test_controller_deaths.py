"""The controller dies or goes silent: the kernel notices, says what, restores it.

Real kernel, real controller, real mpiexec. Each case: the controller's
processes are killed (SIGKILL) or stopped (SIGSTOP), or mpiexec is killed; the
kernel answers status at once and names the cause, a running cell ends with
that cause instead of waiting forever, the next cell runs on a new cluster and
says so, and nothing of the old cluster is left running. Plus the cause of the
silent controller CI met at start (a port race, cluster/ports.py), reproduced in
a network namespace whose range for outgoing connections is tiny.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
import pytest
from kernels import cluster_processes, execute, kernel_env, kernel_pid, running_kernel

# A generous bound: the watch notices within ~5 s; a hang would last forever.
NOTICE_BOUND = 60.0


@pytest.fixture(scope="module")
def kc():
    env = kernel_env(CASA_KERNEL_NPROCS="3", CASA_KERNEL_PRELOAD="0")
    with running_kernel(env) as (km, kc):
        kc.km = km
        reply = execute(kc, "%casa_cluster status")
        assert reply.status == "ok", reply.error
        yield kc


def _cluster(kc) -> list[psutil.Process]:
    return [p for p in cluster_processes(kernel_pid(kc.km)) if _alive(p)]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmd(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _controller(kc) -> list[psutil.Process]:
    """The hub and every process it forked (they share its command line)."""
    procs = []
    for p in _cluster(kc):
        try:
            if "ipyparallel.controller" in " ".join(p.cmdline()):
                procs.append(p)
        except psutil.Error:
            continue
    assert procs, "no controller process found"
    return procs


def _ready(kc) -> list[int]:
    """A cell on the servers works (restarting the cluster if it must); their pids."""
    reply = execute(kc, "%%casa_parallel\nimport os\nos.getpid()")
    assert reply.status == "ok", reply.error
    return ast.literal_eval(reply.result)


def _status_until(kc, words: str, timeout: float = NOTICE_BOUND) -> str:
    """Ask status until its text holds ``words``; each answer must come at once."""
    deadline = time.monotonic() + timeout
    while True:
        reply = execute(kc, "%casa_cluster status", timeout=10)
        text = (reply.result or "") + reply.stdout + reply.error
        if words in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def _gone(procs: list[psutil.Process], timeout: float = 30.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if _alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _next_cell_starts_a_new_cluster(kc, old: list[psutil.Process]) -> None:
    reply = execute(kc, "%%casa_parallel\nimport os\nos.getpid()")
    assert reply.status == "ok", reply.error
    assert "started a new cluster (controller and 2 servers)" in reply.stderr, reply.stderr
    assert not _gone(old), "processes of the lost cluster are still running"
    new = {p.pid for p in _controller(kc)}
    assert not new & {p.pid for p in old}


def test_controller_killed_while_idle(kc):
    _ready(kc)
    old = _cluster(kc)
    hub = min(_controller(kc), key=lambda p: p.create_time())
    _signal_all(_controller(kc), signal.SIGKILL)
    text = _status_until(kc, "(lost: ")
    assert f"lost: the controller's hub (pid {hub.pid})" in text, text
    assert "it forked (pid" in text, text  # the schedulers and heart monitor too
    _next_cell_starts_a_new_cluster(kc, old)


def test_controller_killed_during_a_cell_ends_the_cell_with_the_cause(kc, tmp_path):
    _ready(kc)
    old = _cluster(kc)
    started = tmp_path / "started"
    msg_id = kc.execute(
        f"%%casa_parallel\nimport time\nopen({str(started)!r}, 'a').write('x')\ntime.sleep(600)"
    )
    deadline = time.monotonic() + NOTICE_BOUND
    while not started.exists():
        assert time.monotonic() < deadline, "the cell never reached the servers"
        time.sleep(0.1)
    _signal_all(_controller(kc), signal.SIGKILL)
    reply = _reply(kc, msg_id, NOTICE_BOUND)
    assert reply["status"] == "error"
    assert reply["ename"] == "ClusterLost", reply
    assert "the controller's" in reply["evalue"] and "lost" in reply["evalue"], reply["evalue"]
    assert "next cell" in reply["evalue"]
    _next_cell_starts_a_new_cluster(kc, old)


def test_controller_stopped_is_silent_not_dead(kc):
    _ready(kc)
    old = _cluster(kc)
    _signal_all(_controller(kc), signal.SIGSTOP)
    text = _status_until(kc, "(lost: ")
    assert "is stopped (SIGSTOP)" in text, text
    _next_cell_starts_a_new_cluster(kc, old)


def test_controller_port_closed_under_it(kc):
    """The hub's query port (where clients ask, and register) closed under it:
    its listening socket and every connection to it destroyed (``ss -K``)."""
    _ready(kc)
    old = _cluster(kc)
    pattern = (
        f"casa-kernel-*/profile/security/ipcontroller-casa-kernel-{kernel_pid(kc.km)}-client.json"
    )
    (client_file,) = glob.glob(os.path.join(tempfile.gettempdir(), pattern))
    with open(client_file) as f:
        port = json.load(f)["registration"]
    closed = subprocess.run(
        [
            "ss",
            "-K",
            "-a",
            "-t",
            "(",
            "sport",
            "=",
            f":{port}",
            "or",
            "dport",
            "=",
            f":{port}",
            ")",
        ],
        capture_output=True,
        text=True,
    )
    assert closed.returncode == 0, closed.stderr
    text = _status_until(kc, "(lost: ")
    # libzmq aborts the hub on a listening socket destroyed under it (SIGABRT);
    # had it lived on deaf, it would be "did not answer for 4 s"
    assert "lost: the controller's hub (pid" in text, text
    assert "SIGABRT" in text or "did not answer for" in text, text
    _next_cell_starts_a_new_cluster(kc, old)


def test_prterun_stopped_is_noticed(kc):
    _ready(kc)
    old = _cluster(kc)
    prterun = [p for p in old if p.name() in ("prterun", "mpiexec")]
    assert prterun
    _signal_all(prterun, signal.SIGSTOP)
    text = _status_until(kc, "(lost: ")
    assert f"lost: the servers' mpiexec (pid {prterun[0].pid}) is stopped (SIGSTOP)" in text, text
    _next_cell_starts_a_new_cluster(kc, old)


def test_prterun_killed_gets_new_servers_and_leaves_no_old_server(kc):
    servers = [psutil.Process(pid) for pid in _ready(kc)]
    prterun = [p for p in _cluster(kc) if p.name() in ("prterun", "mpiexec")]
    assert prterun and len(servers) == 2
    _signal_all(prterun, signal.SIGKILL)
    reply = execute(kc, "%%casa_parallel\nimport os\nos.getpid()", timeout=120)
    assert reply.status == "ok", reply.error
    # replaced between cells, or during this one (then its jobs are re-run)
    assert "the servers' mpiexec was killed by signal 9 (SIGKILL)" in reply.stderr, reply.stderr
    assert "new servers" in reply.stderr, reply.stderr
    assert not _gone(servers + prterun), "servers of the killed mpiexec are still running"


def _reply(kc, msg_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg["content"]


# ------------------------------------------------------------ the port race at start

STARTS = textwrap.dedent(
    """
    import sys
    from casa_kernel.cluster.lifecycle import CasaCluster
    from casa_kernel.config.settings import ClusterConfig

    config = ClusterConfig.from_options(nprocs=3, preload_casa=False, start_timeout=60)
    for i in range(int(sys.argv[1])):
        cluster = CasaCluster(config)
        cluster.start()
        try:
            cluster.wait_ready()
            print("started", i, flush=True)
        except Exception as exc:
            print("FAILED", i, exc, flush=True)
        finally:
            cluster.close()
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace needs root")
def test_starts_survive_a_tiny_range_for_outgoing_ports(tmp_path):
    """The controller's ports used to come from the range outgoing connections
    draw from, bound late by forked processes: with 120 ports in that range,
    most starts hung with a silent heart monitor ("Address already in use")."""
    script = tmp_path / "starts.py"
    script.write_text(STARTS)
    inner = (
        "ip link set lo up && "
        "sysctl -q -w net.ipv4.ip_local_port_range='40000 40120' && "
        f"exec {sys.executable} {script} 5"
    )
    env = {**os.environ, "CASA_KERNEL_LOG_DIR": str(tmp_path)}
    run = subprocess.run(
        ["unshare", "--net", "sh", "-c", inner],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.stdout.count("started") == 5, run.stdout + run.stderr[-3000:]


def test_a_controller_silent_during_the_start_fails_it_with_its_last_lines(tmp_path):
    """Servers held at a gate (an mpiexec that waits for a file) while the
    controller is stopped: the start fails in seconds, naming the stopped hub
    and showing the controller's last lines, and leaves nothing behind."""
    real = shutil.which("mpiexec", path=os.path.dirname(sys.executable))
    gate, wrapper = tmp_path / "go", tmp_path / "mpiexec"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'case "$1" in --version|-V) exec {real} "$@";; esac\n'
        f"while [ ! -e {gate} ]; do sleep 0.1; done\n"
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    env = kernel_env(
        CASA_KERNEL_NPROCS="3", CASA_KERNEL_PRELOAD="0", CASA_KERNEL_MPIEXEC=str(wrapper)
    )
    with running_kernel(env) as (km, kc):
        kc.km = km
        deadline = time.monotonic() + NOTICE_BOUND
        # until the hub has forked its schedulers and heart monitor (it has
        # logged its start by then); the servers wait at the gate
        while len([p for p in _cluster(kc) if "ipyparallel.controller" in _cmd(p)]) < 3:
            assert time.monotonic() < deadline, "the controller never started"
            time.sleep(0.1)
        controller = _controller(kc)
        _signal_all(controller, signal.SIGSTOP)
        reply = execute(kc, "%casa_cluster status", timeout=NOTICE_BOUND)
        text = reply.error + reply.stdout + (reply.result or "")
        assert "the cluster failed to start" in text, text
        assert "is stopped (SIGSTOP) while the servers were starting" in text, text
        assert "the controller's last lines" in text, text
        gate.touch()
        assert not _gone(controller), "the stopped controller was left behind"
        # (the gate's own `sleep 0.1` may outlive its killed shell by 0.1 s)
        left = _gone(_cluster(kc), timeout=5)
        assert not left, f"processes of the failed start are left: {left}"
