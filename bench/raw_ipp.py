"""Raw ipyparallel baselines: the same kind of cluster casa-kernel starts, without casa-kernel.

``raw_cluster(n)`` starts ``ipp.Cluster(engines="mpi")`` with the settings casa-kernel
uses on this box (500 ms heartbeat, ``--bind-to none``, no ofi BTL, root allowed) so
the only difference left is casa-kernel's own code. ``ipcluster_start`` measures the
``ipcluster start --engines=mpi`` command line, as a user would type it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import MPIEXEC, kill_tree, mpi_env

HEARTBEAT_ARGS = ["--HeartMonitor.period=500", "--HeartMonitor.max_heartmonitor_misses=20"]


@contextlib.contextmanager
def raw_cluster(n: int, timeout: float = 600) -> Iterator[tuple[Any, dict[str, float]]]:
    """(client, start times); stopped afterwards.

    Start times from ``Cluster`` creation: ``registered_s`` (n engines registered)
    and ``ready_s`` (the first ``apply_sync`` to all of them has returned, which
    is what casa-kernel's "servers ready" includes: its setup call).
    """
    import ipyparallel as ipp

    workdir = tempfile.mkdtemp(prefix="bench-ipp-")
    env = {k: v for k, v in mpi_env().items() if k.startswith(("OMPI_", "PRTE_"))}
    env["PATH"] = mpi_env()["PATH"]
    t0 = time.perf_counter()
    cluster = ipp.Cluster(
        engines="mpi",
        n=n,
        profile_dir=os.path.join(workdir, "profile"),
        cluster_id=f"bench-raw-{os.getpid()}",
        controller_ip="127.0.0.1",
        controller_args=list(HEARTBEAT_ARGS),
        engine_timeout=int(timeout),
        log_level=40,
    )
    cluster.config.MPIEngineSetLauncher.mpi_cmd = [MPIEXEC]
    cluster.config.MPIEngineSetLauncher.mpi_args = ["--bind-to", "none", "--oversubscribe"]
    cluster.config.MPIEngineSetLauncher.environment = env
    cluster.config.LocalControllerLauncher.environment = env
    try:
        cluster.start_controller_sync()
        cluster.start_engines_sync(n)
        client = cluster.connect_client_sync()
        client.wait_for_engines(n, timeout=timeout)
        registered_s = time.perf_counter() - t0
        client[:].apply_sync(noop)
        ready_s = time.perf_counter() - t0
        yield client, {"registered_s": registered_s, "ready_s": ready_s}
    finally:
        with contextlib.suppress(Exception):
            client.close()
        with contextlib.suppress(Exception):
            cluster.stop_cluster_sync()
        shutil.rmtree(workdir, ignore_errors=True)


def noop() -> None:
    return None


def noop1(_x: Any) -> None:
    return None


def engine_pid() -> int:
    import os as _os

    return _os.getpid()


# ipyparallel ships functions by value but imports their module on the engine;
# the engines cannot import bench/, so these say they come from __main__.
for _f in (noop, noop1, engine_pid):
    _f.__module__ = "__main__"


def ipcluster_start(n: int, tuned: bool, timeout: float = 300) -> dict[str, float]:
    """Time ``ipcluster start -n N --engines=mpi`` until N engines ran a first no-op.

    ``tuned``: the controller heartbeat casa-kernel uses (500 ms) and no delay
    between controller and engines; otherwise ipcluster's defaults (3 s heartbeat,
    1 s delay). mpiexec flags are only those this box needs (root, 2 cores).
    """
    import ipyparallel as ipp

    ipcluster = str(Path(sys.prefix) / "bin" / "ipcluster")
    prof = Path(tempfile.mkdtemp(prefix="bench-ipcluster-"))
    config = [
        f"c.MPILauncher.mpi_cmd = [{MPIEXEC!r}]",
        "c.MPILauncher.mpi_args = ['--bind-to', 'none', '--oversubscribe']",
    ]
    if tuned:
        # ipcluster overrides Cluster.controller_args with its own extra CLI args;
        # the controller reads its profile's ipcontroller_config.py.
        config.append("c.Cluster.delay = 0")
        (prof / "ipcontroller_config.py").write_text(
            "c.HeartMonitor.period = 500\nc.HeartMonitor.max_heartmonitor_misses = 20\n"
        )
    (prof / "ipcluster_config.py").write_text("\n".join(config) + "\n")
    env = mpi_env()
    cid = "bench"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            ipcluster,
            "start",
            f"-n={n}",
            "--engines=mpi",
            f"--profile-dir={prof}",
            f"--cluster-id={cid}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = None
    try:
        conn = prof / "security" / f"ipcontroller-{cid}-client.json"
        deadline = time.monotonic() + timeout
        while client is None:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"ipcluster did not start (rc {proc.poll()})")
            if conn.exists():
                try:
                    client = ipp.Client(str(conn))
                except Exception:
                    client = None
            if client is None:
                time.sleep(0.005)
        conn_s = time.perf_counter() - t0
        client.wait_for_engines(n, timeout=timeout)
        registered_s = time.perf_counter() - t0
        client[:].apply_sync(noop)
        ready_s = time.perf_counter() - t0
        client.close()
        t1 = time.perf_counter()
        subprocess.run(
            [ipcluster, "stop", f"--profile-dir={prof}", f"--cluster-id={cid}"],
            env=env,
            capture_output=True,
            timeout=120,
        )
        proc.wait(timeout=60)
        stop_s = time.perf_counter() - t1
        return {
            "registered_s": registered_s,
            "ready_s": ready_s,
            "controller_file_s": conn_s,
            "stop_s": stop_s,
        }
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        shutil.rmtree(prof, ignore_errors=True)
