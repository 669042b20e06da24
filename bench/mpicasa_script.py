"""mpicasa, the way CASA ships it: casampi under ``mpiexec -n 3``.

Run by bench/p1_casa.py as ``mpiexec -n 3 <bench/.venv-mpicasa/bin/python> this.py SPEC``
(never with the runtime venv: casampi must not be in it). ``import casatasks`` turns
ranks 1..N-1 into casampi servers that never return from it (they ``os._exit`` when
the client stops them); rank 0 returns as casampi's client and runs the steps of
SPEC on the Multi-MS, timing each task call, exactly as a ``mpicasa -n 3 casa -c
script.py`` user script would. casa_kernel is not installed here: it imports only
bench/common.py (stdlib).
"""

import json
import os
import shutil
import sys
import time

from common import cpu_seconds  # bench/common.py: stdlib only, importable from this venv

T_SCRIPT = time.time()  # wall clock, so the parent can place it on its own timeline


def peak_mib(pid):
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0]) / 1024.0
    except OSError:
        pass
    return found


def sibling_pids():
    """The other ranks: processes with the same parent (prterun) as this one."""
    me, parent = os.getpid(), os.getppid()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent:
                pids.append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(pids)


t0 = time.perf_counter()
import casatasks  # noqa: E402  (servers never come back from this import)

t_import = time.perf_counter() - t0

from casampi.MPICommandClient import MPICommandClient  # noqa: E402
from casampi.MPIEnvironment import MPIEnvironment  # noqa: E402

casatasks.casalog.filterMsg(
    ["***** consolidateResults, subMS:", "Leap second table TAI_UTC seems out-of-date"]
)
casatasks.casalog.showconsole(False)


def main():
    spec = json.load(open(sys.argv[1]))
    result = {
        "t_script": T_SCRIPT,
        "import_s": t_import,
        "world_size": MPIEnvironment.mpi_world_size,
        "server_ranks": MPIEnvironment.mpi_server_rank_list(),
        "times": {},
        "errors": [],
    }
    client = MPICommandClient()
    client.set_log_mode("redirect")
    t0 = time.perf_counter()
    client.start_services()
    result["start_services_s"] = time.perf_counter() - t0
    servers = sibling_pids()
    result["memory_idle"] = {
        "client": peak_mib(os.getpid()),
        "servers": [peak_mib(p) for p in servers],
    }

    reset_task, reset_kwargs = spec["reset"]
    getattr(casatasks, reset_task)(**reset_kwargs)  # the first task call of the run
    # launch -> first result (bench/p5_cold.py makes that first call an rflag)
    result["t_first_result"] = time.time()
    for _ in range(spec["repeats"]):
        getattr(casatasks, reset_task)(**reset_kwargs)  # untimed
        for label, task, kwargs, cleanup in spec["steps"]:
            for path in cleanup:
                shutil.rmtree(path, ignore_errors=True)
            ranks = [os.getpid(), *servers]
            t0, c0, s0 = time.perf_counter(), cpu_seconds(ranks), cpu_seconds(servers)
            ret = getattr(casatasks, task)(**kwargs)
            elapsed = time.perf_counter() - t0
            result.setdefault("cpu", {}).setdefault(label, []).append(cpu_seconds(ranks) - c0)
            servers_cpu = cpu_seconds(servers) - s0  # (the rest: the client's)
            result.setdefault("cpu_servers", {}).setdefault(label, []).append(servers_cpu)
            if ret is False:
                result["errors"].append(f"{label} returned False")
            result["times"].setdefault(label, []).append(elapsed)
        for _label, _task, _kwargs, cleanup in spec["steps"]:
            for path in cleanup:
                shutil.rmtree(path, ignore_errors=True)

    result["memory_after"] = {
        "client": peak_mib(os.getpid()),
        "servers": [peak_mib(p) for p in servers],
    }
    result["t_tasks_done"] = time.time()
    with open(spec["result"], "w") as f:
        json.dump(result, f)
    # What atexit would do anyway; timed from the parent (until mpiexec exits).
    client.stop_services(force_command_request_interruption=False)


if MPIEnvironment.is_mpi_enabled and MPIEnvironment.is_mpi_client:
    main()
else:
    sys.exit("not the casampi client: run under mpiexec with casampi installed")
