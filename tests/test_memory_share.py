"""Issue 20: each server plans CASA's work for its share of its host's memory,
and a server the out-of-memory killer takes is said as such.

Real kernels, real servers; the OOM test runs the kernel and its servers in a
memory cgroup of their own (cgroup v1 or v2, root only) with a small limit.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpec
from kernels import cluster_processes, execute, kernel_env, kernel_pid, running_kernel

from casa_kernel.server import memory

# What CASA's casacore says it may use, in bytes (hostinfo is in KiB).
AVAILABLE = (
    "%%casa_parallel\nimport casatools\ncasatools.ctsys.hostinfo()['memory']['available'] * 1024"
)


def _values(reply) -> list:
    assert reply.status == "ok", reply.error
    return ast.literal_eval(reply.result)


def test_each_server_plans_for_its_share_of_the_host(tmp_path):
    share = memory.memory_limit() // 3  # two servers and CASA's cube client on this host
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3"), cwd=str(tmp_path)) as (km, kc):
        seen = _values(execute(kc, AVAILABLE, timeout=240))
        # casarc says MiB: the share rounded down to a MiB
        assert seen == [share // 2**20 * 2**20] * 2, (seen, share)
        status = execute(kc, "%casa_cluster status")
        assert status.status == "ok", status.error
        gib = f"of {share / 2**30:.1f} GiB"
        assert status.result.count(gib) == 3, status.result  # the cube client's too
        # and the kernel itself (not a server) still plans for the whole host
        own = execute(kc, "import casatools\ncasatools.ctsys.hostinfo()['memory']['available']")
        assert int(own.result) * 1024 > share


def test_the_setting_gives_the_share_and_a_bad_one_is_said(tmp_path):
    env = kernel_env(CASA_KERNEL_NPROCS="3", CASA_KERNEL_SERVER_MEMORY="64MiB")
    with running_kernel(env, cwd=str(tmp_path)) as (km, kc):
        assert _values(execute(kc, AVAILABLE, timeout=240)) == [64 * 2**20] * 2
    env = kernel_env(CASA_KERNEL_NPROCS="3", CASA_KERNEL_SERVER_MEMORY="lots")
    with running_kernel(env, cwd=str(tmp_path)) as (km, kc):
        reply = execute(kc, AVAILABLE, timeout=240)
        assert "CASA_KERNEL_SERVER_MEMORY: not a size: 'lots'" in reply.stderr, reply.stderr
        share = memory.memory_limit() // 3
        assert _values(reply) == [share // 2**20 * 2**20] * 2  # the default share


def test_a_cube_on_a_small_share_is_cut_in_more_subcubes_and_equals_serial(tmp_path, casa_log_dir):
    """CASA sizes a cube's subcubes from the memory it is told it has: with 8 MiB a
    server's CASA cuts the cube finer than with the whole host; the images are
    still serial's, bit for bit."""
    import numpy as np
    from casatasks import tclean
    from casatools import image

    from casa_kernel.casa.simulate import simulate_ms

    simulate_ms(tmp_path / "obs.ms", nant=6, nchan=16, nint=20, nscans=1)
    params = dict(vis="obs.ms", imsize=128, cell="8arcsec", specmode="cube", niter=30)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        tclean(imagename="serial", **params)
    finally:
        os.chdir(cwd)
    args = ", ".join(f"{k}={v!r}" for k, v in params.items())
    env = kernel_env(CASA_KERNEL_NPROCS="3", CASA_KERNEL_SERVER_MEMORY="8MiB")
    with running_kernel(env, cwd=str(tmp_path)) as (km, kc):
        reply = execute(kc, f"tclean(imagename='shared', {args})", timeout=600)
        assert reply.status == "ok", reply.error
        assert "CASA's cube client (world rank 0 on" in reply.stderr
        client_log = next(casa_log_dir.glob(f"casa-*-kernel{kernel_pid(km)}-cubeclient.log"))
    told = [
        line
        for line in client_log.read_text(errors="replace").splitlines()
        if "nSubCubeFitInMemory" in line
    ]
    assert told and all("memory: 0.0078125)" in line for line in told), told[:2]
    subcubes = [int(line.split("Subcubes: ")[1].split(".")[0]) for line in told]
    assert max(subcubes) > 2, told  # the whole host: 1 or 2 (one per worker)
    for ext in (".image", ".residual", ".psf", ".pb", ".sumwt", ".model"):
        pixels = []
        for name in ("serial", "shared"):
            ia = image()
            ia.open(str(tmp_path / (name + ext)))
            pixels.append(ia.getchunk())
            ia.close()
        assert np.array_equal(*pixels), ext


# -- the out-of-memory killer ---------------------------------------------------------


def _memory_cgroup(limit: int) -> Path:
    """A memory cgroup below this process's, limited to ``limit`` bytes."""
    if os.geteuid() != 0:
        pytest.skip("making a memory cgroup needs root")
    parent = memory.cgroup_dir()
    if not parent:
        pytest.skip("no memory cgroup to make one under")
    folder = Path(parent) / f"casa-kernel-test-{os.getpid()}"
    folder.mkdir()
    if (folder / "memory.max").exists():  # v2 (the parent must delegate memory)
        (folder / "memory.max").write_text(str(limit))
        (folder / "memory.swap.max").write_text("0")
    else:  # v1
        (folder / "memory.limit_in_bytes").write_text(str(limit))
    return folder


def _remove_cgroup(folder: Path) -> None:
    deadline = time.monotonic() + 30
    while (folder / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.2)
    folder.rmdir()


# Rank 1 takes the memory in both tests. The killer may take a second process
# before the first one's memory is freed, and mpiexec names only the death it saw
# first: then the kernel says how many it took.
OOM_SAID = re.compile(
    r"server rank 1 on \S+ was killed by the out-of-memory killer"
    r"|\d+ of the servers' processes were killed by the out-of-memory killer, "
    r"(server rank \d|CASA's cube client) the first mpiexec saw"
)


@contextlib.contextmanager
def _kernel_in_cgroup(tmp_path: Path, limit: int) -> Iterator[tuple[KernelManager, object]]:
    """A real kernel (2 servers, CASA not preloaded) and everything it starts in a
    memory cgroup of ``limit`` bytes; killed and the cgroup removed after."""
    folder = _memory_cgroup(limit)
    km = KernelManager(kernel_name="")
    km._kernel_spec = KernelSpec(
        argv=[
            "sh",
            "-c",
            f'echo $$ > {folder}/cgroup.procs && exec "{sys.executable}" -m casa_kernel -f "$0"',
            "{connection_file}",
        ],
        display_name="CASA (small cgroup)",
        language="python",
        interrupt_mode="signal",
    )
    env = kernel_env(CASA_KERNEL_NPROCS="3", CASA_KERNEL_PRELOAD="0")
    km.start_kernel(env=env, cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        yield km, kc
    finally:
        kc.stop_channels()
        pid = kernel_pid(km) if km.has_kernel else None
        km.shutdown_kernel(now=False)
        if pid is not None:
            for proc in cluster_processes(pid):
                proc.kill()
        _remove_cgroup(folder)


def test_a_server_killed_by_the_oom_killer_is_said_and_replaced(tmp_path):
    """Kernel and servers in a 700 MB cgroup (CASA not preloaded: ~350 MB in all);
    a cell that makes rank 1 take 900 MB. The OOM killer takes the server (servers
    ask to be its first choice), never the kernel; the cell says why, the next
    cell runs on new servers."""
    with _kernel_in_cgroup(tmp_path, 700 * 2**20) as (km, kc):
        pids = _values(execute(kc, "%%casa_parallel\nimport os\nos.getpid()", timeout=180))
        grab = "%%casa_parallel\nif rank == 1:\n    big = b'x' * (900 * 2**20)\nrank"
        reply = execute(kc, grab, timeout=240)
        assert reply.status == "error", reply.result
        assert OOM_SAID.search(reply.evalue), reply.evalue
        # how full its memory cgroup was (this test's 700 MB group): the peak and limit
        assert re.search(r"held up to \d+ MiB of its 700 MiB limit", reply.evalue), reply.evalue
        assert "Use fewer servers per host" in reply.evalue
        assert "re-ran" not in reply.stderr  # the same work would need the same memory
        assert km.is_alive()  # the OOM killer took a server, not the kernel
        again = _values(execute(kc, "%%casa_parallel\nimport os\nos.getpid()", timeout=180))
        assert len(again) == 2 and not set(again) & set(pids)


# A thread on server rank 1 (one of a cube's two workers) that takes more memory
# than the whole cgroup has once the cube's psf image exists: the OOM killer then
# takes that worker in the middle of CASA's cube imaging.
GRAB_DURING_CUBE = """%%casa_parallel
import os, threading, time
def _grab():
    while not os.path.exists("oomcube.psf"):
        time.sleep(0.05)
    global _big
    _big = b"x" * (2000 * 2**20)
if rank == 1:
    threading.Thread(target=_grab, daemon=True).start()
rank
"""


def test_a_cube_worker_killed_by_the_oom_killer_ends_the_call_with_no_half_image(tmp_path):
    """Issue 20: a server the OOM killer takes while it images a cube ends the call
    with an error that says so (rank, host, its cgroup's memory, its share, what to
    do), is not re-run, and leaves none of the cube's images; new servers next."""
    from casa_kernel.casa.simulate import simulate_ms

    simulate_ms(tmp_path / "obs.ms", nant=8, nchan=8, nint=40, nscans=2)
    with _kernel_in_cgroup(tmp_path, 1500 * 2**20) as (km, kc):
        assert _values(execute(kc, GRAB_DURING_CUBE, timeout=180)) == [0, 1]
        cube = (
            "tclean(vis='obs.ms', imagename='oomcube', specmode='cube', spw='0', imsize=128, "
            "cell='8arcsec', niter=400, cycleniter=20, threshold='0mJy')"
        )
        reply = execute(kc, cube, timeout=300)
        assert reply.status == "error", reply.stdout[-2000:]
        said = reply.evalue + reply.stderr
        assert OOM_SAID.search(said), said[-3000:]
        assert re.search(r"CASA planned for [\d.]+ GiB on it", said), said[-3000:]
        assert re.search(r"held up to \d+ MiB of its 1500 MiB limit", said), said[-3000:]
        assert "Use fewer servers per host" in said
        assert "re-ran" not in reply.stderr
        assert not list(tmp_path.glob("oomcube*")), sorted(os.listdir(tmp_path))
        assert km.is_alive()
        again = _values(execute(kc, "%%casa_parallel\nrank", timeout=180))
        assert again == [0, 1]


def test_memory_settings_parse():
    assert memory.parse_size("8GiB") == 8 * 2**30
    assert memory.parse_size("500MB") == 500 * 10**6
    assert memory.parse_size("1.5g") == int(1.5 * 2**30)
    assert memory.parse_size("0") == 0
    for bad in ("lots", "-1G", "5 parsecs", ""):
        with pytest.raises(ValueError, match="not a size"):
            memory.parse_size(bad)
