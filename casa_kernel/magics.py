"""The notebook's commands: ``%casa_cluster`` and ``%%casa_parallel``.

Parsing only (IPython's ``magic_arguments``: the docstring is ``--help``, bad
arguments raise ``UsageError``); the work is done by the cluster session and
the dispatcher.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from casa_kernel import display
from casa_kernel.cluster import ClusterConfig, ClusterSession
from casa_kernel.dispatch import Dispatcher
from casa_kernel.errors import CasaKernelError, RemoteError


@magics_class
class CasaMagics(Magics):
    def __init__(self, shell: Any, session: ClusterSession):
        super().__init__(shell)
        self.session = session

    @line_magic
    @magic_arguments()
    @argument(
        "action",
        nargs="?",
        default="status",
        choices=["start", "stop", "restart", "status"],
        help="start: launch the servers; stop: end them; restart: stop then start "
        "(with new -n/--hostfile if given); status: each server's rank, host, pid, state",
    )
    @argument(
        "-n",
        "--nprocs",
        type=int,
        default=None,
        help="total number of processes N, as `mpicasa -n N`: this kernel (the client) "
        "plus N-1 servers",
    )
    @argument(
        "--hostfile",
        default=None,
        help="OpenMPI hostfile (`host slots=K` lines); the client takes one slot on "
        "the first host, servers fill the rest in file order",
    )
    @argument("--mpiexec", default=None, help="mpiexec of a site MPI to use instead")
    @argument(
        "--slurm",
        action="store_true",
        help="servers from the batch queue: submit ONE Slurm job of N-1 tasks whose mpiexec "
        "starts them (one MPI world); cancelled on stop, restart and kernel shutdown",
    )
    @argument("--pbs", action="store_true", help="as --slurm, with PBS (qsub)")
    @argument("--time", default=None, help="wall time of the batch job (e.g. 2:00:00)")
    @argument("--partition", default=None, help="Slurm partition / PBS queue")
    @argument("--account", default=None, help="account to charge the batch job to")
    @argument(
        "--sbatch-arg",
        dest="batch_args",
        action="append",
        default=[],
        metavar="ARG",
        help="one more sbatch/qsub argument, repeatable: --sbatch-arg=--nodes=2",
    )
    def casa_cluster(self, line: str) -> Any:
        """Start, stop, restart the CASA cluster, or show its servers.

        The kernel is the client (mpicasa's rank 0); the servers are ipyparallel
        engines started by one mpiexec, so they form one MPI world.

        Examples::

            %casa_cluster status
            %casa_cluster restart -n 5
            %casa_cluster start --hostfile hosts.txt
            %casa_cluster start --slurm -n 17 --time 2:00:00 --partition debug

        Inside a batch job (Slurm, PBS, LSF) without -n or --hostfile the
        cluster fills the job's allocation; -n N takes its first N slots.
        """
        if _wants_help(line):
            print(self.casa_cluster.__doc__)
            return None
        args = parse_argstring(self.casa_cluster, line)
        try:
            if args.action == "status":
                return self._status()
            if args.action == "stop":
                self.session.stop()
                print("casa-kernel: cluster stopped")
                return None
            config = self._config(args)
            if args.action == "restart":
                self.session.stop()
            cluster = self.session.start(config)
            cluster.wait_ready(progress=display.progress)
            return self._status()
        except CasaKernelError as exc:
            raise UsageError(str(exc)) from None

    def _config(self, args: Any) -> ClusterConfig | None:
        batch = self._batch_job(args)
        if args.nprocs is None and args.hostfile is None and args.mpiexec is None and not batch:
            current = self.session.cluster
            return current.config if current is not None else None
        return ClusterConfig.from_options(
            nprocs=args.nprocs,
            hostfile=os.path.abspath(args.hostfile) if args.hostfile else None,
            mpiexec=args.mpiexec,
            batch=batch,
        )

    def _batch_job(self, args: Any) -> Any:
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
        from casa_kernel.batch import BatchJob
        from casa_kernel.cluster import DEFAULT_NPROCS

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

    def _status(self) -> display.StatusTable:
        cluster = self.session.require()
        if cluster.state == "starting":
            cluster.wait_ready(progress=display.progress)
        placement = cluster.config.placement
        source = cluster.layout_source() or placement.hostfile or "localhost"
        # without a hostfile everything is on this machine: name it as the servers do
        client_host = placement.client_host if placement.hostfile else socket.gethostname()
        title = (
            f"CASA cluster ({cluster.state}): client on {client_host}, "
            f"{len(placement.servers)} servers, N={placement.nprocs} ({source})"
        )
        return display.StatusTable(title, cluster.status())

    @cell_magic
    @magic_arguments()
    @argument(
        "--vis",
        default=None,
        help="a Multi-MS: run the cell once per sub-MS, with `vis` bound to that "
        "sub-MS's path, load-balanced over the servers; results are merged as CASA's "
        "parallel helper merges them. Without --vis the cell runs once on every server "
        "with `rank`, `size` and `comm` (mpi4py COMM_WORLD) bound, and its value is the "
        "list of each server's last expression, in rank order",
    )
    @argument(
        "--out",
        default=None,
        help="also store the result in this variable (with --vis: the merged value; "
        "per-sub-MS values in NAME_per_submms)",
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
        args = parse_argstring(self.casa_parallel, line)
        if args.out is not None and not args.out.isidentifier():
            raise UsageError(f"--out {args.out!r} is not a valid variable name")
        try:
            cluster = self.session.require()
            cluster.wait_ready(progress=display.progress)
        except CasaKernelError as exc:
            raise UsageError(str(exc)) from None
        dispatcher = Dispatcher(cluster)
        if args.vis is None:
            try:
                values = dispatcher.spmd(cell, timeout=args.timeout)
            except RemoteError as exc:
                if args.out:
                    self.shell.user_ns[args.out] = exc.results
                raise
            if args.out:
                self.shell.user_ns[args.out] = values
            return values
        return self._per_submms(dispatcher, cell, args)

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


def _wants_help(line: str) -> bool:
    """``--help`` / ``-h`` print the usage text (the docstring magic_arguments built)."""
    return any(token in ("-h", "--help") for token in line.split())
