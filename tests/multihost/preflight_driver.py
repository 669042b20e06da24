"""Drive a casa-kernel through the preflight on three fake hosts, with faults per host.

The sibling of ``driver.py`` (same namespaces, same /etc/hosts and veth set-up,
imported from it), run by ``tests/test_preflight_multihost.py`` inside fresh
network, UTS and mount namespaces. The hosts are orion (the client), antares and
sirius. Its launcher agent (``PRTE_MCA_plm_ssh_agent``, what mpiexec and the
preflight both use) runs each host's command in new UTS and mount namespaces
named after the host, after reading a faults file the driver rewrites between
cells, so one host at a time can be broken the way real clusters break:

* ``{"ssh": TEXT}``: the agent prints TEXT and exits 255, as ssh does when it
  cannot connect;
* ``{"hide": [FOLDER]}``: a tmpfs is mounted over FOLDER on that host only (the
  data, or the folder of the servers' connection key, is not on a shared file
  system there);
* ``{"bind": [[SRC, DST]]}``: SRC is bind-mounted over DST on that host only
  (another casatasks version: its installed METADATA says so);
* ``{"hang": true}``: the host never answers.

It prints one JSON object per line, as driver.py: ``{"kernel_pid": P}`` first,
then one object per step, then the processes left after the kernel's shutdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # driver.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for kernels

from driver import CLIENT_HOST, INTERFACE, SPMD_CELL, emit, setup_namespaces  # noqa: E402
from kernels import (  # noqa: E402
    cluster_processes,
    execute,
    kernel_env,
    kernel_pid,
    running_kernel,
    wait_gone,
)

# The agent: `agent HOST COMMAND...` (as prterun calls it), a shell wrapper
# giving the Python part fresh UTS and mount namespaces (mounts made there stay
# on that "host").
AGENT = """#!/bin/sh
host="$1"; shift
exec unshare --uts --mount {python} {agent_py} {faults} "$host" "$*"
"""

AGENT_PY = """\
import json, os, socket, subprocess, sys

faults_path, host, command = sys.argv[1:4]
try:
    with open(faults_path) as f:
        faults = json.load(f).get(host, {})
except FileNotFoundError:
    faults = {}
if "ssh" in faults:
    print(faults["ssh"], file=sys.stderr, flush=True)
    sys.exit(255)
if faults.get("hang"):
    os.execvp("sleep", ["sleep", "600"])
socket.sethostname(host)
for folder in faults.get("hide", []):
    subprocess.run(["mount", "-t", "tmpfs", "none", folder], check=True)
for source, target in faults.get("bind", []):
    subprocess.run(["mount", "--bind", source, target], check=True)
os.execv("/bin/sh", ["sh", "-c", command])
"""

SSH_REFUSED = "ssh: connect to host {host} port 22: Connection refused"
OTHER_CASATASKS = "6.6.0.20"
PROBE_TIMEOUT = "5"  # CASA_KERNEL_PREFLIGHT_TIMEOUT: the hanging host's limit


def casatasks_metadata() -> Path:
    """The installed casatasks' METADATA file (where its version is read from)."""
    dist = metadata.distribution("casatasks")
    for file in dist.files or []:
        if file.name == "METADATA" and file.parent.name.endswith(".dist-info"):
            return Path(str(file.locate())).resolve()
    raise SystemExit("casatasks has no METADATA file")


def step(kc, name: str, code: str, timeout: float) -> None:
    """Run one cell; emit what it gave (text, HTML of its result, error, seconds)."""
    started = time.monotonic()
    reply = execute(kc, code, timeout=timeout)
    html = ""
    for message in reply.messages:
        if message["msg_type"] == "execute_result":
            html = message["content"]["data"].get("text/html", "")
    emit(
        **{
            name: {
                "status": reply.status,
                "result": reply.result,
                "html": html,
                "ename": reply.ename,
                "error": reply.error,
                "seconds": round(time.monotonic() - started, 3),
            }
        }
    )


def kill_a_server_on(kc, host: str) -> None:
    """SIGKILL one server on ``host`` (the fake hosts share this PID namespace)."""
    status = execute(kc, "%casa_cluster status", timeout=30)
    rows = [line.split() for line in (status.result or "").strip("'\"").splitlines()[2:]]
    pid = next(int(row[2]) for row in rows if row[1] == host)
    os.kill(pid, signal.SIGKILL)
    emit(killed={"host": host, "pid": pid})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--hostfile-text", required=True, help="the user's hostfile")
    parser.add_argument("--workdir", required=True, type=Path, help="an empty folder to use")
    parser.add_argument("--cell-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    hosts = [line.split()[0] for line in args.hostfile_text.splitlines() if line.split()]
    if hosts[0] != CLIENT_HOST:
        parser.error(f"the first host must be {CLIENT_HOST}, the name of this namespace")
    workdir = args.workdir.resolve()
    setup_namespaces(workdir, hosts)
    faults = workdir / "faults.json"
    faults.write_text("{}")
    agent_py = workdir / "agent.py"
    agent_py.write_text(AGENT_PY)
    agent = workdir / "agent"
    agent.write_text(
        AGENT.format(
            python=shlex.quote(sys.executable),
            agent_py=shlex.quote(str(agent_py)),
            faults=shlex.quote(str(faults)),
        )
    )
    agent.chmod(0o755)
    hostfile = workdir / "hosts.txt"
    hostfile.write_text(args.hostfile_text)
    data = workdir / "data"
    (data / "obs.mms").mkdir(parents=True)
    # another casatasks on antares: its METADATA says another version
    original = casatasks_metadata()
    other = workdir / "casatasks-METADATA"
    other.write_text(
        "".join(
            f"Version: {OTHER_CASATASKS}\n" if line.startswith("Version:") else line
            for line in original.read_text().splitlines(keepends=True)
        )
    )
    keys = workdir / "keys"  # the servers' connection file (encrypted across hosts)
    env = kernel_env(
        CASA_KERNEL_KEY_DIR=str(keys),
        CASA_KERNEL_HOSTFILE=str(hostfile),
        CASA_KERNEL_NPROCS=None,
        CASA_KERNEL_MPI_ARGS=shlex.join(["--mca", "btl_tcp_if_include", INTERFACE]),
        CASA_KERNEL_PREFLIGHT_TIMEOUT=PROBE_TIMEOUT,
        PRTE_MCA_plm_ssh_agent=str(agent),
    )
    os.chdir(workdir)

    def broken(**per_host: dict) -> None:
        faults.write_text(json.dumps(per_host))

    timeout = args.cell_timeout
    vis = "data/obs.mms"
    started = time.monotonic()
    with running_kernel(env) as (km, kc):
        pid = kernel_pid(km)
        emit(kernel_pid=pid, client_metadata=str(original))
        # every host meets every requirement: the table passes, the launch that
        # began with the kernel (preflight first) brings the servers up
        step(kc, "pass_check", f"%casa_cluster check --vis {vis}", timeout)
        step(kc, "pass_parallel", SPMD_CELL, timeout)

        broken(sirius={"ssh": SSH_REFUSED.format(host="sirius")})
        step(kc, "ssh_check", "%casa_cluster check", timeout)
        step(kc, "ssh_restart", "%casa_cluster restart", timeout)

        broken(antares={"hide": [str(data)]})
        step(kc, "data_check", f"%casa_cluster check --vis {vis}", timeout)
        step(kc, "data_start", "%casa_cluster start", timeout)
        step(kc, "data_parallel", f"%%casa_parallel --vis {vis}\nvis", timeout)

        # a server dies while antares has another casatasks: the replacement's
        # launch is checked too, and refused
        broken(antares={"bind": [[str(other), str(original)]]})
        kill_a_server_on(kc, "antares")
        step(kc, "replace_parallel", "%%casa_parallel\nrank", timeout)
        step(kc, "version_check", "%casa_cluster check", timeout)
        step(kc, "version_restart", "%casa_cluster restart", timeout)

        # antares does not share the folder of the servers' connection key
        broken(antares={"hide": [str(keys)]})
        step(kc, "keys_check", "%casa_cluster check", timeout)
        step(kc, "keys_restart", "%casa_cluster restart", timeout)

        broken(sirius={"hang": True})
        step(kc, "hang_check", "%casa_cluster check", timeout)
        broken()
        emit(processes_while_running=len(cluster_processes(pid)))
    left = wait_gone(pid, timeout=15)
    emit(markers_left=[str(p) for p in workdir.rglob(".casa-kernel-preflight-*")])
    emit(keys_left=sorted(p.name for p in keys.iterdir()) if keys.exists() else None)
    emit(
        left=[" ".join(p.cmdline()) for p in left if p.is_running()],
        seconds=round(time.monotonic() - started, 2),
    )


if __name__ == "__main__":
    main()
