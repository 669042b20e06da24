"""Drive a casa-kernel whose servers run on two fake hosts, orion and antares.

Run by ``tests/test_multihost.py`` as root, already inside fresh network, UTS and
mount namespaces (``unshare --net --uts --mount --fork``), so everything set up
here vanishes with the namespaces and nothing touches the machine's real network,
name or ``/etc/hosts``:

* ``lo`` up, plus a veth pair whose end ``va`` carries 127.0.1.1: OpenMPI leaves
  loopback interfaces out between hosts, so the daemons and ranks of different
  "hosts" talk over ``va`` (``--mca btl_tcp_if_include va``);
* this namespace is named ``orion``, the hostfile's first host, where the client
  (the kernel) runs, as under mpicasa;
* ``/etc/hosts`` is replaced (bind mount) by one where orion and antares are
  127.0.1.1, so the controller location the kernel advertises
  (``socket.getfqdn()``, i.e. orion) resolves on every fake host, whatever the
  real machine's name or resolver is;
* OpenMPI's ssh launcher agent is replaced by a script that runs the daemon of a
  host locally, in a new UTS namespace named after that host, so the ranks there
  see that name (``MPI.Get_processor_name()``).

Then it starts the kernel with jupyter_client, runs the cells and prints one JSON
object per line on stdout: ``{"kernel_pid": P}`` as soon as the kernel runs (so
the caller can clean up after a crash), then the replies, then the processes of
that kernel's cluster still alive after its shutdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for kernels

from kernels import (  # noqa: E402
    cluster_processes,
    execute,
    kernel_env,
    kernel_pid,
    running_kernel,
    wait_gone,
)

CLIENT_HOST = "orion"
HOSTS_ADDRESS = "127.0.1.1"  # on va: not a loopback interface to OpenMPI
INTERFACE = "va"

# prterun calls the agent as `agent HOST COMMAND...`, the command being one shell
# line (the daemon, with its environment set first).  The host is named by
# Python rather than hostname(1), which newer distributions no longer install.
AGENT = """#!/bin/sh
host="$1"; shift
exec unshare --uts {python} -c '
import os, socket, sys
socket.sethostname(sys.argv[1])
os.execv("/bin/sh", ["sh", "-c", sys.argv[2]])
' "$host" "$*"
"""

SPMD_CELL = """%%casa_parallel
from mpi4py import MPI
(rank, MPI.Get_processor_name(), comm.allreduce(rank))
"""


def run(*command: str) -> None:
    """Run a set-up command; its failure ends the driver with its message."""
    subprocess.run(command, check=True)


def setup_namespaces(workdir: Path, hosts: list[str]) -> None:
    """Network, host name and /etc/hosts of the fake cluster (namespaces only)."""
    run("ip", "link", "set", "lo", "up")
    run("ip", "link", "add", INTERFACE, "type", "veth", "peer", "name", "vb")
    run("ip", "addr", "add", f"{HOSTS_ADDRESS}/32", "dev", INTERFACE)
    run("ip", "link", "set", INTERFACE, "up")
    run("ip", "link", "set", "vb", "up")
    socket.sethostname(CLIENT_HOST)
    etc_hosts = workdir / "hosts"
    etc_hosts.write_text(
        "127.0.0.1 localhost\n" + "".join(f"{HOSTS_ADDRESS} {host}\n" for host in hosts)
    )
    run("mount", "--bind", str(etc_hosts), "/etc/hosts")


def emit(**fields: object) -> None:
    """One JSON line on stdout, flushed at once (the caller reads as it goes)."""
    print(json.dumps(fields), flush=True)


def drive(env: dict[str, str], cell_timeout: float) -> None:
    """Start the kernel, run the cells, shut it down, report (see module doc)."""
    started = time.monotonic()
    with running_kernel(env) as (km, kc):
        pid = kernel_pid(km)
        emit(kernel_pid=pid)
        parallel = execute(kc, SPMD_CELL, timeout=cell_timeout)
        emit(
            parallel={
                "status": parallel.status,
                "result": parallel.result,
                "error": parallel.error,
                "traceback": parallel.traceback,
                "seconds": round(time.monotonic() - started, 2),
            }
        )
        status = execute(kc, "%casa_cluster status", timeout=cell_timeout)
        emit(
            status={
                "status": status.status,
                "result": status.result,
                "error": status.error,
                "traceback": status.traceback,
            }
        )
        alive = cluster_processes(pid)
        emit(processes_while_running=len(alive))
    left = wait_gone(pid, timeout=15)
    emit(
        left=[" ".join(p.cmdline()) for p in left if p.is_running()],
        seconds=round(time.monotonic() - started, 2),
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the options, set up the namespaces and drive one kernel."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--hostfile-text", required=True, help="the user's hostfile")
    parser.add_argument("--nprocs", default=None, help="CASA_KERNEL_NPROCS (unset if omitted)")
    parser.add_argument("--workdir", required=True, type=Path, help="an empty folder to use")
    parser.add_argument("--cell-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    hostfile_text = args.hostfile_text
    hosts = [line.split()[0] for line in hostfile_text.splitlines() if line.split()]
    if hosts[0] != CLIENT_HOST:
        parser.error(f"the first host must be {CLIENT_HOST}, the name of this namespace")
    workdir = args.workdir.resolve()
    setup_namespaces(workdir, hosts)
    agent = workdir / "agent"
    agent.write_text(AGENT.format(python=shlex.quote(sys.executable)))
    agent.chmod(0o755)
    hostfile = workdir / "hosts.txt"
    hostfile.write_text(hostfile_text)
    env = kernel_env(
        CASA_KERNEL_HOSTFILE=str(hostfile),
        CASA_KERNEL_NPROCS=args.nprocs,
        CASA_KERNEL_MPI_ARGS=shlex.join(["--mca", "btl_tcp_if_include", INTERFACE]),
        PRTE_MCA_plm_ssh_agent=str(agent),
    )
    os.chdir(workdir)
    drive(env, args.cell_timeout)


if __name__ == "__main__":
    main()
