"""Capture the fake cluster's traffic while a cell sends a known text and returns
known bytes; report where either was seen in clear.

Run by ``tests/test_encryption.py`` as root inside fresh network, UTS and mount
namespaces, like ``driver.py`` (whose set-up it reuses: hosts orion and antares,
the kernel on orion, the servers' daemons started by the fake ssh agent). The
capture (``capture.py``) covers every interface of the namespace from before the
kernel starts until the cells are done. The kernel's Jupyter channels are left
out (they carry the cell and its result by design); everything else -- client
<-> controller <-> engines, the MPI launch and MPI traffic -- is searched.

Prints JSON lines like ``driver.py``: ``kernel_pid``, ``parallel``, ``status``,
``files`` (modes of the private folder and the connection files), ``keyfiles``
(what was seen in the shared key folder while servers started, with modes,
see casa_kernel/cluster/keyfile.py), ``keys_while_running``,
``capture`` (what was found where), ``left``, ``keys_left`` (what is still in
the shared key folder after the kernel's shutdown).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import stat
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for kernels
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/multihost/

from capture import Capture, flows_containing, tcp_streams  # noqa: E402
from driver import AGENT, CLIENT_HOST, INTERFACE, emit, setup_namespaces  # noqa: E402
from kernels import (  # noqa: E402
    cluster_processes,
    execute,
    kernel_env,
    kernel_pid,
    running_kernel,
    wait_gone,
)

HOSTFILE = "orion slots=1\nantares slots=2\n"  # the client on orion, both servers on antares

# Seen nowhere but in the cell's source: found in the capture, it went in clear.
CELL_TEXT = "casa-kernel cleartext probe: Orion Nebula 7Q2vX9"
PROBE_CELL = f"""%%casa_parallel
import numpy as np
note = {CELL_TEXT!r}
pattern = np.arange(1 << 14, dtype=np.uint64) * 2654435761 % (1 << 32)
pattern.astype("<u4")
"""


def result_bytes() -> bytes:
    """64 bytes from the middle of what each server returns (the cell's pattern)."""
    import numpy as np

    pattern = np.arange(1 << 14, dtype=np.uint64) * 2654435761 % (1 << 32)
    return pattern.astype("<u4").tobytes()[4096:4160]


def security_files(pid: int) -> tuple[Path, dict[str, object]]:
    """The cluster's private folder and connection files, from its controller's
    environment; with their permission bits."""
    for proc in cluster_processes(pid):
        try:
            profile = proc.environ().get("IPP_PROFILE_DIR")
        except Exception:
            continue
        if profile:
            break
    else:
        raise RuntimeError("no process of the cluster names its profile folder")
    workdir = Path(profile).parent
    modes = {str(workdir): oct(stat.S_IMODE(workdir.stat().st_mode))}
    for path in sorted((Path(profile) / "security").glob("*.json")):
        modes[path.name] = oct(stat.S_IMODE(path.stat().st_mode))
    return Path(profile) / "security", modes


class KeyWatch:
    """Every file and folder seen under the shared key folder while servers start
    (it is removed once they have registered), relative, with its mode."""

    def __init__(self, base: Path):
        self.base, self.seen = base, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keywatch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in [self.base, *self.base.rglob("*")] if self.base.exists() else []:
                try:
                    mode = oct(stat.S_IMODE(path.stat().st_mode))
                except OSError:
                    continue  # removed meanwhile
                self.seen[str(path.relative_to(self.base))] = mode
            time.sleep(0.001)

    def stop(self) -> dict[str, object]:
        self._stop.set()
        self._thread.join()
        return dict(self.seen)


def engines(pid: int) -> list[dict[str, object]]:
    """How each server got its connection info: the file its command line names
    ("": none) and whether IPP_CONNECTION_INFO is in its environment."""
    found = []
    for proc in cluster_processes(pid):
        try:
            argv, environ = proc.cmdline(), proc.environ()
        except psutil.Error:
            continue
        # the engines, not mpiexec/prterun (whose command line holds theirs)
        if "--mpi" not in argv or os.path.basename(argv[0]) in ("mpiexec", "prterun"):
            continue
        prefix = "--IPEngine.url_file="
        url_file = next((a[len(prefix) :] for a in argv if a.startswith(prefix)), "")
        found.append({"url_file": url_file, "info_in_env": "IPP_CONNECTION_INFO" in environ})
    return found


def controller_ports(security: Path) -> tuple[set[int], bytes]:
    """Every port of the controller named in its connection files, and the HMAC key."""
    ports: set[int] = set()
    key = b""
    for path in security.glob("*.json"):
        info = json.loads(path.read_text())
        key = info.get("key", "").encode() or key
        for name, value in info.items():
            if isinstance(value, int) and name not in ("pid",):
                ports.add(value)
            elif isinstance(value, list):  # hb, mux: [in, out] on the engine side
                ports.update(v for v in value if isinstance(v, int))
    return ports, key


def port_owners() -> dict[int, str]:
    """Local TCP port -> name of the process holding it (this namespace, now)."""
    owners = {}
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.pid:
            try:
                owners[conn.laddr.port] = psutil.Process(conn.pid).name()
            except psutil.Error:
                pass
    return owners


def analyse(
    capture: Capture, jupyter_ports: set[int], ports: set[int], key: bytes, owners: dict[int, str]
) -> dict:
    streams = tcp_streams(capture.frames)
    jupyter = {f: d for f, d in streams.items() if f[1] in jupyter_ports or f[3] in jupyter_ports}
    others = {f: d for f, d in streams.items() if f not in jupyter}
    controller = {f: d for f, d in others.items() if f[1] in ports or f[3] in ports}
    # ZMTP 3 greeting: the security mechanism, in clear, padded to 20 bytes
    curve, null = b"CURVE" + b"\0" * 15, b"NULL" + b"\0" * 16
    return {
        "frames": len(capture.frames),
        "drops": capture.drops,
        "streams": len(streams),
        "jupyter_streams": len(jupyter),
        "controller_streams": len(controller),
        "controller_bytes": sum(len(d) for d in controller.values()),
        "curve_greetings": sum(d.count(curve) for d in controller.values()),
        "null_greetings": sum(d.count(null) for d in controller.values()),
        "text_in_jupyter": bool(flows_containing(jupyter, CELL_TEXT.encode())),
        "text_in": flows_containing(others, CELL_TEXT.encode()),
        "result_in": flows_containing(others, result_bytes()),
        # the HMAC key: every stream holding it (the Jupyter channels too), and
        # which processes hold the two ends of each (one pair per stream)
        "key_in": flows_containing(streams, key) if key else ["(no key found)"],
        "key_owners": sorted(
            {
                tuple(sorted((owners.get(f[1], "?"), owners.get(f[3], "?"))))
                for f, d in others.items()
                if key and key in d
            }
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workdir", required=True, type=Path, help="an empty folder to use")
    parser.add_argument("--encrypt", default=None, help="CASA_KERNEL_ENCRYPT (unset if omitted)")
    parser.add_argument("--cell-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    workdir = args.workdir.resolve()
    hosts = [line.split()[0] for line in HOSTFILE.splitlines()]
    assert hosts[0] == CLIENT_HOST
    setup_namespaces(workdir, hosts)
    agent = workdir / "agent"
    agent.write_text(AGENT.format(python=shlex.quote(sys.executable)))
    agent.chmod(0o755)
    hostfile = workdir / "hosts.txt"
    hostfile.write_text(HOSTFILE)
    keys = workdir / "keys"  # where the servers' connection file goes (shared: one FS)
    env = kernel_env(
        CASA_KERNEL_HOSTFILE=str(hostfile),
        CASA_KERNEL_NPROCS="3",
        CASA_KERNEL_MPI_ARGS=shlex.join(["--mca", "btl_tcp_if_include", INTERFACE]),
        CASA_KERNEL_ENCRYPT=args.encrypt,
        CASA_KERNEL_PRELOAD="0",  # CASA plays no part here
        PRTE_MCA_plm_ssh_agent=str(agent),
        CASA_KERNEL_KEY_DIR=str(keys),
    )
    os.chdir(workdir)

    capture = Capture().start()
    watch = KeyWatch(keys)
    with running_kernel(env) as (km, kc):
        pid = kernel_pid(km)
        emit(kernel_pid=pid)
        info = km.get_connection_info()
        jupyter_ports = {
            info[f"{name}_port"] for name in ("shell", "iopub", "stdin", "control", "hb")
        }
        reply = execute(kc, PROBE_CELL, timeout=args.cell_timeout)
        emit(parallel={"status": reply.status, "result": reply.result, "error": reply.error})
        status = execute(kc, "%casa_cluster status", timeout=args.cell_timeout)
        emit(status={"status": status.status, "result": status.result, "error": status.error})
        security, modes = security_files(pid)
        ports, key = controller_ports(security)
        emit(files=modes)
        emit(keyfiles=watch.stop())
        emit(keys_while_running=sorted(p.name for p in keys.iterdir()) if keys.exists() else None)
        emit(engines=engines(pid))
        owners = port_owners()
        capture.stop()
    emit(capture=analyse(capture, jupyter_ports, ports, key, owners))
    left = wait_gone(pid, timeout=15)
    emit(left=[" ".join(p.cmdline()) for p in left if p.is_running()])
    emit(keys_left=sorted(p.name for p in keys.iterdir()) if keys.exists() else None)


if __name__ == "__main__":
    main()
