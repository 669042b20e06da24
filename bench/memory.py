"""Memory: peak RSS (VmHWM) of the kernel and of one idle server, with baselines.

casa-kernel through a real kernel (N=3): the kernel and its servers right after
``%casa_cluster status`` (idle), then after CASA work on the Multi-MS (the first task
call imports casatasks in the kernel and on the servers). Baselines in the same
run: a plain ipykernel, an idle raw ipyparallel MPI engine; mpicasa's client and
servers come from P1 when it ran.
"""

from __future__ import annotations

from typing import Any

import raw_ipp
from common import OUT, log, proc_status
from p1_casa import SERVER_PIDS_CODE, _cell_value, _kernel_tools, kernel_call_code, memory_of
from p3_start import plain_ipykernel_start


def run(data: Any | None) -> dict[str, Any]:
    kernels = _kernel_tools()
    env = kernels.kernel_env(CASA_KERNEL_NPROCS="3")
    log("memory: casa-kernel ...")
    with kernels.running_kernel(env, cwd=str(OUT)) as (km, kc):
        reply = kernels.execute(kc, "%casa_cluster status", timeout=300)
        if reply.status != "ok":
            raise RuntimeError(f"cluster did not start: {reply.error}")
        kpid = kernels.kernel_pid(km)
        spids = _cell_value(kernels.execute(kc, SERVER_PIDS_CODE))
        idle = memory_of(kpid, spids)
        after = None
        if data is not None:
            for task, kwargs in (
                ("flagdata", {"vis": data.mms, "mode": "unflag", "flagbackup": False}),
                ("flagdata", {"vis": data.mms, "mode": "rflag", "flagbackup": False}),
                ("flagdata", {"vis": data.mms, "mode": "summary"}),
            ):
                _cell_value(kernels.execute(kc, kernel_call_code(task, kwargs), 900))
            after = memory_of(kpid, spids)
    log("memory: baselines ...")
    plain = plain_ipykernel_start(1)["memory_idle"][0]
    with raw_ipp.raw_cluster(2) as (client, _start):
        pids = client[:].apply_sync(raw_ipp.engine_pid)
        raw_engines = [proc_status(p) for p in pids]
    return {
        "casa_kernel_idle": idle,
        "casa_kernel_after_casa": after,
        "plain_ipykernel_idle": plain,
        "raw_ipp_engine_idle": raw_engines,
    }
