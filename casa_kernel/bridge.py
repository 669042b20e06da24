"""Serve casatasks' parallel layer from the ipyparallel servers: the ONE fence
around casatasks' private surface.

casatasks reaches MPI servers through ``casampi``, which it imports inside
``try`` blocks of private modules. We serve the part of casampi it uses, IN THE
KERNEL PROCESS ONLY, through ``sys.modules`` (``install``), so CASA's own job
generation, output assembly, result consolidation and parallel imagers run
unchanged, and the servers run the pieces:

- ``MPIEnvironment`` / ``MPICommandClient``: ParallelTaskHelper and
  ParallelDataHelper (one job per sub-MS of a Multi-MS).
- ``MPIInterface``: tclean's continuum imager (``specmode='mfs'``,
  ``parallel=True``): string commands (``toolsi.makepsf()``...) run in the
  servers' namespace, every server gridding its share of the data.
- Cubes (tclean ``cube``/``cubedata``/``cubesource``; deconvolve and
  sdintimaging where CASA parallelises them): CASA's C++ channel parallelism
  needs its client inside the servers' MPI world, which the kernel is not. So
  the call runs on server rank 0 as that client (casampi stand-in patched into
  the task's module there) while the other servers serve it from
  ``synthesisimager().initmpi()``; the images are CASA's own, equal to serial.
  Below ``MIN_CUBE_SERVERS`` (one worker only) cubes run serially in the kernel.

Why not a real ``casampi``: with it installed, ``import casatasks`` under
mpiexec turns every rank > 0 into a casampi server and never returns.

Everything private we depend on is named in this module: the module names and
their ``mpi_available`` flags, the casampi attributes (tests/test_imaging.py scans
casatasks' source and fails when one it uses is not served here), the command
forms (``'<task>()'`` with parameters, ``'push'``, Python strings) and response
fields (``successful``, ``ret``, ``traceback``, ``parameters``, ``command``,
``server``), and the one-second poll in ``parallel_imager_helper.checkJobs``.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import importlib.metadata
import inspect
import itertools
import os
import shutil
import sys
import types
import uuid
from typing import Any

from casa_kernel import display, engine, progress
from casa_kernel.casa import rerun, tasks
from casa_kernel.dispatch import Dispatcher, Job, Outcome
from casa_kernel.errors import CasaKernelError, ClusterError, RemoteError

# The casatasks releases whose private surface this module was read from and
# tested against (pyproject pins the same).
SUPPORTED_CASATASKS = ("6.7.0.31",)


class UnsupportedCasaError(CasaKernelError, ImportError):
    """casatasks is a release whose private parallel layer we have not read."""


def _check_version() -> str:
    # importlib.metadata, not casatasks.version_string(): importing casatasks
    # here would import its parallel helpers before install() serves casampi.
    try:
        version = importlib.metadata.version("casatasks")
    except importlib.metadata.PackageNotFoundError as exc:
        raise UnsupportedCasaError("casatasks is not installed") from exc
    if version not in SUPPORTED_CASATASKS:
        raise UnsupportedCasaError(
            f"casatasks {version} is installed; casa-kernel serves the private parallel "
            f"layer of casatasks {', '.join(SUPPORTED_CASATASKS)} only"
        )
    return version


CASATASKS_VERSION = _check_version()

# Private modules that decide at import whether casampi exists.
MPI_IMPORTERS = (
    "casatasks.private.parallel.parallel_task_helper",
    "casatasks.private.parallel.parallel_data_helper",
    "casatasks.private.imagerhelpers.parallel_imager_helper",
    "casatasks.private.task_tclean",
    "casatasks.private.task_deconvolve",
    "casatasks.private.task_sdintimaging",
)
_IMAGER_HELPER = "casatasks.private.imagerhelpers.parallel_imager_helper"
# Where CASA's C++ cube parallelism is switched on (cppparallel), and when.
CUBE_SPECMODES = ("cube", "cubedata", "cubesource")
CPP_PARALLEL_TASKS = {
    "tclean": "casatasks.private.task_tclean",
    "deconvolve": "casatasks.private.task_deconvolve",
    "sdintimaging": "casatasks.private.task_sdintimaging",
}

_session: Any = None  # the kernel's ClusterSession
_serial_call = False  # a call that must not see the servers (see _serially)
# CASA's C++ cube parallelism with ONE worker (2 servers: client + 1) was slower
# than serial and gave an edge channel serial leaves blank (sumwt 132 vs 0,
# bench/imaging.py); with 2 workers it was bit-equal, like mpicasa's. Below
# this many servers, cubes run serially in the kernel.
MIN_CUBE_SERVERS = 3
# Server pids that gridded a parallel continuum call. Measured (bench MS): a cube
# whose client (rank 0) gridded continuum before in the same process puts data
# in an LSRK edge channel that serial leaves blank (sumwt 132 vs 0); fresh
# servers, and mpicasa (whose cube client never grids), stay serial-equal.
# Cause not found; we say so and how to avoid it.
_gridded_continuum: frozenset[int] = frozenset()


# -- casampi numbering ---------------------------------------------------------
# casampi numbers servers 1..N (rank 0 is its client); ours are ranks 0..N-1 of
# the servers' own world. These two functions are the only place that converts.


def server_of(rank: int) -> int:
    return rank + 1


def rank_of(server: int) -> int:
    return server - 1


def _server_ranks() -> list[int]:
    cluster = _session.cluster if _session is not None else None
    if cluster is None:
        return []
    return [server_of(r) for r in range(cluster.config.nservers)]


def _cluster() -> Any:
    if _session is None:
        raise ClusterError("casa-kernel's bridge is not installed")
    return _session.require()


def _active() -> bool:
    return _session is not None and _session.active


# -- casampi.MPIEnvironment -----------------------------------------------------


class _EnvironmentMeta(type):
    @property
    def is_mpi_enabled(cls) -> bool:
        # Parallel exactly while a cluster is starting or running: one notebook,
        # both ways (no cluster: casatasks runs the same call serially).
        return _active() and not _serial_call

    @property
    def mpi_world_size(cls) -> int:
        return 1 + len(_server_ranks())


class MPIEnvironment(metaclass=_EnvironmentMeta):
    """casampi.MPIEnvironment as casatasks reads it: this process is the client."""

    is_mpi_client = True
    mpi_processor_rank = 0
    mpi_start_service_sleep_time = 0

    @staticmethod
    def mpi_server_rank_list() -> list[int]:
        return _server_ranks()

    @classmethod
    def is_mpi_disabled_or_client(cls) -> bool:
        return True


# -- casampi.MPICommandClient ---------------------------------------------------


class MPICommandClient:
    """casampi.MPICommandClient: push commands, get their responses.

    A singleton, like casampi's. Three command forms: ``'<task>()'`` with a
    parameters dict (ParallelTaskHelper: the task runs on a free server),
    ``'push'`` (bind the parameters in the targets' namespace) and any other
    Python string (the parallel imagers: eval, else exec, in the target's
    namespace).
    """

    _instance: MPICommandClient | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> MPICommandClient:
        if cls._instance is None:
            inst = super().__new__(cls)
            inst._ids = itertools.count(1)
            inst._requests = {}
            cls._instance = inst
        return cls._instance

    def start_services(self) -> None:
        progress.wait_ready(_cluster())

    def stop_services(self) -> None:
        pass  # the servers belong to the kernel's %casa_cluster, not to a task

    def set_log_mode(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_log_level(self, *args: Any, **kwargs: Any) -> None:
        pass

    def push_command_request(
        self,
        command: str,
        block: bool = False,
        target_server: Any = None,
        parameters: dict[str, Any] | None = None,
    ) -> Any:
        if isinstance(target_server, int):
            targets: list[int | None] = [target_server]
        elif target_server:
            targets = list(target_server)
        else:
            targets = [None]  # any free server
        taskname = command[:-2] if command.endswith("()") else ""
        if command == "push":
            func, args, label = engine.push_values, (dict(parameters or {}),), "push"
        elif taskname.isidentifier() and parameters is not None:
            params = dict(parameters)
            # One token per call, the same for its re-runs: the server keeps what
            # an exact re-run of an in-place task needs under it (casa/rerun.py).
            # The servers work in the kernel's folder: relative outputs land together.
            token = uuid.uuid4().hex
            func, args = engine.run_casa_task, (taskname, params, token, os.getcwd())
            label = str(params.get("vis", taskname))
        else:
            func, args, label = engine.run_command, (command,), command
        # one args tuple for all targets: Dispatcher sends that as one apply
        jobs = [Job(label, func, args, None if t is None else rank_of(t)) for t in targets]
        handles = Dispatcher(_cluster()).submit(jobs)
        ids = []
        for job, handle in zip(jobs, handles):
            request_id = next(self._ids)
            self._requests[request_id] = (job, handle, command, parameters)
            ids.append(request_id)
        if block:
            return self.get_command_response(ids, True, True)
        return ids

    def get_command_response_event(self, command_request_id_list: list[int]) -> Any:
        """Something whose ``wait()`` returns when these requests are done
        (ParallelTaskHelper's multithreading mode)."""
        results = [self._requests[i][1].ar for i in command_request_id_list]
        return types.SimpleNamespace(wait=lambda timeout=None: [r.wait(timeout) for r in results])

    def get_command_response(
        self, command_request_id_list: list[int], block: bool = True, verbose: bool = True
    ) -> list[dict[str, Any]]:
        """Responses of these requests, once all are done.

        Waits even when ``block`` is False: casatasks' callers poll until every
        job is done, and waiting on the results' events answers that poll at
        once instead of after its sleep.
        """
        requests = [self._requests.pop(i) for i in command_request_id_list]
        task_jobs = [r[0] for r in requests if r[0].func is engine.run_casa_task]
        tasknames = sorted({job.args[0] for job in task_jobs})
        dispatcher = Dispatcher(_cluster(), title=", ".join(tasknames) or "CASA")
        dispatcher.unit = "sub-MS" if task_jobs else "jobs"
        try:
            outcomes = dispatcher.collect([r[0] for r in requests], [r[1] for r in requests])
        finally:
            for job in task_jobs:
                rerun.forget(job.args[1].get("vis"), job.args[2])
        responses = []
        for request_id, (job, _handle, command, params), outcome in zip(
            command_request_id_list, requests, outcomes
        ):
            failure = outcome.failure
            if failure is not None:
                failure.submms = _where(job, outcome)
                tasks.record_failure(failure)
            responses.append(
                {
                    "id": request_id,
                    "command": command,
                    "parameters": params,
                    "successful": failure is None,
                    "ret": outcome.value,
                    "traceback": failure.traceback if failure else None,
                    "failure": failure,
                    "server": None if outcome.rank is None else server_of(outcome.rank),
                    "host": outcome.host,
                    "mode": "eval",
                }
            )
        return responses


def _where(job: Job, outcome: Outcome) -> str:
    """What part of the data a failed job had: a sub-MS, or an imager's partition."""
    if job.func is engine.run_command and outcome.rank is not None:
        n = len(_server_ranks())
        return f"data partition {server_of(outcome.rank)} of {n} ({job.label[:80]})"
    return job.label


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
        if isinstance(commands, dict):
            ids = [
                self.client.push_command_request(cmd, False, server)[0]
                for server, cmd in commands.items()
            ]
            return self.client.get_command_response(ids, block, True)
        if "initmpi" in str(commands):
            # task_tclean/deconvolve/sdintimaging put servers in C++ MPI mode to
            # serve a C++ client in their world; the kernel is not in it.
            raise ClusterError(
                "CASA's cube imaging needs its client inside the servers' MPI world: "
                "call the notebook's tclean/deconvolve/sdintimaging (casa-kernel runs the "
                "cube on the servers), not casatasks' own function"
            )
        return self.client.push_command_request(commands, block, _server_ranks())

    def odo(self, job: str, nodes: Any) -> list[int]:
        return self.client.push_command_request(job, False, nodes)

    def execute(self, job: str, nodes: Any) -> list[dict[str, Any]]:
        return self.client.push_command_request(job, True, nodes)

    def push(self, variables: dict[str, Any], targets: Any = None) -> Any:
        servers = _server_ranks() if targets in (None, "all") else list(targets)
        return self.client.push_command_request("push", True, servers, dict(variables))

    def pull(self, varname: str = "", targets: Any = None) -> dict[int, Any]:
        if targets is None:
            responses = self.pgc(varname)
        else:
            responses = self.execute(varname, targets)
        _raise_failures(responses)
        return {r["server"]: r["ret"] for r in responses}

    def check_job(self, jobId: Any, verbose: bool = True) -> bool:
        ids = list(jobId) if isinstance(jobId, (list, tuple)) else [jobId]
        _raise_failures(self.client.get_command_response(ids, False, verbose))
        return True

    def set_log_level(self, *args: Any) -> None:
        pass


def _raise_failures(responses: list[dict[str, Any]]) -> None:
    failures = [r["failure"] for r in responses if not r["successful"]]
    if failures:
        raise RemoteError(failures)


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
        _raise_failures(responses)
        return responses[0]["ret"]

    def set_log_level(self, log_level: str) -> None:
        pass


# -- the notebook's imaging tasks ---------------------------------------------


def _bound(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name (the notebook may pass ``vis`` positionally)."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(task).bind_partial(*args, **kwargs)
    return dict(bound.arguments)


def _products(imagename: str) -> set[str]:
    return set(glob.glob(glob.escape(imagename) + ".*"))


@contextlib.contextmanager
def _complete_or_absent(imagename: Any) -> Any:
    """On failure, remove the image products this call created: no half image
    that looks valid (products that existed before, a restart's, are kept)."""
    if not imagename or not isinstance(imagename, str):
        yield
        return
    before = _products(imagename)
    try:
        yield
    except BaseException:
        for path in sorted(_products(imagename) - before):
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.remove(path)
        raise


def _route_imaging(name: str) -> Any:
    def route(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        global _gridded_continuum
        params = _bound(task, args, kwargs)
        if not _active():
            if name == "tclean" and params.get("parallel"):
                print(
                    "casa-kernel: no servers are running: tclean(parallel=True) runs "
                    "serially (start servers with %casa_cluster start)",
                    file=sys.stderr,
                )
                params["parallel"] = False
            return task(**params)
        with _complete_or_absent(params.get("imagename")):
            if _goes_cpp_parallel(name, params):
                nservers = _cluster().config.nservers
                if nservers >= MIN_CUBE_SERVERS:
                    if _server_pids() & _gridded_continuum:
                        _say(
                            "note: these servers gridded a parallel continuum image; CASA's "
                            "cube may then differ from serial in an edge channel. For "
                            "serial-equal cubes run %casa_cluster restart first"
                        )
                    return run_cpp_parallel(name, params)
                _say(
                    f"{name}: runs serially in the kernel: CASA's C++ cube parallelism needs "
                    f"{MIN_CUBE_SERVERS} servers (a client and 2 workers), there are {nservers}"
                )
                with _serially():
                    return task(**params)
            if name == "tclean" and params.get("parallel"):
                _answer_polls_at_once()
                _share_cores()
                _gridded_continuum = _server_pids()
                _say(
                    f"{name}: gridding on {_labels(range(_cluster().config.nservers))}; "
                    "minor cycle in the kernel"
                )
            return task(**params)

    return route


@contextlib.contextmanager
def _serially() -> Any:
    """casatasks sees no MPI during this call (as in plain serial CASA)."""
    global _serial_call
    _serial_call = True
    try:
        yield
    finally:
        _serial_call = False


def _goes_cpp_parallel(name: str, params: dict[str, Any]) -> bool:
    """Would casatasks, under mpicasa, hand this call to its C++ MPI servers?"""
    if name == "tclean":
        return params.get("specmode", "mfs") in CUBE_SPECMODES
    # deconvolve (a cube image) and sdintimaging decide inside the task; they run
    # on rank 0 too, and release the other servers themselves or through us.
    return name in CPP_PARALLEL_TASKS


def _answer_polls_at_once() -> None:
    """parallel_imager_helper.checkJobs sleeps 1 s before every poll; our
    check_job waits on the jobs' events, so that sleep only adds 1 s per step."""
    helper = importlib.import_module(_IMAGER_HELPER)
    if not isinstance(helper.time, types.SimpleNamespace):
        import time

        helper.time = types.SimpleNamespace(sleep=lambda seconds: None, time=time.time)


def _server_pids() -> frozenset[int]:
    return frozenset(info.pid for info in _cluster().servers.values())


def _labels(ranks: Any) -> str:
    by_rank = {info.rank: info.host for info in _cluster().servers.values()}
    return ", ".join(display.server_label(r, by_rank.get(r)) for r in ranks)


def _say(text: str) -> None:
    """Which servers do what, as the call starts (the notebook's progress line)."""
    print(f"casa-kernel: {text}", file=sys.stderr, flush=True)


def _servers_per_host() -> dict[int, int]:
    """rank -> how many servers share its host."""
    servers = list(_cluster().servers.values())
    hosts = [info.host for info in servers]
    return {info.rank: hosts.count(info.host) for info in servers}


def _share_cores() -> None:
    """Give each server its share of its host's cores for CASA's OpenMP.

    CASA's gridders and deconvolvers start one OpenMP thread per core; with
    several servers on a host each would, and busy-waiting threads of one
    server then slow the others (on a 2-core box: 2 servers x 2 threads made a
    cube 4x slower than with 1 thread each).
    """
    shared = _servers_per_host()
    jobs = [Job(f"rank {r}", limit_threads, (n,), target=r) for r, n in shared.items()]
    failures = [o.failure for o in Dispatcher(_cluster()).execute(jobs) if o.failure]
    if failures:
        raise RemoteError(failures)


def limit_threads(servers_on_host: int) -> int:
    """On a server: OpenMP threads = this host's cores / servers on it."""
    from casa_kernel.casa.tasks import _casatasks

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // max(1, servers_on_host))
    _casatasks().casalog.ompSetNumThreads(threads)
    return threads


def run_cpp_parallel(name: str, params: dict[str, Any]) -> Any:
    """Run task ``name`` on server rank 0 as CASA's C++ parallel client, the
    other servers serving it; return its value. Servers work in our folder."""
    cluster = _cluster()
    cwd = os.getcwd()
    nservers = cluster.config.nservers
    _share_cores()
    _say(
        f"{name}: CASA's cube client on {_labels([0])}, channels gridded by "
        f"{_labels(range(1, nservers))}"
    )
    # A server that dies ends the MPI world and the dispatcher re-runs both jobs on
    # new servers: the client then first removes what the lost attempt wrote, so
    # the re-run is not taken for a restart.
    imagename = params.get("imagename")
    keep = sorted(_products(imagename)) if isinstance(imagename, str) and imagename else []
    client = Job(f"{name} (C++ parallel client)", cpp_client, (name, params, cwd, keep), target=0)
    worker_args = (cwd,)
    workers = [
        Job(f"{name} (C++ parallel server)", cpp_server, worker_args, target=r)
        for r in range(1, nservers)
    ]
    outcomes = Dispatcher(cluster).execute([client, *workers])
    failures = [o.failure for o in outcomes if o.failure is not None]
    if failures:
        for failure in failures:
            failure.submms = f"channels of {params.get('imagename') or params.get('vis')}"
        raise RemoteError(failures)
    return outcomes[0].value


# -- what runs on the servers for C++ cube parallelism ---------------------------

_START, _SKIP = "initmpi", "skip"


def cpp_server(cwd: str) -> None:
    """Serve rank 0's C++ imaging client until it releases us."""
    from mpi4py import MPI

    os.chdir(cwd)
    # rank 0 says whether the task went C++-parallel (casatasks decides inside)
    if MPI.COMM_WORLD.bcast(None, root=0) == _START:
        from casatools import synthesisimager

        si = synthesisimager()
        try:
            si.initmpi()  # returns when the client calls releasempi()
        finally:
            si.done()


def cpp_client(name: str, params: dict[str, Any], cwd: str, keep: list[str]) -> Any:
    """Run task ``name`` on this server (rank 0) as CASA's C++ MPI client.

    Image products other than ``keep`` (those that existed before the call) are
    left-overs of an attempt lost with its servers: removed first.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    started: list[bool] = []
    try:
        return _as_cpp_client(comm, started, name, params, cwd, keep)
    finally:
        # Whatever happened before the task asked for its servers (an interrupt
        # during the import, a bad argument), they wait in bcast: free them.
        if not started:
            comm.bcast(_SKIP, root=0)


def _as_cpp_client(
    comm: Any, started: list[bool], name: str, params: dict[str, Any], cwd: str, keep: list[str]
) -> Any:
    from casa_kernel.casa.tasks import _casatasks

    os.chdir(cwd)
    imagename = params.get("imagename")
    if isinstance(imagename, str) and imagename:
        for path in sorted(_products(imagename) - set(keep)):
            shutil.rmtree(path, ignore_errors=True)
    task = getattr(_casatasks(), name)
    module = importlib.import_module(CPP_PARALLEL_TASKS[name])

    class _Core:
        def pgc(self, command: str, block: bool = True) -> None:
            # The other servers make and start their own synthesisimager
            # (cpp_server); the import and constructor commands need nothing.
            if "initmpi" in command and not started:
                comm.bcast(_START, root=0)
                started.append(True)

    class _Interface:
        _cluster = _Core()

        @staticmethod
        def getCluster() -> Any:
            return _Interface

        def __init__(self) -> None:
            pass

    class _Environment:
        is_mpi_enabled = True
        is_mpi_client = True

    # The task releases its servers in a `finally` that starts only after its
    # imager is built: interrupted in between, it never does and they wait in
    # initmpi() for ever. Record its releasempi() to do it for it then.
    real_imager = module.synthesisimager
    released: list[bool] = []

    class _Released:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._tool = real_imager(*args, **kwargs)

        def __getattr__(self, attr: str) -> Any:
            return getattr(self._tool, attr)

        def releasempi(self) -> Any:
            released.append(True)
            return self._tool.releasempi()

    names = ("mpi_available", "MPIEnvironment", "MPIInterface", "synthesisimager")
    saved = {k: module.__dict__[k] for k in names if k in module.__dict__}
    module.mpi_available = True
    module.MPIEnvironment = _Environment
    module.MPIInterface = types.SimpleNamespace(MPIInterface=_Interface)
    module.synthesisimager = _Released
    try:
        return task(**params)
    finally:
        for key in names:
            module.__dict__.pop(key, None)
        module.__dict__.update(saved)
        if started and not released:
            real_imager().releasempi()


# -- installation -------------------------------------------------------------


def install(session: Any) -> None:
    """Make ``import casampi...`` in this process find our client surface, and
    route the notebook's imaging tasks.

    Must run before casatasks' parallel helpers are imported; refuses to run
    after, since they would already have decided there is no MPI.
    """
    global _session
    _session = session
    for name in MPI_IMPORTERS:
        helper = sys.modules.get(name)
        if helper is not None and not getattr(helper, "mpi_available", False):
            raise ClusterError(f"{name} was imported before casa-kernel's bridge was installed")
    package = types.ModuleType("casampi")
    package.__path__ = []  # a package, so `import casampi.X` looks in sys.modules
    package.__doc__ = "casa-kernel's stand-in for casampi's client API (kernel process only)"
    modules = {
        "MPIEnvironment": MPIEnvironment,
        "MPICommandClient": MPICommandClient,
        "MPIInterface": MPIInterface,
    }
    sys.modules["casampi"] = package
    for attr, cls in modules.items():
        module = types.ModuleType(f"casampi.{attr}")
        setattr(module, attr, cls)
        setattr(package, attr, module)
        sys.modules[f"casampi.{attr}"] = module
    for name in CPP_PARALLEL_TASKS:
        tasks.routes[name] = _route_imaging(name)
