"""casampi's MPIInterface for tclean's continuum imager, and the routes of the
notebook's imaging tasks (tclean, deconvolve, sdintimaging).

A parallel continuum call grids on every server (string commands through
MPICommandClient, minor cycle in the kernel); a cube goes to CASA's C++
parallelism on the servers (casampi/cube.py, server/cube.py), or runs serially in the kernel
below MIN_CUBE_WORKERS; any other call runs serially on server rank 0, so that
the kernel writes no image (a full disk aborts the process that writes one).
casatasks' private names are in casa/private.py, the fence.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from casa_kernel.casa.outputs import image_products, remove_paths
from casa_kernel.casa.private import (
    CPP_MPI_COMMAND,
    IMAGER_STEPS,
    MAJOR_CYCLE_STEP,
    answer_polls_at_once,
    imager_step,
)
from casa_kernel.casa.tasks import forget_failures
from casa_kernel.casampi import bridge
from casa_kernel.casampi.bridge import (
    PUSH,
    _active,
    _cluster,
    _server_ranks,
    raise_failures,
    value_of,
    values_by_server,
)
from casa_kernel.casampi.cube import (
    goes_cpp_parallel,
    labels,
    run_cpp_parallel,
    server_pids,
    share_cores,
)
from casa_kernel.casampi.tasks import MPICommandClient, _serially, run_serially_on_a_server
from casa_kernel.client import progress
from casa_kernel.client.interrupts import say
from casa_kernel.errors import ClusterError

# CASA's C++ cube parallelism with ONE worker (2 servers: client + 1) was slower
# than serial and gave an edge channel serial leaves blank (sumwt 132 vs 0,
# bench/imaging.py); with 2 workers it was bit-equal, like mpicasa's. Below
# this many workers, cubes run serially in the kernel. Every server is a worker
# when the cluster has CASA's cube client (casa/role.py: 2 servers or more),
# else server rank 0 is the client (servers from the batch queue).
MIN_CUBE_WORKERS = 2
# Server pids that ran a parallel continuum call with niter > 0. Measured (bench
# MS, 3 servers): a later cube on them puts data in an LSRK edge channel that
# serial leaves blank (sumwt 132 vs 0); fresh servers, and mpicasa (whose cube
# client never grids), stay serial-equal. Ruled out (each tried, cube still 132
# or still 0 as stated): the MS (fresh servers after it: 0), casacore's table
# cache (empty on every server), the servers' `toolsi` (deleted: 132), a serial
# mfs niter=50 tclean on rank 0 or on every server (0), LSRK conversions through `me` at other
# epochs on every server (0), a continuum call with niter=0 (0). It is the cube
# CLIENT having gridded: with CASA's cube client as a rank of its own (never
# gridding, as mpicasa's) the same sequence gives sumwt 0, all 24 channels equal
# to serial (bench MS, 2 servers). So only where server rank 0 is the client (no
# cube client: servers from the batch queue) does a cube on such servers get
# fresh ones first (_fresh_servers_for_cube).
_gridded_continuum: frozenset[int] = frozenset()


# -- casampi.MPIInterface -------------------------------------------------------


class _InterfaceCore:
    """casampi's MPIInterfaceCore (``MPIInterface.getCluster()._cluster``)."""

    def __init__(self) -> None:
        self.client = MPICommandClient()

    def start_cluster(self, cl_file: Any = None) -> None:
        self.client.start_services()

    def stop_cluster(self) -> None:
        pass

    def get_engines(self) -> list[int]:
        return _server_ranks()

    def get_nodes(self) -> list[str]:
        return sorted({info.host for info in _cluster().servers.values()})

    def pgc(self, commands: Any, block: bool = True) -> Any:
        _note_stage(str(commands))
        if isinstance(commands, dict):
            ids = [
                self.client.push_command_request(cmd, False, server)[0]
                for server, cmd in commands.items()
            ]
            return self.client.get_command_response(ids, block, True)
        if CPP_MPI_COMMAND in str(commands):
            # task_tclean/deconvolve/sdintimaging put servers in C++ MPI mode to
            # serve a C++ client in their world; the kernel is not in it.
            raise ClusterError(
                "CASA's cube imaging needs its client inside the servers' MPI world: "
                "call the notebook's tclean/deconvolve/sdintimaging (casa-kernel runs the "
                "cube on the servers), not casatasks' own function"
            )
        return self.client.push_command_request(commands, block, _server_ranks())

    def odo(self, job: str, nodes: Any) -> list[int]:
        if nodes in (None, _first_server()):  # one step is sent to each server in turn
            _note_stage(job)
        return self.client.push_command_request(job, False, nodes)

    def execute(self, job: str, nodes: Any) -> list[dict[str, Any]]:
        return self.client.push_command_request(job, True, nodes)

    def push(self, variables: dict[str, Any], targets: Any = None) -> Any:
        servers = _server_ranks() if targets in (None, "all") else list(targets)
        return self.client.push_command_request(PUSH, True, servers, dict(variables))

    def pull(self, varname: str = "", targets: Any = None) -> dict[int, Any]:
        if targets is None:
            responses = self.pgc(varname)
        else:
            responses = self.execute(varname, targets)
        raise_failures(responses)
        return values_by_server(responses)

    def check_job(self, jobId: Any, verbose: bool = True) -> bool:
        ids = list(jobId) if isinstance(jobId, (list, tuple)) else [jobId]
        raise_failures(self.client.get_command_response(ids, False, verbose))
        return True

    def set_log_level(self, *args: Any) -> None:
        pass


class MPIInterface:
    """casampi.MPIInterface as parallel_imager_helper uses it."""

    _core: _InterfaceCore | None = None

    def __init__(self) -> None:
        if not _active():
            raise ClusterError(
                "tclean(parallel=True) needs the servers: start them with "
                "%casa_cluster start, or call tclean with parallel=False"
            )
        if MPIInterface._core is None:
            MPIInterface._core = _InterfaceCore()

    @property
    def _cluster(self) -> _InterfaceCore:
        # casampi's name for the core; parallel_imager_helper reads it
        assert MPIInterface._core is not None
        return MPIInterface._core

    @staticmethod
    def set_log_mode(logmode: str) -> None:
        pass

    @staticmethod
    def getCluster() -> MPIInterface:
        cluster = MPIInterface()
        cluster.start_cluster()
        return cluster

    def isClusterRunning(self) -> bool:
        return _active()

    def init_cluster(self, clusterfile: Any = None, project: Any = None) -> None:
        pass

    def start_cluster(self) -> None:
        self._cluster.start_cluster()

    def stop_cluster(self) -> None:
        pass

    def do_and_record(self, cmd: str, id: Any = None, group: str = "", subMS: str = "") -> Any:
        return self._cluster.odo(cmd, id)

    def get_engine_store(self, id: int) -> str:
        responses = self._cluster.execute("os.getcwd()", id)
        raise_failures(responses)
        return value_of(responses[0])

    def set_log_level(self, log_level: str) -> None:
        pass


# -- the notebook's imaging tasks ---------------------------------------------


def _bound(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name (the notebook may pass ``vis`` positionally)."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(task).bind_partial(*args, **kwargs)
    return dict(bound.arguments)


def route_imaging(name: str) -> Any:
    """The route (casa/tasks.py) of the notebook's imaging task ``name``."""

    def route(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        params = _bound(task, args, kwargs)
        bridge.tell_release()
        if not _active():
            if bridge.serial_reason is not None:
                if params.get("parallel"):
                    say(f"{name}: parallel=True runs serially (see the casatasks release notice)")
                    params["parallel"] = False
            elif name == "tclean" and params.get("parallel"):
                print(
                    "casa-kernel: no servers are running: tclean(parallel=True) runs "
                    "serially (start servers with %casa_cluster start)",
                    file=sys.stderr,
                )
                params["parallel"] = False
            return task(**params)
        if goes_cpp_parallel(name, params):
            config = _cluster().config
            workers = config.nservers - (0 if config.cube_client else 1)
            if workers >= MIN_CUBE_WORKERS:
                if not config.cube_client and server_pids() & _gridded_continuum:
                    _fresh_servers_for_cube(name)
                return run_cpp_parallel(name, params)
            # Not on a server: there casacore's cube imager sees an MPI world
            # and waits in makepsf for ranks that never join (measured: a hang).
            say(
                f"{name}: runs serially in the kernel: CASA's C++ cube parallelism needs "
                f"{MIN_CUBE_WORKERS} workers, there are {max(workers, 0)} "
                f"({config.nservers} servers)"
            )
            with _serially():
                return task(**params)
        if name == "tclean" and params.get("parallel"):
            return _continuum(task, params)
        return run_serially_on_a_server(name, params, made=[])

    return route


def _fresh_servers_for_cube(name: str) -> None:
    """Replace servers that gridded a parallel continuum image before a cube.

    On them CASA's cube puts data in an LSRK edge channel serial leaves blank
    (see ``_gridded_continuum``); on fresh servers it is serial's, bit for bit.
    A few seconds of start-up against a wrong cube: correctness first.
    """
    global _gridded_continuum
    cluster = _cluster()
    say(
        f"{name}: starting fresh servers first: these gridded a parallel continuum "
        "image, after which CASA's cube differs from serial in an edge channel"
    )
    cluster.replace("fresh servers for a cube after a parallel continuum image")
    cluster.wait_ready(cluster.config.start_timeout)
    _gridded_continuum = frozenset()


# How many times one parallel continuum call is run again after its servers died.
CONTINUUM_RERUNS = 2


def _continuum(task: Any, params: dict[str, Any]) -> Any:
    """tclean(parallel=True): CASA's parallel continuum imager, the servers gridding.

    A server that dies ends the MPI world, and with it every server's imager
    (``toolsi``: its data selection, partial grids, weights), which lives only
    in the servers' namespaces; the dispatcher's new servers have none, so no
    single command can be run again. The whole call is: CASA's products that
    this call made are removed and tclean starts over on the new servers, as
    if the first attempt had not happened (products that existed before the
    call, a restart's, are kept). Any attempt whose servers changed under it
    is run again, even one that returned: its grids may come from two worlds.
    """
    title = f"tclean on {imagename!r}" if (imagename := params.get("imagename")) else "tclean"
    with progress.operation(f"{title} (parallel continuum)", _work) as op:
        value = _continuum_attempts(task, params)
        op.stage = f"{op.cycles} major cycle{'s' if op.cycles != 1 else ''}"
        return value


def _continuum_attempts(task: Any, params: dict[str, Any]) -> Any:
    global _gridded_continuum
    answer_polls_at_once()
    imagename = params.get("imagename")
    keep = image_products(imagename) if isinstance(imagename, str) and imagename else set()
    for attempt in range(CONTINUUM_RERUNS + 1):
        op = progress.current_operation()
        if op is not None:
            op.cycles = 0
        share_cores()
        before = server_pids()
        if (params.get("niter") or 0) > 0:  # measured: niter=0 leaves later cubes serial-equal
            _gridded_continuum = before
        say(
            f"tclean: gridding on {labels(range(_cluster().config.nservers))}; "
            "minor cycle in the kernel"
        )
        try:
            value = task(**params)
        except Exception:
            if _servers_alive(before) or attempt == CONTINUUM_RERUNS:
                raise
        else:
            if _servers_alive(before):
                return value
            if attempt == CONTINUUM_RERUNS:
                raise ClusterError(
                    f"tclean(parallel=True) lost its servers {CONTINUUM_RERUNS + 1} times: "
                    f"{_cluster().last_cause or 'a server died'}"
                )
        cause = _cluster().last_cause or "a server died"
        if isinstance(imagename, str) and imagename:
            remove_paths(sorted(image_products(imagename) - keep))
        forget_failures()
        _reset_iteration_control()
        say(f"{cause}: the servers' imagers were lost; re-ran tclean from the start")
    raise AssertionError("unreachable")  # the loop returns or raises


def _servers_alive(pids: frozenset[int]) -> bool:
    """Are these the servers still, all of them alive (none replaced, none dead)?"""
    from casa_kernel.client.progress import wait_ready

    wait_ready(_cluster())  # replaces servers found dead (a kill between two commands)
    return server_pids() == pids


def _reset_iteration_control() -> None:
    """Zero CASA's iteration counters left by the lost attempt.

    casatools' iterbotsink shares one state per process; a tclean that raises
    skips the step that zeroes it, so the next call's ``interactiveiterdone``
    would include the lost attempt's iterations (serial CASA does the same
    after a failed call: measured 411 instead of 400).
    """
    from casatools import iterbotsink

    bot = iterbotsink()
    try:
        bot.resetminorcycleinfo()
    finally:
        bot.done()


def _first_server() -> int | None:
    ranks = _server_ranks()
    return ranks[0] if ranks else None


def _note_stage(command: str) -> None:
    """A command to the servers' imagers starts a step: show it (major cycle N)."""
    op = progress.current_operation()
    step = imager_step(command)
    if op is None or step not in IMAGER_STEPS:
        return
    if step == MAJOR_CYCLE_STEP:
        op.cycles += 1
        op.set_stage(f"major cycle {op.cycles}")
    else:
        op.set_stage(IMAGER_STEPS[step])


def _work(label: str) -> str:
    """A server's current job in the display: the step, not the command text."""
    op = progress.current_operation()
    step = imager_step(label)
    if not step:
        return label[:40]
    if step == MAJOR_CYCLE_STEP and op is not None:
        return f"major cycle {op.cycles}: gridding its data partition"
    return IMAGER_STEPS.get(step, step)
