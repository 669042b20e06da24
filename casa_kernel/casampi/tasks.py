"""casampi's MPIEnvironment and MPICommandClient, served from our servers.

casatasks' ParallelTaskHelper and ParallelDataHelper (one job per sub-MS of a
Multi-MS) and its parallel imagers push commands through these; the servers
run them (server/engine.py) through the Dispatcher. casatasks' private names are
in casa/private.py, the fence; casampi's command and response forms in bridge.py.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import types
import uuid
from typing import Any

from casa_kernel.casa import private, rerun, tasks
from casa_kernel.casa.outputs import CallOutputs, image_products
from casa_kernel.casampi import bridge
from casa_kernel.casampi.bridge import (
    PUSH,
    _active,
    _cluster,
    _server_ranks,
    rank_of,
    response,
    server_of,
    task_of,
)
from casa_kernel.client import progress
from casa_kernel.client.dispatch import Dispatcher, Job, Outcome
from casa_kernel.errors import SERIAL_OUTPUT, RemoteError, kernel_cwd
from casa_kernel.server import engine

_serial_call = False  # a call that must not see the servers (see _serially)

# -- casampi.MPIEnvironment -----------------------------------------------------


class _EnvironmentMeta(type):
    @property
    def is_mpi_enabled(cls) -> bool:
        # Parallel exactly while a cluster is starting or running: one notebook,
        # both ways (no cluster: casatasks runs the same call serially).
        bridge.tell_release()
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


@contextlib.contextmanager
def _serially() -> Any:
    """casatasks sees no MPI during this call (as in plain serial CASA)."""
    global _serial_call
    _serial_call = True
    try:
        yield
    finally:
        _serial_call = False


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
        taskname = task_of(command)
        if command == PUSH:
            func, args, label = engine.push_values, (dict(parameters or {}),), PUSH
        elif taskname.isidentifier() and parameters is not None:
            private.assemble_through(_assemble_on_a_server)  # before postExecution
            params = dict(parameters)
            # One token per call, the same for its re-runs: the server keeps what
            # an exact re-run of an in-place task needs under it (casa/rerun.py).
            # The servers work in the kernel's folder: relative outputs land together.
            token = uuid.uuid4().hex
            func, args = engine.run_casa_task, (taskname, params, token, kernel_cwd())
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
            server = None if outcome.rank is None else server_of(outcome.rank)
            responses.append(
                response(request_id, command, params, outcome.value, failure, server, outcome.host)
            )
        return responses


def _assemble_on_a_server(step: str, args: tuple[Any, ...]) -> Any:
    """A writing step of ParallelDataHelper's assembly of the output Multi-MS
    (casa/private.py's ASSEMBLY_STEPS), run on a server while the servers run.

    In the kernel, casacore on a full disk throws from a destructor and aborts
    the kernel; a server that aborts is replaced, and its last words ("No space
    left on device") make the task's error. Not run again after a death: the
    assembly moves the sub-MSs it is given.
    """
    if not _active():
        return private.run_assembly_step(step, args)
    first = args[0] if not isinstance(args[0], list) else args[0][0]
    label = f"{step} {first}"
    job = Job(label, engine.run_assembly_step, (step, args, kernel_cwd()), 0, rerun=False)
    dispatcher = Dispatcher(_cluster(), title=f"assembling {first}")
    [outcome] = dispatcher.execute([job])
    if outcome.failure is not None:
        outcome.failure.submms = f"assembling {first}"
        tasks.record_failure(outcome.failure)
        raise RemoteError([outcome.failure])
    return outcome.value


def _where(job: Job, outcome: Outcome) -> str:
    """What part of the data a failed job had: a sub-MS, or an imager's partition."""
    if job.func is engine.run_command and outcome.rank is not None:
        n = len(_server_ranks())
        return f"data partition {server_of(outcome.rank)} of {n} ({job.label[:80]})"
    return job.label


# -- calls that are not parallel but write ----------------------------------------


def run_serially_on_a_server(name: str, params: dict[str, Any], made: list[str]) -> Any:
    """Run task call ``name`` serially on server rank 0; return its value.

    While servers run, the kernel writes neither an image nor a new MS: casacore
    on a full disk aborts the process that writes (server/engine.py's
    serial_task). ``made``: the outputs this call may create that were not there
    before it (what a lost attempt left of them is removed before a re-run).
    """
    imagename = params.get("imagename")
    images = isinstance(imagename, str) and bool(imagename)
    keep = sorted(image_products(imagename)) if images else []
    job = Job(
        f"{name} (serial)", engine.serial_task, (name, params, kernel_cwd(), keep, made), target=0
    )
    [outcome] = Dispatcher(_cluster(), title=name).execute([job])
    if outcome.failure is not None:
        output = params.get("outputvis")
        part = f"{SERIAL_OUTPUT}{output}" if isinstance(output, str) and output else ""
        outcome.failure.submms = f"images {imagename}" if images else part
        tasks.record_failure(outcome.failure)
        raise RemoteError([outcome.failure])
    return outcome.value


def route_new_ms(name: str) -> Any:
    """The route (casa/tasks.py) of a call of ``name`` that writes a new MS
    (``outputvis``) and that no other route takes: on server rank 0 while servers
    run, unless casatasks' parallel helpers take it, with the kernel as their
    client and the writes on the servers (a Multi-MS in, or partition making one)."""

    def route(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        params = tasks.call_arguments(task, args, kwargs)
        if not _active() or _goes_parallel(name, params):
            return task(*args, **kwargs)
        return run_serially_on_a_server(name, params, CallOutputs.of(params).made)

    return route


def _goes_parallel(name: str, params: dict[str, Any]) -> bool:
    vis = params.get("vis")
    if isinstance(vis, str) and os.path.isdir(os.path.join(vis, "SUBMSS")):
        return True  # a Multi-MS: one job per sub-MS where the task has a helper
    return name == "partition" and bool(params.get("createmms", True))
