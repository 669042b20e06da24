"""Four notebooks at once on one machine, two servers each: nothing shared.

Separate MPI worlds, controller ports, private folders and CASA log files; a
SEVERE message of one notebook's servers is relayed into that notebook only;
stopping one leaves the others working.
"""

from __future__ import annotations

import ast
import contextlib
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
from kernels import cluster_processes, execute, kernel_env, kernel_pid, running_kernel, wait_gone

N_KERNELS = 4


def _listening_ports(pids: list[int]) -> list[set[tuple[str, int]]]:
    """(address, port) each kernel's cluster listens on, from ONE snapshot of the machine
    (sampled one kernel after the other, a port closed by one process and then
    opened by another would look shared)."""
    owner: dict[int, int] = {}
    for index, pid in enumerate(pids):
        owner.update({proc.pid: index for proc in cluster_processes(pid)})
    ports: list[set[tuple[str, int]]] = [set() for _ in pids]
    for conn in psutil.net_connections("inet"):
        if conn.status == "LISTEN" and conn.pid in owner:
            ports[owner[conn.pid]].add((conn.laddr.ip, conn.laddr.port))
    return ports


def test_four_kernels_at_once(casa_log_dir):
    # Logs of a kernel gone for two months are pruned when a kernel starts;
    # last week's, and files that are not a kernel's, are kept.
    old = casa_log_dir / "casa-orion-kernel999999-rank0.log"
    recent = casa_log_dir / "casa-orion-kernel999998-rank0.log"
    users = casa_log_dir / "my-notes.log"
    for path, age_days in ((old, 60), (recent, 7), (users, 60)):
        path.write_text("x\n")
        stamp = time.time() - age_days * 86400
        os.utime(path, (stamp, stamp))
    with contextlib.ExitStack() as stack:
        # CASA loads on first use here: preloading it in 4 kernels and 8 servers at
        # once (~2 CPU-s each on 2 cores) once kept the 4th kernel from answering
        # its readiness check within 60 s; isolation, not preload, is tested.
        env = kernel_env(CASA_KERNEL_NPROCS="3", CASA_KERNEL_PRELOAD="0")
        kernels = [stack.enter_context(running_kernel(env)) for _ in range(N_KERNELS)]
        pids = [kernel_pid(km) for km, _ in kernels]
        assert not old.exists() and recent.exists() and users.exists()

        def world(kc):
            return execute(kc, "%%casa_parallel\n(rank, size, comm.allreduce(1))", timeout=300)

        with ThreadPoolExecutor(N_KERNELS) as pool:  # all four start and run together
            replies = list(pool.map(world, [kc for _, kc in kernels]))
        for reply in replies:
            assert reply.status == "ok", reply.error
            assert ast.literal_eval(reply.result) == [(0, 2, 2), (1, 2, 2)]

        ports = _listening_ports(pids)
        assert all(ports), ports
        for i in range(N_KERNELS):
            for j in range(i + 1, N_KERNELS):
                assert not ports[i] & ports[j], (i, j, ports[i] & ports[j])
        workdirs = [
            ast.literal_eval(execute(kc, "casa_cluster.cluster.janitor.workdir").result)
            for _, kc in kernels
        ]
        assert len(set(workdirs)) == N_KERNELS

        # A SEVERE on the servers of notebook 0 reaches notebook 0 only.
        post = "%%casa_parallel\nfrom casatasks import casalog\ncasalog.post({!r}, 'SEVERE')"
        reply = execute(kernels[0][1], post.format("trouble in notebook 0"))
        assert reply.status == "ok", reply.error
        assert reply.stderr.count("trouble in notebook 0") == 2  # both servers
        for _, kc in kernels[1:]:
            reply = execute(kc, post.format("note"))
            assert reply.status == "ok", reply.error
            assert "trouble in notebook 0" not in reply.stderr
            assert "note" in reply.stderr

        host = socket.gethostname().split(".")[0]
        for pid in pids:
            for rank in (0, 1):
                assert (casa_log_dir / f"casa-{host}-kernel{pid}-rank{rank}.log").is_file()

        # Stop notebook 0 (its kernel too): the others keep working.
        km0, kc0 = kernels[0]
        assert execute(kc0, "%casa_cluster stop").status == "ok"
        kc0.stop_channels()
        km0.shutdown_kernel(now=False)
        assert wait_gone(pids[0], 30) == []
        for _, kc in kernels[1:]:
            reply = execute(kc, "%%casa_parallel\nimport os\n(rank, os.getpid())")
            assert reply.status == "ok", reply.error
            assert [r for r, _ in ast.literal_eval(reply.result)] == [0, 1]
        deadline = time.monotonic() + 15
        while os.path.exists(workdirs[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(workdirs[0])
        assert all(os.path.isdir(w) for w in workdirs[1:])
