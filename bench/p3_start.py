"""P3: kernel start to all servers ready, vs ``ipcluster start --engines=mpi``, and the floor.

- casa-kernel: ``KernelManager.start_kernel`` of ``python -m casa_kernel`` (N=3, so
  2 servers) until the reply of ``%casa_cluster status`` (which waits for every
  server); the time the kernel itself answers ``kernel_info`` is kept too.
- a plain ipykernel (``python -m ipykernel_launcher``): start to ``kernel_info``,
  Jupyter's own share of the above.
- ipcluster: ``ipcluster start -n 2 --engines=mpi`` until a client sees 2 engines,
  with ipcluster's defaults, and tuned like casa-kernel (500 ms heartbeat, no delay).
- floor: ``mpiexec -n 2 python -c 'from mpi4py import MPI'`` (what launching the 2
  servers' MPI world costs at least).
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import raw_ipp
from common import (
    OUT,
    PYTHON,
    log,
    med,
    mpi_env,
    mpiexec_cmd,
    proc_status,
    py_spy,
    summarize_collapsed,
)
from p1_casa import _kernel_tools

TARGET = 1.0


def kernel_start(repeats: int) -> dict[str, Any]:
    kernels = _kernel_tools()
    env = kernels.kernel_env(CASA_KERNEL_NPROCS="3")
    kernel_ready, servers_ready, shutdown, memory = [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with kernels.running_kernel(env, cwd=str(OUT)) as (km, kc):
            kernel_ready.append(time.perf_counter() - t0)
            reply = kernels.execute(kc, "%casa_cluster status", timeout=300)
            servers_ready.append(time.perf_counter() - t0)
            if reply.status != "ok":
                raise RuntimeError(f"cluster did not start: {reply.error}")
            memory.append(proc_status(kernels.kernel_pid(km)))
            t1 = time.perf_counter()
        shutdown.append(time.perf_counter() - t1)
    return {
        "kernel_ready_s": kernel_ready,
        "servers_ready_s": servers_ready,
        "shutdown_s": shutdown,
        "memory_kernel_idle": memory,
    }


def plain_ipykernel_start(repeats: int) -> dict[str, Any]:
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpec

    ready, memory = [], []
    for _ in range(repeats):
        km = KernelManager(kernel_name="")
        km._kernel_spec = KernelSpec(
            argv=[PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name="plain",
            language="python",
        )
        t0 = time.perf_counter()
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            ready.append(time.perf_counter() - t0)
            memory.append(proc_status(km.provisioner.process.pid))
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=False)
    return {"ready_s": ready, "memory_idle": memory}


def profile_kernel_start() -> str:
    """One casa-kernel start (to servers ready) under py-spy, all its processes."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpec

    kernels = _kernel_tools()
    exe = py_spy()
    if exe is None:
        return "(py-spy unavailable)"
    out = OUT / "profiles" / "p3_kernel_start_pyspy.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    km = KernelManager(kernel_name="")
    km._kernel_spec = KernelSpec(
        argv=[
            exe,
            "record",
            "--format",
            "raw",
            "--rate",
            "200",
            "--subprocesses",
            "--threads",
            "-o",
            str(out),
            "--",
            *kernels.KERNEL_CMD,
        ],
        display_name="casa (py-spy)",
        language="python",
    )
    km.start_kernel(env=kernels.kernel_env(CASA_KERNEL_NPROCS="3"), cwd=str(OUT))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        reply = kernels.execute(kc, "%casa_cluster status", timeout=300)
        if reply.status != "ok":
            return f"(profiled start failed: {reply.error})"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    deadline = time.monotonic() + 30
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    text = summarize_collapsed(out, top=60)
    out.with_suffix(".summary.txt").write_text(text)
    return text


def start_timeline() -> dict[str, float]:
    """Where casa-kernel's cluster start spends its time (in this process, N=3).

    ipyparallel's and casa-kernel's start steps are wrapped (at run time, nothing
    edited) to record when each one ends, relative to ``CasaCluster.start()``.
    """
    import functools

    import ipyparallel as ipp

    from casa_kernel.cluster import servers
    from casa_kernel.cluster.lifecycle import CasaCluster
    from casa_kernel.config.settings import ClusterConfig

    marks: dict[str, float] = {}
    t0 = [0.0]
    saved = {}

    def wrap(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        saved[(owner, name)] = original

        @functools.wraps(original)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            value = await original(*args, **kwargs)
            marks[label] = time.perf_counter() - t0[0]
            return value

        setattr(owner, name, wrapper)

    wrap(ipp.Cluster, "start_controller", "controller up (connection file written)")
    wrap(ipp.Cluster, "start_engines", "mpiexec launched")
    wrap(ipp.Cluster, "connect_client", "client connected")
    # registration ends where the servers' setup begins: mark its start
    setup = servers.EngineSet._setup
    saved[(servers.EngineSet, "_setup")] = setup

    async def marked_setup(self: Any, client: Any) -> None:
        marks["all engines registered"] = time.perf_counter() - t0[0]
        await setup(self, client)

    servers.EngineSet._setup = marked_setup  # type: ignore[method-assign]
    try:
        cluster = CasaCluster(ClusterConfig.from_options(nprocs=3))
        t0[0] = time.perf_counter()
        cluster.start()
        cluster.wait_ready()
        marks["servers set up (ready)"] = time.perf_counter() - t0[0]
        cluster.close()
    finally:
        for (owner, name), original in saved.items():
            setattr(owner, name, original)
    return dict(sorted(marks.items(), key=lambda kv: kv[1]))


def mpiexec_floor(n: int, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(
            mpiexec_cmd(n, PYTHON, "-c", "from mpi4py import MPI"),
            env=mpi_env(),
            check=True,
            capture_output=True,
            timeout=600,
        )
        times.append(time.perf_counter() - t0)
    return times


def run(repeats: int) -> dict[str, Any]:
    log("P3 casa-kernel start ...")
    ck = kernel_start(repeats)
    log("P3 plain ipykernel start ...")
    plain = plain_ipykernel_start(repeats)
    log("P3 ipcluster (defaults, tuned) ...")
    default = [raw_ipp.ipcluster_start(2, tuned=False) for _ in range(repeats)]
    tuned = [raw_ipp.ipcluster_start(2, tuned=True) for _ in range(repeats)]
    log("P3 mpiexec floor ...")
    floor2 = mpiexec_floor(2, repeats)
    floor3 = mpiexec_floor(3, repeats)
    log("P3 start timeline ...")
    timeline = start_timeline()
    log("P3 profile of one kernel start (py-spy) ...")
    profile = profile_kernel_start()
    ck_ready = med(ck["servers_ready_s"])
    ipc_default = med([r["ready_s"] for r in default])
    ipc_tuned = med([r["ready_s"] for r in tuned])
    return {
        "repeats": repeats,
        "casa_kernel": ck,
        "plain_ipykernel": plain,
        "ipcluster_default": default,
        "ipcluster_tuned": tuned,
        "mpiexec_floor_n2_s": floor2,
        "mpiexec_floor_n3_s": floor3,
        "ratio_vs_ipcluster_default": ck_ready / ipc_default,
        "ratio_vs_ipcluster_tuned": ck_ready / ipc_tuned,
        "ratio_vs_floor": ck_ready / med(floor2),
        "target": ck_ready / ipc_default <= TARGET,
        "target_tuned": ck_ready / ipc_tuned <= TARGET,
        "timeline_s": timeline,
        "profile": profile,
    }
