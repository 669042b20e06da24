"""The notebook's commands: ``%casa_cluster`` and ``%%casa_parallel``.

Parsing only (IPython's ``magic_arguments``: the docstring is ``--help``, bad
arguments raise ``UsageError``); the work is done by the cluster session and
the dispatcher.
"""

from __future__ import annotations

import keyword
import math
import os
import re
import shlex
import socket
import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from casa_kernel import display
from casa_kernel.client.dispatch import Dispatcher
from casa_kernel.client.progress import status_rows, wait_ready
from casa_kernel.cluster import encryption
from casa_kernel.cluster.servers import layout_source
from casa_kernel.config.settings import ClusterConfig
from casa_kernel.errors import CasaKernelError, RemoteError
from casa_kernel.kernel.session import ClusterSession


def _batch_arguments(magic: Any) -> Any:
    """``%casa_cluster``'s options for servers from the batch queue (see batch_job)."""
    for decorator in reversed(
        [
            argument(
                "--slurm",
                action="store_true",
                help="servers from the batch queue: submit ONE Slurm job of N-1 tasks whose "
                "mpiexec starts them (one MPI world); cancelled on stop, restart and kernel "
                "shutdown",
            ),
            argument("--pbs", action="store_true", help="as --slurm, with PBS (qsub)"),
            argument("--time", default=None, help="wall time of the batch job (e.g. 2:00:00)"),
            argument("--partition", default=None, help="Slurm partition / PBS queue"),
            argument("--account", default=None, help="account to charge the batch job to"),
            argument(
                "--sbatch-arg",
                dest="batch_args",
                action="append",
                default=[],
                metavar="ARG",
                help="one more sbatch/qsub argument, repeatable: --sbatch-arg=--nodes=2",
            ),
        ]
    ):
        magic = decorator(magic)
    return magic


@magics_class
class CasaMagics(Magics):
    def __init__(self, shell: Any, session: ClusterSession):
        super().__init__(shell)
        self.session = session
        self._data_checked: set[tuple[int, str]] = set()  # (cluster, --vis path) seen by all

    @line_magic
    @magic_arguments()
    @argument(
        "action",
        nargs="?",
        default="status",
        choices=["start", "stop", "restart", "status", "check"],
        help="start: launch the servers; stop: end them; restart: stop then start "
        "(only what -n/--hostfile/--mpiexec name changes); status: each server's rank, "
        "host, pid, state, current work, memory; check: the preflight of the servers' "
        "other hosts (ssh, same paths, same installation), as a table, launching nothing",
    )
    @argument(
        "-n",
        "--nprocs",
        type=int,
        default=None,
        help="total number of processes N, as `mpicasa -n N`: this kernel (the client) "
        "plus N-1 servers; inside a batch job (Slurm, PBS, LSF) its first N slots, "
        "without -n and --hostfile all of them",
    )
    @argument(
        "--hostfile",
        default=None,
        help="OpenMPI hostfile (`host slots=K` lines); the client takes one slot on "
        "the first host, servers fill the rest in file order",
    )
    @argument("--mpiexec", default=None, help="mpiexec of a site MPI to use instead")
    @argument(
        "--vis",
        dest="check_vis",
        action="append",
        default=[],
        metavar="PATH",
        help="with check: a data path every host must see at the same path, repeatable",
    )
    @argument(
        "--oversubscribe",
        action="store_true",
        help="without a hostfile, allow more than 8 servers per core of this machine",
    )
    @_batch_arguments
    def casa_cluster(self, line: str) -> Any:
        """Start, stop, restart the CASA cluster, or show its servers.

        The kernel is the client (mpicasa's rank 0); the servers are ipyparallel
        engines started by one mpiexec, so they form one MPI world.

        Examples::

            %casa_cluster status
            %casa_cluster restart -n 5
            %casa_cluster start --hostfile hosts.txt
            %casa_cluster check --hostfile hosts.txt --vis /data/obs.ms
            %casa_cluster start --slurm -n 17 --time 2:00:00 --partition debug
        """
        if _wants_help(line):
            print(self.casa_cluster.__doc__)
            return None
        args = _parse(self.casa_cluster, line)
        if args.check_vis and args.action != "check":
            raise UsageError("--vis only applies to %casa_cluster check")
        try:
            if args.action == "check":
                return self._check(args)
            if args.action == "status":
                return self._status()
            if args.action == "stop":
                self.session.stop()
                print("casa-kernel: cluster stopped")
                return None
            try:
                config = self._config(args)
            except (ValueError, OSError) as exc:  # e.g. a NUL byte in a path
                raise UsageError(f"%casa_cluster {line.strip()}: {exc}") from None
            if args.action == "restart":
                self.session.stop()
            cluster = self.session.start(config)
            wait_ready(cluster)
            return self._status()
        except CasaKernelError as exc:
            raise UsageError(str(exc)) from None

    def _config(self, args: Any) -> ClusterConfig | None:
        """The configuration to (re)start with: the current one (or the kernelspec's)
        with only the settings this line names replaced."""
        overrides: dict[str, Any] = {}
        if args.nprocs is not None:
            overrides["nprocs"] = args.nprocs
        if args.hostfile is not None:
            overrides["hostfile"] = os.path.abspath(os.path.expanduser(args.hostfile))
        if args.mpiexec is not None:
            overrides["mpiexec"] = args.mpiexec
        if args.oversubscribe:  # (else the kernelspec's variables.OVERSUBSCRIBE)
            overrides["oversubscribe"] = True
        if (batch := batch_job(args)) is not None:  # new job (a restart keeps the current)
            overrides["batch"] = batch
        current = self.session.cluster
        if current is not None:
            return current.config.replace(**overrides) if overrides else current.config
        return ClusterConfig.from_env(**overrides) if overrides else None

    def _check(self, args: Any) -> Any:
        """The preflight of the configuration a start would use; launches nothing."""
        from casa_kernel import preflight

        try:
            config = self._config(args) or ClusterConfig.from_env()
        except (ValueError, OSError) as exc:
            raise UsageError(f"%casa_cluster check: {exc}") from None
        vis = [os.path.abspath(os.path.expanduser(v)) for v in args.check_vis]
        return preflight.check(config, self.session.env, vis=vis).table()

    def _status(self) -> display.StatusTable:
        # Waits only for a first start (it has a deadline); never for servers
        # being replaced or stuck: status answers at once whatever they do.
        cluster = self.session.require()
        if str(cluster.state) == "starting":
            wait_ready(cluster)
        rows = status_rows(cluster)  # may start replacing dead servers: state after it
        placement = cluster.config.placement
        source = layout_source(cluster) or placement.hostfile or "localhost"
        # without a hostfile everything is on this machine: name it as the servers do
        client_host = placement.client_host if placement.hostfile else socket.gethostname()
        # asked of the running client (it holds the controller's key), not the config
        client = cluster.client
        encrypted = bool(client.curve_serverkey) if client is not None else cluster.config.encrypted
        state = str(cluster.state)
        if cluster.is_lost():
            state = f"lost: {cluster.lost}; the next cell that needs servers starts a new one"
        # which MPI started the servers and which one mpi4py loads (config/mpi_match.py);
        # in the first line: readers of this table take line 2 as its header
        mpi = f"{cluster.config.mpi.describe()}; " if cluster.config.mpi is not None else ""
        title = (
            f"CASA cluster ({state}): client on {client_host}, "
            f"{len(placement.servers)} servers, N={placement.nprocs} ({source}); {mpi}"
            + encryption.describe(encrypted, placement.is_local)
        )
        return display.StatusTable(title, rows)

    @cell_magic
    @magic_arguments()
    @argument(
        "--vis",
        default=None,
        help="a Multi-MS: run the cell once per sub-MS, with `vis` bound to that "
        "sub-MS's path, load-balanced over the servers; results are merged as CASA's "
        "parallel helper merges them. Without --vis the cell runs once on every server "
        "with `rank`, `size` and `comm` (mpi4py: the servers' communicator) bound, and "
        "its value is the "
        "list of each server's last expression, in rank order",
    )
    @argument(
        "--out",
        default=None,
        help="also store the result in this variable (with --vis: the merged value; "
        "per-sub-MS values in NAME_per_submms)",
    )
    @argument(
        "--force",
        action="store_true",
        help="let --out take the name of a CASA task (it then hides the task)",
    )
    @argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds before still-running work is interrupted and reported",
    )
    def casa_parallel(self, line: str, cell: str) -> Any:
        """Run the cell on the CASA servers.

        SPMD form (every server)::

            %%casa_parallel
            rank, size, comm.allreduce(rank)

        Per sub-MS of a Multi-MS::

            %%casa_parallel --vis obs.mms --out summary
            flagdata(vis=vis, mode='summary')
        """
        if _wants_help(line):
            print(self.casa_parallel.__doc__)
            return None
        args = _parse(self.casa_parallel, line)
        if args.out is not None:
            _check_out(args.out, args.force)
        if args.timeout is not None and not 0 < args.timeout < math.inf:
            raise UsageError(f"--timeout {args.timeout!r}: give a number of seconds above 0")
        try:
            cluster = self.session.require()
            wait_ready(cluster)
        except CasaKernelError as exc:
            raise UsageError(str(exc)) from None
        title = "%%casa_parallel"
        if args.vis is not None:
            title += f" --vis {os.path.basename(os.path.normpath(args.vis))}"
        dispatcher = Dispatcher(cluster, title=title)
        if args.vis is None:
            try:
                values = dispatcher.spmd(cell, timeout=args.timeout)
            except RemoteError as exc:
                if args.out:
                    self.shell.user_ns[args.out] = exc.results
                raise
            if args.out:
                self.shell.user_ns[args.out] = values
            if all(value is None for value in values):
                return None  # e.g. a cell ending in print(): no Out, as %%px
            return values
        self._check_data(cluster, os.path.abspath(args.vis))
        return self._per_submms(dispatcher, cell, args)

    # magic_arguments writes the usage line with one %: a cell magic has two.
    casa_parallel.__doc__ = (casa_parallel.__doc__ or "").replace(
        "%casa_parallel [", "%%casa_parallel [", 1
    )

    def _check_data(self, cluster: Any, vis: str) -> None:
        """Servers on other hosts must see ``vis`` at the same path: the preflight's
        data check, once per cluster and path, before any server is given it."""
        from casa_kernel import preflight

        key = (id(cluster), vis)
        if key in self._data_checked or not preflight.needed(cluster.config):
            return
        report = preflight.check(cluster.config, self.session.env, vis=[vis])
        if not report.ok:
            raise report.error()
        self._data_checked.add(key)

    def _per_submms(self, dispatcher: Dispatcher, cell: str, args: Any) -> Any:
        from casa_kernel.casa.merge import merge_results
        from casa_kernel.casa.mms import list_submms

        vis = os.path.abspath(args.vis)
        try:
            submms = list_submms(vis)
        except CasaKernelError as exc:
            raise UsageError(str(exc)) from None
        result = dispatcher.per_submms(cell, submms, vis, timeout=args.timeout)
        result.merged = merge_results(result.per_submms, "casa_parallel")
        if args.out:
            self.shell.user_ns[args.out] = result.merged
            self.shell.user_ns[f"{args.out}_per_submms"] = result.per_submms
        if result.failures:
            raise RemoteError(result.failures, results=result.per_submms)
        return result.merged


def batch_job(args: Any) -> Any:
    """The BatchJob of --slurm/--pbs, or None (options checked here)."""
    if args.slurm and args.pbs:
        raise UsageError("choose one of --slurm and --pbs")
    if not (args.slurm or args.pbs):
        given = [f"--{n}" for n in ("time", "partition", "account") if getattr(args, n)]
        if args.batch_args:
            given.append("--sbatch-arg")
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --slurm or --pbs")
        return None
    if args.hostfile:
        raise UsageError("--hostfile and --slurm/--pbs: the batch system places the servers")
    from casa_kernel.config.batch import BatchJob
    from casa_kernel.config.settings import DEFAULT_NPROCS

    nprocs = DEFAULT_NPROCS if args.nprocs is None else args.nprocs
    if nprocs < 2:
        raise UsageError(f"-n {nprocs}: N counts the client too, so at least 2")
    return BatchJob(
        "slurm" if args.slurm else "pbs",
        nprocs - 1,
        time=args.time,
        partition=args.partition,
        account=args.account,
        extra_args=tuple(args.batch_args),
    )


def _parse(magic: Any, line: str) -> Any:
    """The magic's arguments from its line, split as a shell would: a quoted path
    may hold spaces (``--vis "/data/my obs.mms"``)."""
    try:
        argv = shlex.split(line)
    except ValueError as exc:  # "No closing quotation"
        raise UsageError(f"cannot read the line {line!r}: {exc}") from None
    return magic.parser.parse_args(argv)


# Names the kernel and IPython rely on: a result stored over one breaks every
# later magic (get_ipython), the history (In, Out, _oh...) or the cluster handle.
RESERVED_OUT = frozenset(
    {"get_ipython", "In", "Out", "exit", "quit", "casa_cluster", "_", "__", "___"}
    | {"_i", "_ii", "_iii", "_ih", "_oh", "_dh", "__builtins__", "__name__"}
)


def _check_out(name: str, force: bool = False) -> None:
    """--out must be a variable name the kernel does not rely on; a CASA task's
    name only with --force."""
    if not name.isidentifier() or keyword.iskeyword(name):
        raise UsageError(f"--out {name!r} is not a valid variable name")
    if name in RESERVED_OUT or re.fullmatch(r"_i?\d+", name):
        raise UsageError(f"--out {name}: the kernel or IPython relies on {name}; choose another")
    from casa_kernel.casa.tasks import task_names

    if name in task_names():
        if not force:
            raise UsageError(
                f"--out {name} would hide the CASA task {name}() in this notebook; "
                "choose another name (or add --force)"
            )
        print(
            f"casa-kernel: warning: --out {name} hides the CASA task {name}() in this notebook",
            file=sys.stderr,
            flush=True,
        )


def _wants_help(line: str) -> bool:
    """``--help`` / ``-h`` print the usage text (the docstring magic_arguments built)."""
    return any(token in ("-h", "--help") for token in line.split())
