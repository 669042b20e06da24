"""Run a real two-node Slurm (orion, antares) on this one machine, in namespaces.

Started by :mod:`slurm_harness` as root inside fresh network, mount and UTS
namespaces (``unshare --net --mount --uts --fork``); everything set up here
vanishes with them and nothing touches the machine's network, name, /etc/hosts
or any Slurm/munge of the machine itself:

* ``lo`` up and a veth pair whose end ``va`` carries 127.0.1.1: the nodes, the
  controller and the MPI ranks of different "nodes" talk over ``va``;
* this namespace is the login node ``login``; ``/etc/hosts`` (bind mount) names
  login, orion and antares 127.0.1.1;
* munged on a private socket and key, slurmctld, and one slurmd per node, each
  in a UTS namespace named after its node (and a mount namespace of its own),
  all in the foreground as children of this process.

Prints ``ready <pid>`` once every node is idle, then waits for a line on stdin
(or its end): cancels every job, stops the daemons (TERM, then KILL) and exits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ADDRESS = "127.0.1.1"
LOGIN = "login"
NODES = {"orion": 3, "antares": 2}  # CPUs each: 5 tasks fill both

CONF = """\
ClusterName=casatest
SlurmctldHost={login}({address})
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge}/munge.sock
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
SchedulerType=sched/builtin
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
PlugStackConfig={root}/plugstack.conf
KillWait=2
MinJobAge=60
{nodes}
PartitionName=debug Nodes=ALL Default=YES OverSubscribe=YES MaxTime=INFINITE State=UP
"""

NAMED = """
import os, socket, sys
socket.sethostname(sys.argv[1])
os.execvp(sys.argv[2], sys.argv[2:])
"""


def run(*command: str) -> None:
    subprocess.run(command, check=True)


def setup_network(root: Path) -> None:
    run("ip", "link", "set", "lo", "up")
    run("ip", "link", "add", "va", "type", "veth", "peer", "name", "vb")
    run("ip", "addr", "add", f"{ADDRESS}/32", "dev", "va")
    run("ip", "link", "set", "va", "up")
    run("ip", "link", "set", "vb", "up")
    socket.sethostname(LOGIN)
    hosts = root / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{ADDRESS} {h}\n" for h in [LOGIN, *NODES]))
    run("mount", "--bind", str(hosts), "/etc/hosts")


def start_munge(folder: Path) -> subprocess.Popen:
    key = folder / "munge.key"
    shutil.copyfile("/etc/munge/munge.key", key)
    key.chmod(0o400)
    shutil.chown(folder, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    return subprocess.Popen(
        [
            "runuser",
            "-u",
            "munge",
            "--",
            "munged",
            "--foreground",
            "--force",
            f"--socket={folder}/munge.sock",
            f"--key-file={key}",
            f"--pid-file={folder}/munged.pid",
            f"--log-file={folder}/munged.log",
            f"--seed-file={folder}/munged.seed",
        ]
    )


def wait_for(check, what: str, timeout: float, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not check():
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"{' '.join(map(str, p.args))} exited ({p.returncode})")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def sinfo_idle(env: dict[str, str]) -> bool:
    done = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=env
    )
    states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
    return done.returncode == 0 and all(states.get(n) == "idle" for n in NODES)


def stop(procs: list[subprocess.Popen], env: dict[str, str]) -> None:
    subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
    # Give the nodes a moment to end the jobs' processes, then stop the daemons.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        q = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
        if q.returncode != 0 or not q.stdout.strip():
            break
        time.sleep(0.2)
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--ctld-port", type=int, default=6917)
    args = parser.parse_args()
    root = args.root.resolve()
    setup_network(root)
    (root / "state").mkdir()
    (root / "plugstack.conf").write_text("")
    # munged runs as munge, which cannot enter the tests' 0700 folders: its own.
    munge = Path(tempfile.mkdtemp(prefix="casa-kernel-munge-"))
    nodes = "\n".join(
        f"NodeName={name} NodeAddr={ADDRESS} Port={args.ctld_port + 1 + i} CPUs={cpus}"
        for i, (name, cpus) in enumerate(NODES.items())
    )
    conf = root / "slurm.conf"
    conf.write_text(
        CONF.format(
            login=LOGIN,
            address=ADDRESS,
            ctld_port=args.ctld_port,
            root=root,
            nodes=nodes,
            munge=munge,
        )
    )
    env = dict(os.environ, SLURM_CONF=str(conf))
    procs: list[subprocess.Popen] = []
    try:
        procs.append(start_munge(munge))
        wait_for(lambda: (munge / "munge.sock").exists(), "munged", 10, procs)
        procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env))
        for name in NODES:
            procs.append(
                subprocess.Popen(
                    # a mount namespace each too: a test can hide a folder on one
                    # node (Slurm_harness.hidden), as a node without a shared mount
                    ["unshare", "--uts", "--mount", sys.executable, "-c", NAMED, name]
                    + ["slurmd", "-D", "-N", name, "-f", str(conf)],
                    env=env,
                )
            )
        wait_for(lambda: sinfo_idle(env), "idle nodes", 60, procs)
        print(f"ready {os.getpid()}", flush=True)
        sys.stdin.readline()
    finally:
        stop(procs, env)
        shutil.rmtree(munge, ignore_errors=True)
        print("stopped", flush=True)


if __name__ == "__main__":
    main()
