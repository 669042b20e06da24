"""What runs on a server (an ipyparallel engine inside the mpiexec world).

These functions are shipped by reference (module + name), so the servers import
this module from the same installation: keep it light, import CASA lazily, and
return plain picklable values.
"""

from __future__ import annotations

import ast
import linecache
import os
import sys
import tempfile
import threading
from typing import Any

from casa_kernel import variables
from casa_kernel.casa.role import CUBE_CLIENT_RANK, has_cube_client
from casa_kernel.server import interrupts
from casa_kernel.server import memory as memory_share

_state: dict[str, Any] = {}


def _user_ns() -> dict[str, Any]:
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:  # plain process (tests): a module-level namespace
        return _state.setdefault("ns", {"__name__": "__main__"})
    return shell.user_ns


def setup_server(
    preload_casa: bool = False, casa_timeout: float | None = None
) -> tuple[int, str, int, int, str, int | None]:
    """Bind ``rank``, ``size``, ``comm`` and ``MPI`` in the server's namespace.

    With ``preload_casa`` a background thread starts importing CASA, as mpicasa's
    servers do at launch, so the first task does not pay ~4 s for it; cells run
    meanwhile (one that needs CASA waits on Python's import lock). Started here,
    after registration, not at process start: a thread importing casatools holds
    the GIL for long stretches and delayed a server's registration by ~5 s.
    ``casa_timeout`` (the cluster's start_timeout) bounds the wait for CASA's
    import: a server that cannot import it says why, naming itself, in the
    first task that needs it, never an endless wait (casa/loading.py).
    Before CASA can be imported, the server takes its share of its host's
    memory for CASA's planning (server/memory.py).
    Returns (rank, host, pid, memory share in bytes or 0, memory cgroup folder,
    the OOM killer's count there) so the client knows where each server runs and
    can tell an out-of-memory kill from another death.
    """
    from casa_kernel.casa import loading

    _dump_python_stacks_on_a_crash()
    interrupts.only_in_jobs()
    # Before anything can import casatasks here: with casampi installed beside
    # it, casatasks' import would make this rank a casampi server for good.
    loading.keep_casampi_out()
    if casa_timeout is not None:
        loading.limit = casa_timeout
    from mpi4py import MPI

    comm, rank = _servers_comm(MPI)
    host = MPI.Get_processor_name()
    ns = _user_ns()
    ns.update(MPI=MPI, comm=comm, rank=rank, size=comm.Get_size() if comm is not None else 0)
    from casa_kernel.casa.tasks import inject_tasks

    inject_tasks(ns)  # CASA's tasks, as in the kernel (imported on first use)
    log_dir = os.environ.get(variables.LOG_DIR)
    if log_dir and "log_tail" not in _state:
        from casa_kernel.casa.config import logfile_path
        from casa_kernel.casa.logs import LogTail

        # This server's CASA log (named by the site config: host, kernel, rank),
        # read from its current end: what CASA logs from now on is relayed.
        tag = os.environ.get(variables.LOG_TAG)
        _state["log_tail"] = LogTail(logfile_path(log_dir, rank=rank, tag=tag))
    _state.update(rank=rank, host=host)
    if "memory_share" not in _state:
        _state["memory_share"] = _take_memory_share(rank)
    # (the cube client imports CASA at its first cube: it stays light until then)
    if preload_casa and "preload" not in _state and rank != CUBE_CLIENT_RANK:
        # MPI is initialised by now (the engine's --mpi), so casatools finds the
        # wheel's libmpi.so.40 loaded and uses it rather than its own (5.0.1);
        # casa_kernel.casa.loading imports numpy first (a deadlock otherwise).
        _state["preload"] = threading.Thread(
            target=preload_casa_now, name="casa-preload", daemon=True
        )
        _state["preload"].start()
    cgroup = memory_share.cgroup_dir()
    oom = memory_share.oom_kills(cgroup) if cgroup else None
    return rank, host, os.getpid(), _state["memory_share"], cgroup, oom


def _dump_python_stacks_on_a_crash() -> None:
    """A server that segfaults (CASA's C++) writes its threads' Python stacks to
    fd 2, mpiexec's output: the death cause then says where (cluster/launcher.py's
    last_words), not only "signal 11"."""
    import faulthandler

    if not faulthandler.is_enabled() and sys.__stderr__ is not None:
        try:
            faulthandler.enable(file=sys.__stderr__, all_threads=True)
        except (OSError, ValueError, RuntimeError):  # no usable fd 2: nothing to say
            pass


def _servers_comm(MPI: Any) -> tuple[Any, int]:
    """(the servers' communicator, this server's rank in it): COMM_WORLD, or with a
    cube client at world rank 0 (casa/role.py) the world without it, so cells'
    collectives involve the servers only. The cube client: (None, CUBE_CLIENT_RANK)."""
    world = MPI.COMM_WORLD
    if not has_cube_client():
        return world, world.Get_rank()
    if world.Get_rank() == 0:
        return None, CUBE_CLIENT_RANK
    if "comm" not in _state:
        # collective over the servers only (MPI_Comm_create_group): the cube
        # client, idle in its engine, takes no part
        _state["comm"] = world.Create_group(world.Get_group().Excl([0]))
    comm = _state["comm"]
    return comm, comm.Get_rank()


def _take_memory_share(rank: int) -> int:
    """Tell CASA (not yet imported) this server's share of its host's memory."""
    memory_share.be_the_oom_killers_first_choice()
    if "casatools" in sys.modules:  # read once per process: too late to change
        return 0
    try:
        share = memory_share.share_for_this_server(os.environ.get(variables.SERVER_MEMORY, ""))
    except ValueError:  # the kernel says what is wrong with the setting in the first cell
        share = memory_share.share_for_this_server("")
    if share:
        # beside this server's CASA log (casa-<host>-<tag>-rank<R>.casarc): one per
        # server of each kernel, pruned with the logs
        log_dir = os.environ.get(variables.LOG_DIR) or tempfile.gettempdir()
        from casa_kernel.casa.config import logfile_path

        log = logfile_path(log_dir, rank=rank, tag=os.environ.get(variables.LOG_TAG))
        try:
            memory_share.give_casa_share(share, log[: -len(".log")] + ".casarc")
        except OSError:
            return 0
    return share


def where() -> str:
    """'rank R on HOST' for messages raised on this server."""
    rank = _state.get("rank", "?")
    who = "the cube client" if rank == CUBE_CLIENT_RANK else f"rank {rank}"
    return f"{who} on {_state.get('host', '?')}"


def _transform(code: str) -> str:
    from IPython import get_ipython

    shell = get_ipython()
    if shell is not None:  # allow IPython syntax (%magics, !shell) in the cell
        return shell.transform_cell(code)
    return code


def follow_cwd(cwd: str | None) -> None:
    """Work in the kernel's working directory, so relative paths in a cell mean
    the same on the kernel and on the servers (mpicasa's imager helper also
    moves its servers to the client's cwd). Checked at every call: a cell may
    have moved the server (``os.chdir``). A folder this host does not have is
    said once and the server stays where it is, unless where it is was removed
    too: then the work fails, saying so, rather than CASA failing on getcwd."""
    if not cwd:
        return
    try:
        here: str | None = os.getcwd()
    except FileNotFoundError:
        here = None
    if here == cwd:
        return
    try:
        os.chdir(cwd)
        _state.pop("cwd_failed", None)
    except OSError as exc:
        if here is None:
            raise FileNotFoundError(
                f"{where()} cannot follow the kernel to {cwd} ({exc.strerror}) and its "
                "own working directory was removed"
            ) from None
        if _state.get("cwd_failed") != cwd:
            _state["cwd_failed"] = cwd
            print(
                f"casa-kernel: {where()} cannot follow the kernel to {cwd} "
                f"({exc.strerror}); it works in {here}",
                file=sys.stderr,
            )


def run_cell(code: str, bindings: dict[str, Any] | None = None, cwd: str | None = None) -> Any:
    """Run ``code`` in the server's namespace; return its last expression's value.

    ``bindings`` are set in the namespace first (``vis`` for per-sub-MS cells),
    in the kernel's working directory ``cwd``. The cell is registered with
    linecache so remote tracebacks show its lines.
    """
    if "rank" not in _state:
        # A load-balanced job can reach a new server (after a recovery) before
        # the client's setup call does.
        setup_server()
    follow_cwd(cwd)
    ns = _user_ns()
    if bindings:
        ns.update(bindings)
        vis = bindings.get("vis")
        if isinstance(vis, str) and not os.path.exists(vis):
            raise FileNotFoundError(
                f"sub-MS {vis} is not visible on {where()}: a cluster on several hosts "
                "needs the data at the same path on a shared file system"
            )
    body, last = _compiled(code)
    try:
        exec(body, ns)
        return eval(last, ns) if last is not None else None
    finally:
        # (the engine flushes stdout/stderr itself after each request)
        _relay_casa_log()


def _compiled(code: str) -> tuple[Any, Any]:
    """The cell compiled as statements + last expression; cached, since the same
    cell runs once per sub-MS (and again on every dispatch of a loop)."""
    cache = _state.setdefault("compiled", {})
    hit = cache.get(code)
    if hit is not None:
        return hit
    source = _transform(code)
    counter = _state["cells"] = _state.get("cells", 0) + 1
    filename = f"<casa_parallel cell {counter}>"
    # registered with linecache so remote tracebacks show the cell's lines
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    tree = ast.parse(source, filename)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = compile(ast.Expression(tree.body.pop().value), filename, "eval")
    compiled = cache[code] = (compile(tree, filename, "exec"), last)
    if len(cache) > 256:  # a bound, not an LRU: plenty for a notebook session
        cache.pop(next(iter(cache)))
    return compiled


def run_casa_task(
    taskname: str, parameters: dict[str, Any], token: str | None = None, cwd: str | None = None
) -> Any:
    """Run one casatasks task on this server, as casampi's server does for
    ``push_command_request('<task>()', parameters=...)``, without eval.

    ``token`` names the call (the same for every attempt of it): a task that
    changes its sub-MS in place keeps what a re-run needs under it, so an attempt
    after a dead server starts from the sub-MS as the call found it
    (``casa_kernel/casa/rerun.py``).
    """
    from casa_kernel.casa.rerun import run_guarded
    from casa_kernel.casa.tasks import _casatasks

    follow_cwd(cwd)

    task = getattr(_casatasks(), taskname, None)
    if task is None or not callable(task):
        raise ValueError(f"{taskname!r} is not a casatasks task")
    try:
        return run_guarded(task, taskname, parameters, token, where())
    finally:
        _relay_casa_log()


def serial_task(
    taskname: str, parameters: dict[str, Any], cwd: str, keep: list[str], made: list[str]
) -> Any:
    """Run a task call that is not parallel here, with every core of this host
    (the other servers wait: cells run one at a time), for a kernel that must not
    write: casacore on a full disk aborts the process that writes (a serial
    tclean's images, a split of a plain MS).

    What a lost attempt of this call left is removed first: image products other
    than ``keep`` (there before the call) and ``made`` (outputs that were not).
    """
    from casa_kernel.casa.outputs import remove_paths
    from casa_kernel.casa.tasks import _casatasks
    from casa_kernel.server.cube import limit_threads, remove_lost_images

    follow_cwd(cwd)
    remove_lost_images(parameters.get("imagename"), keep)
    remove_paths(made)
    casalog = _casatasks().casalog
    before = casalog.ompGetNumThreads()
    limit_threads(1)
    try:
        return run_casa_task(taskname, parameters, None, cwd)
    finally:  # later cells on this server run with the threads they had before
        casalog.ompSetNumThreads(before)


def run_assembly_step(step: str, args: tuple[Any, ...], cwd: str | None = None) -> Any:
    """A writing step of a Multi-MS task's assembly (casa/private.py's
    ASSEMBLY_STEPS), here instead of in the kernel: casacore on a full disk
    aborts the process that writes."""
    from casa_kernel.casa.private import run_assembly_step as run
    from casa_kernel.casa.tasks import _casatasks

    follow_cwd(cwd)
    _casatasks()
    try:
        return run(step, args)
    finally:
        _relay_casa_log()


def _relay_casa_log() -> None:
    """Print this server's new CASA warnings and errors, so they reach the notebook.

    CASA logs to one file per server; only WARN and SEVERE lines are relayed.
    Ends the request's output: what went past the output limit is said here.
    """
    try:
        _relay_new_log_lines()
    finally:
        from casa_kernel.server.output import end_request

        end_request()


def _relay_new_log_lines() -> None:
    tail = _state.get("log_tail")
    # nothing can have been logged before CASA was imported (and it saves a stat
    # of the log file on every dispatch of a CASA-free cell)
    if tail is not None and "casatools" in sys.modules:
        for line in tail.read_new():
            # CASA's own report of a task's exception: the exception itself
            # reaches the notebook (or is a benign empty selection)
            if "raised an exception of class" not in line:
                print(line, file=sys.stderr)


def memory() -> int:
    """This server's resident set size in bytes (``%casa_cluster status``)."""
    import psutil

    return psutil.Process().memory_info().rss


def preload_casa_now() -> None:
    """Import casatasks (in a thread started by :func:`setup_server`).

    A failure is only logged: the first task then imports CASA and shows the error.
    """
    try:
        from casa_kernel.casa.tasks import preload

        preload()
    except Exception as exc:  # pragma: no cover - depends on the installation
        print(f"casa-kernel: loading CASA on this server failed: {exc!r}", file=sys.stderr)


def run_command(code: str) -> Any:
    """Run one of casampi's string commands (``toolsi.makepsf()``...) in this
    server's namespace; return the value when it is an expression.

    casatasks' parallel imagers drive their servers with such strings; casampi's
    servers run them the same way (eval, else exec). ``casalog`` is bound, as
    on a casampi server.
    """
    if "rank" not in _state:
        setup_server()
    ns = _user_ns()
    if "casalog" not in ns:
        from casa_kernel.casa.tasks import _casatasks

        ns["casalog"] = _casatasks().casalog
    try:
        try:
            compiled = compile(code, "<casampi command>", "eval")
        except SyntaxError:
            exec(compile(code, "<casampi command>", "exec"), ns)
            return None
        return eval(compiled, ns)
    finally:
        _relay_casa_log()


def push_values(values: dict[str, Any]) -> None:
    """casampi's ``push``: bind these names in this server's namespace."""
    _user_ns().update(values)
