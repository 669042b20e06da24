"""The kernel end to end: real kernel (jupyter_client), real mpiexec, real engines."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys

import pytest
from kernels import (
    cluster_processes,
    execute,
    kernel_env,
    kernel_pid,
    running_kernel,
    wait_gone,
)

SPMD_CELL = """%%casa_parallel
from mpi4py import MPI
rank, size, comm.allreduce(rank), MPI.Get_processor_name()
"""


def test_n3_gives_two_servers_in_one_mpi_world():
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3")) as (km, kc):
        reply = execute(kc, SPMD_CELL)
        assert reply.status == "ok", reply.traceback
        values = ast.literal_eval(reply.result)
        assert [v[0] for v in values] == [0, 1]  # ranks, in rank order
        assert {v[1] for v in values} == {2}  # size
        assert {v[2] for v in values} == {1}  # allreduce(rank) over 0 + 1
        # output of every server is relayed, marked with rank and host
        reply = execute(kc, "%%casa_parallel\nprint('hello from', rank)")
        assert reply.status == "ok", reply.traceback
        host = values[0][3]
        assert f"[rank 0@{host}] hello from 0" in reply.stdout
        assert f"[rank 1@{host}] hello from 1" in reply.stdout


def test_status_and_kernel_info():
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3")) as (km, kc):
        kc.kernel_info()
        info = kc.get_shell_msg(timeout=30)["content"]
        assert info["implementation"] == "casa_kernel"
        assert "MPI client" in info["banner"]
        reply = execute(kc, "%casa_cluster status")
        assert reply.status == "ok", reply.traceback
        lines = reply.result.strip("'\"").splitlines()
        assert "N=3" in lines[0] and "2 servers" in lines[0]
        # one machine: the controller is on 127.0.0.1 and not encrypted by default
        assert lines[0].endswith("; traffic not encrypted (loopback only)"), lines[0]
        # CASA's cube client first (a row of its own, not a server), then the servers
        assert lines[2].startswith("cube client "), lines[2]
        cube_host, cube_pid, cube_state = lines[2][len("cube client") :].split()[:3]
        rows = [line.split() for line in lines[3:]]
        assert [r[0] for r in rows] == ["0", "1"]
        assert cube_state == "idle" and all(r[3] == "idle" for r in rows)
        pids = {int(r[2]) for r in rows} | {int(cube_pid)}
        assert len(pids) == 3


def test_server_exception_names_rank_and_host():
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3")) as (km, kc):
        reply = execute(kc, "%%casa_parallel --out partial\nx = 10 // (1 - rank)\nx")
        assert reply.status == "error"
        assert reply.ename == "RemoteError"
        assert "server rank 1 on" in reply.evalue
        assert "ZeroDivisionError" in reply.evalue
        assert "<casa_parallel cell" in reply.evalue  # the server's traceback
        # what did succeed is kept
        reply = execute(kc, "partial")
        assert reply.result == "[10, None]"


def test_hostfile_without_n_uses_every_slot(tmp_path):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("# one machine\nlocalhost slots=3\n")
    env = kernel_env(CASA_KERNEL_HOSTFILE=str(hostfile))
    with running_kernel(env) as (km, kc):
        reply = execute(kc, "%%casa_parallel\nsize")
        assert reply.status == "ok", reply.traceback
        assert reply.result == "[2, 2]"


def test_hostfile_too_few_slots_is_a_clear_error(tmp_path):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("localhost slots=3\n")
    env = kernel_env(CASA_KERNEL_HOSTFILE=str(hostfile), CASA_KERNEL_NPROCS="5")
    with running_kernel(env) as (km, kc):
        reply = execute(kc, "%%casa_parallel\nrank")
        assert reply.status == "error"
        assert "N=5" in reply.error and "hosts.txt" in reply.error
        assert "3 slots" in reply.error
        # nothing was launched
        assert cluster_processes(kernel_pid(km)) == []


def test_shutdown_and_restart_leave_no_process():
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3")) as (km, kc):
        assert execute(kc, "%%casa_parallel\nrank").status == "ok"
        first = kernel_pid(km)
        assert len(cluster_processes(first)) >= 3  # controller, mpiexec, engines
        km.restart_kernel(now=False)
        kc.wait_for_ready(timeout=60)
        assert wait_gone(first, timeout=10) == []
        second = kernel_pid(km)
        assert second != first
        reply = execute(kc, "%%casa_parallel\nrank")
        assert reply.status == "ok", reply.traceback
        assert reply.result == "[0, 1]"
    assert wait_gone(second, timeout=10) == []


def test_magic_restart_with_new_n_and_stop():
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="2")) as (km, kc):
        assert execute(kc, "%%casa_parallel\nsize").result == "[1]"
        reply = execute(kc, "%casa_cluster restart -n 4")
        assert reply.status == "ok", reply.traceback
        assert execute(kc, "%%casa_parallel\nsize").result == "[3, 3, 3]"
        reply = execute(kc, "%casa_cluster stop")
        assert reply.status == "ok"
        assert wait_gone(kernel_pid(km), timeout=10) == []
        reply = execute(kc, "%%casa_parallel\nrank")
        assert reply.status == "error" and "no cluster is running" in reply.error
        reply = execute(kc, "%casa_cluster start -n 1")
        assert reply.status == "error" and "N=1" in reply.error


def test_restart_with_new_n_keeps_every_kernelspec_setting(tmp_path):
    """`%casa_cluster restart -n N` changes N only: the kernelspec's hostfile, extra
    mpiexec arguments, start timeout and controller location stay, and the new
    mpiexec really runs with those arguments."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=4\n")
    env = kernel_env(
        CASA_KERNEL_HOSTFILE=str(hostfile),
        CASA_KERNEL_MPI_ARGS="--mca btl_tcp_if_include lo",
        CASA_KERNEL_START_TIMEOUT="45",
        CASA_KERNEL_CONTROLLER_LOCATION="head-node",
    )
    show = (
        "c = casa_cluster.cluster.config\n"
        "print(repr((c.placement.hostfile, c.nservers, c.extra_mpi_args, "
        "c.start_timeout, c.controller_location)))"
    )
    with running_kernel(env) as (km, kc):
        assert execute(kc, "%%casa_parallel\nsize").result == "[3, 3, 3]"
        reply = execute(kc, "%casa_cluster restart -n 3")
        assert reply.status == "ok", reply.traceback
        assert execute(kc, "%%casa_parallel\nsize").result == "[2, 2]"
        values = ast.literal_eval(execute(kc, show).stdout.strip())
        assert values == (
            str(hostfile),
            2,
            ("--mca", "btl_tcp_if_include", "lo"),
            45.0,
            "head-node",
        )
        launchers = [
            p.cmdline() for p in cluster_processes(kernel_pid(km)) if "--hostfile" in p.cmdline()
        ]
        assert launchers and all("btl_tcp_if_include" in cmd for cmd in launchers), launchers
        # and once more with no option at all: the same configuration again
        assert execute(kc, "%casa_cluster restart").status == "ok"
        assert ast.literal_eval(execute(kc, show).stdout.strip()) == values


def test_magic_help_is_the_usage_text():
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="2")) as (km, kc):
        reply = execute(kc, "%casa_cluster --help")
        assert reply.status == "ok"
        assert "%casa_cluster [-n NPROCS] [--hostfile HOSTFILE]" in reply.stdout
        assert "Start, stop, restart the CASA cluster" in reply.stdout
        reply = execute(kc, "%%casa_parallel --help\nrank")
        assert "%casa_parallel [--vis VIS]" in reply.stdout and "sub-MS" in reply.stdout


def test_killed_kernel_leaves_nothing():
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3")) as (km, kc):
        assert execute(kc, "%%casa_parallel\nrank").status == "ok"
        pid = kernel_pid(km)
        assert cluster_processes(pid)
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid, timeout=10) == []


def test_installed_kernelspec_is_listed_and_starts(tmp_path):
    prefix = tmp_path / "prefix"
    subprocess.run(
        [sys.executable, "-m", "casa_kernel.cli", "install", "--prefix", str(prefix), "-n", "3"],
        check=True,
    )
    env = kernel_env(JUPYTER_PATH=str(prefix / "share" / "jupyter"))
    listing = subprocess.run(
        [sys.executable, "-m", "jupyter_client.kernelspecapp", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    specs = json.loads(listing.stdout)["kernelspecs"]
    assert specs["casa-mpi"]["spec"]["display_name"] == "CASA (MPI)"
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = env["JUPYTER_PATH"]
    try:
        with running_kernel(env, kernel_name="casa-mpi") as (km, kc):
            reply = execute(kc, "%%casa_parallel\nrank")
            assert reply.status == "ok", reply.traceback
            assert reply.result == "[0, 1]"
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH")
        else:
            os.environ["JUPYTER_PATH"] = old


@pytest.mark.parametrize("bad", ["1", "zero"])
def test_bad_nprocs_in_env(bad):
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS=bad)) as (km, kc):
        reply = execute(kc, "%casa_cluster status")
        assert reply.status == "error"
        assert "CASA_KERNEL_NPROCS" in reply.error or "N=1" in reply.error
