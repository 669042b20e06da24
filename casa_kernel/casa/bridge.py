"""Serve casatasks' parallel layer from the ipyparallel servers.

casatasks runs a task on a Multi-MS through ParallelTaskHelper /
ParallelDataHelper: one job per sub-MS, an output Multi-MS assembled from the
per-sub-MS outputs, results consolidated. To reach servers it imports
``casampi.MPIEnvironment`` and ``casampi.MPICommandClient`` and uses a small
surface of them. We serve that surface, IN THE KERNEL PROCESS ONLY, through
``sys.modules``: CASA's own job generation, output-MMS assembly and result
merging run unchanged (fidelity to CASA's results, every task CASA
parallelises), and the servers simply run one task on one sub-MS.

Why not a real ``casampi``: with it installed, ``import casatasks`` under
mpiexec turns every rank > 0 into a casampi server and never returns.

Depends on private names of casatasks 6.7.0.31 (pinned in pyproject.toml, tested
in tests/test_transparent.py): the module-level ``try: from casampi...`` in
``casatasks.private.parallel.parallel_task_helper`` and friends, the command
form ``'<task>()'`` with a parameters dict, and the response fields
``successful``, ``ret``, ``traceback``, ``parameters``, ``command``.
"""

from __future__ import annotations

import itertools
import os
import sys
import types
import uuid
from typing import Any

from casa_kernel import engine, progress
from casa_kernel.casa import rerun, tasks
from casa_kernel.dispatch import Dispatcher, Job
from casa_kernel.errors import ClusterError

_session: Any = None  # the kernel's ClusterSession


class _EnvironmentMeta(type):
    @property
    def is_mpi_enabled(cls) -> bool:
        # Parallel exactly while a cluster is starting or running: one notebook,
        # both ways (no cluster: casatasks runs the same call serially).
        return _session is not None and _session.active

    @property
    def mpi_world_size(cls) -> int:
        return 1 + len(_server_ranks())


def _server_ranks() -> list[int]:
    cluster = _session.cluster if _session is not None else None
    if cluster is None:
        return []
    # casampi numbers servers 1..N-1 (rank 0 is its client); ours are engines
    # 0..N-2 in their own world. casatasks only counts them.
    return [r + 1 for r in range(cluster.config.nservers)]


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


class MPICommandClient:
    """casampi.MPICommandClient: push task commands, get their responses.

    A singleton, like casampi's. Commands are ``'<task>()'`` with a parameters
    dict; they run on a free server through a load-balanced view.
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

    def set_log_mode(self, *args: Any, **kwargs: Any) -> None:
        pass

    def push_command_request(
        self,
        command: str,
        block: bool = False,
        target_server: Any = None,
        parameters: dict[str, Any] | None = None,
    ) -> Any:
        taskname = command[:-2] if command.endswith("()") else ""
        if not taskname.isidentifier():
            raise ClusterError(
                f"casa-kernel serves casatasks' task commands ('<task>()'), not {command!r}"
            )
        params = dict(parameters or {})
        target = None
        if isinstance(target_server, int):
            target = target_server - 1
        elif isinstance(target_server, list) and len(target_server) == 1:
            target = target_server[0] - 1
        # One token per call, the same for its re-runs: the server keeps what an
        # exact re-run of an in-place task needs under it (casa/rerun.py). The
        # servers work in the kernel's folder: relative outputs land together.
        token = uuid.uuid4().hex
        label = str(params.get("vis", taskname))
        job = Job(label, engine.run_casa_task, (taskname, params, token, os.getcwd()), target)
        dispatcher = Dispatcher(_cluster())
        (handle,) = dispatcher.submit([job])
        request_id = next(self._ids)
        self._requests[request_id] = (job, handle, command, params)
        if block:
            return self.get_command_response([request_id], True, True)
        return [request_id]

    def get_command_response(
        self, command_request_id_list: list[int], block: bool = True, verbose: bool = True
    ) -> list[dict[str, Any]]:
        requests = [self._requests.pop(i) for i in command_request_id_list]
        tasknames = sorted({r[2][:-2] for r in requests})
        dispatcher = Dispatcher(_cluster(), title=", ".join(tasknames) or "CASA task")
        dispatcher.unit = "sub-MS"
        try:
            outcomes = dispatcher.collect([r[0] for r in requests], [r[1] for r in requests])
        finally:
            for job, _handle, _command, params in requests:
                rerun.forget(params.get("vis"), job.args[2])
        responses = []
        for request_id, (_job, _handle, command, params), outcome in zip(
            command_request_id_list, requests, outcomes
        ):
            failure = outcome.failure
            if failure is not None:
                failure.submms = params.get("vis")
                tasks.record_failure(failure)
            responses.append(
                {
                    "id": request_id,
                    "command": command,
                    "parameters": params,
                    "successful": failure is None,
                    "ret": outcome.value,
                    "traceback": failure.traceback if failure else None,
                    "server": None if outcome.rank is None else outcome.rank + 1,
                    "host": outcome.host,
                    "mode": "eval",
                }
            )
        return responses


def _cluster() -> Any:
    if _session is None:
        raise ClusterError("casa-kernel's bridge is not installed")
    return _session.require()


def install(session: Any) -> None:
    """Make ``import casampi...`` in this process find our client surface.

    Must run before casatasks' parallel helpers are imported; refuses to run
    after, since they would already have decided there is no MPI.
    """
    global _session
    _session = session
    helper = sys.modules.get("casatasks.private.parallel.parallel_task_helper")
    if helper is not None and not getattr(helper, "mpi_available", False):
        raise ClusterError("casatasks was imported before casa-kernel's bridge was installed")
    package = types.ModuleType("casampi")
    package.__path__ = []  # a package, so `import casampi.X` looks in sys.modules
    package.__doc__ = "casa-kernel's stand-in for casampi's client API (kernel process only)"
    env_module = types.ModuleType("casampi.MPIEnvironment")
    env_module.MPIEnvironment = MPIEnvironment
    client_module = types.ModuleType("casampi.MPICommandClient")
    client_module.MPICommandClient = MPICommandClient
    package.MPIEnvironment = env_module
    package.MPICommandClient = client_module
    sys.modules["casampi"] = package
    sys.modules["casampi.MPIEnvironment"] = env_module
    sys.modules["casampi.MPICommandClient"] = client_module
