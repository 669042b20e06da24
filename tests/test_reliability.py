"""Nothing lost, nothing left behind: server deaths, interrupts, hangs, bad input."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import stat
import threading
import time

import psutil
import pytest
from kernels import (
    cluster_processes,
    execute,
    kernel_env,
    kernel_pid,
    make_mms,
    running_kernel,
)


def _servers(kc) -> dict[int, int]:
    """rank -> pid of the kernel's servers."""
    reply = execute(kc, "%%casa_parallel\nimport os\nos.getpid()")
    assert reply.status == "ok", reply.error
    return dict(enumerate(ast.literal_eval(reply.result)))


@pytest.fixture(scope="module")
def mms(tmp_path_factory, casa_env):
    root = tmp_path_factory.mktemp("reliability")
    return make_mms(root, "r", nant=5, nchan=8, nint=16, nscans=2)[1]


@pytest.fixture(scope="module")
def kc(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reliability-cwd")
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3"), cwd=str(workdir)) as (km, kc):
        kc.km, kc.workdir = km, workdir
        yield kc


def test_killed_server_costs_no_result(kc, mms):
    cell = (
        f"%%casa_parallel --vis {mms} --out summ\n"
        "import time\ntime.sleep(1.5)\nflagdata(vis=vis, mode='summary')"
    )
    clean = execute(kc, cell)
    assert clean.status == "ok", clean.error
    expected = json.loads(execute(kc, "import json; print(json.dumps(summ))").stdout)

    victim = _servers(kc)[1]
    killer = threading.Timer(0.8, os.kill, (victim, signal.SIGKILL))
    killer.start()
    faulty = execute(kc, cell)
    killer.join()
    assert faulty.status == "ok", faulty.error
    assert "server rank 1 on" in faulty.stderr and "died of signal 9" in faulty.stderr
    assert "re-ran:" in faulty.stderr and "r.mms.000" in faulty.stderr
    got = json.loads(execute(kc, "import json; print(json.dumps(summ))").stdout)
    assert got == expected
    assert victim not in _servers(kc).values()  # new servers took over


def test_a_crashed_server_is_named_with_where_it_crashed(kc):
    """A segfault (CASA's C++ on a bad input, here ctypes) ends a server: the
    cell's error says which, the signal, and the Python frame it crashed in
    (faulthandler on the servers), and new servers run the next cell."""
    cell = (
        "%%casa_parallel\nimport ctypes, os\n"
        "if rank == 1 and not os.path.exists('crashed-once'):\n"
        "    open('crashed-once', 'w').close()\n    ctypes.string_at(0)\nrank"
    )
    reply = execute(kc, cell, timeout=120)
    assert reply.status == "ok" and reply.result == "[0, 1]", reply.error
    assert re.search(
        r"server rank 1 on \S+ died of signal 11 \(Segmentation fault\), in string_at "
        r"\(\S+ctypes/__init__\.py:\d+\)",
        reply.stderr,
    ), reply.stderr
    assert "re-ran" in reply.stderr


def test_interrupt_stops_every_server_quickly(kc):
    started = time.monotonic()
    threading.Timer(1.5, kc.km.interrupt_kernel).start()
    reply = execute(kc, "%%casa_parallel\nimport time\ntime.sleep(60)")
    elapsed = time.monotonic() - started
    assert reply.status == "error" and reply.ename == "KeyboardInterrupt"
    assert elapsed < 1.5 + 5
    status = execute(kc, "%casa_cluster status")
    assert status.result.count("idle") == 3, status.result
    again = execute(kc, "%%casa_parallel\nrank")
    assert again.status == "ok" and again.result == "[0, 1]"


def test_stopped_server_times_out_naming_it_and_is_replaced(kc):
    pids = _servers(kc)
    os.kill(pids[0], signal.SIGSTOP)
    started = time.monotonic()
    try:
        reply = execute(kc, "%%casa_parallel --timeout 2\nrank")
    finally:
        if psutil.pid_exists(pids[0]):
            os.kill(pids[0], signal.SIGCONT)
    assert time.monotonic() - started < 2 + 5
    assert reply.status == "error"
    assert reply.ename == "TaskTimeout"
    assert "rank 0@" in reply.evalue and "did not stop" in reply.evalue
    assert "killed and new ones are starting" in reply.evalue
    again = execute(kc, "%%casa_parallel\nrank")
    assert again.status == "ok" and again.result == "[0, 1]", again.error
    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == "zombie"
    assert pids[0] not in _servers(kc).values()


def test_unpicklable_value_is_a_clear_error(kc):
    reply = execute(kc, "%%casa_parallel\nimport threading\nthreading.Lock()")
    assert reply.status == "error"
    assert "server rank 0 on" in reply.evalue
    assert "pickle" in reply.evalue.lower() or "serializ" in reply.evalue.lower()
    assert execute(kc, "%%casa_parallel\nrank").result == "[0, 1]"


def test_controller_listens_on_loopback_and_files_are_private(kc):
    pid = kernel_pid(kc.km)
    listening = []
    for proc in cluster_processes(pid):
        try:
            cmd = " ".join(proc.cmdline())
            if "ipyparallel.controller" not in cmd:
                continue
            listening += [c for c in proc.net_connections("inet") if c.status == "LISTEN"]
        except psutil.Error:
            continue
    assert listening, "no listening socket found for the controller"
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}

    reply = execute(kc, "casa_cluster.cluster.janitor.workdir")
    workdir = ast.literal_eval(reply.result)
    assert stat.S_IMODE(os.stat(workdir).st_mode) == 0o700
    json_files = []
    for root, _dirs, files in os.walk(workdir):
        json_files += [os.path.join(root, f) for f in files if f.endswith(".json")]
    assert json_files
    for path in json_files:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
        with open(path) as f:
            info = json.load(f)
        if "key" in info:
            assert info["key"], "message signing must stay on"


def test_missing_mpiexec_is_a_clear_error():
    env = kernel_env(CASA_KERNEL_NPROCS="3", CASA_KERNEL_MPIEXEC="/nonexistent/mpiexec")
    with running_kernel(env) as (km, kc):
        reply = execute(kc, "%%casa_parallel\nrank")
        assert reply.status == "error"
        assert "/nonexistent/mpiexec" in reply.error
        assert cluster_processes(kernel_pid(km)) == []


def test_unknown_host_names_the_host(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\nnosuchhost.invalid slots=2\n")
    env = kernel_env(CASA_KERNEL_HOSTFILE=str(hostfile))
    with running_kernel(env) as (km, kc):
        reply = execute(kc, "%%casa_parallel\nrank")
        assert reply.status == "error"
        assert "nosuchhost.invalid" in reply.error
        deadline = time.monotonic() + 10
        while cluster_processes(kernel_pid(km)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cluster_processes(kernel_pid(km)) == []
