"""The ``casa-kernel`` command line.

Subcommands register in :data:`SUBCOMMANDS`: each entry maps a name to a
function that adds its parser to the subparsers and sets ``func`` (the handler,
returning the exit code) as a default. Adding a subcommand is one function plus
one entry.

Exit codes: 0 success, 2 invalid input (argparse's convention: nothing was
done), 1 any other failure (e.g. no permission to write the kernelspec).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from casa_kernel import variables
from casa_kernel.errors import CasaKernelError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

PROG = "casa-kernel"

# What a subcommand parser's "func" default is: Namespace -> exit code.
Handler = Callable[[argparse.Namespace], int]


def _nprocs(text: str) -> int:
    """argparse type for -n: an integer; the range is checked with the other options."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of processes (client included), got {text!r}"
        ) from None


def _add_install_parser(subparsers: argparse._SubParsersAction) -> None:
    """``casa-kernel install``: write the kernelspec where Jupyter finds it."""
    from casa_kernel.kernel.kernelspec import DEFAULT_NPROCS, DISPLAY_NAME, KERNEL_NAME

    p = subparsers.add_parser(
        "install",
        help="install the CASA (MPI) kernelspec for Jupyter",
        description=(
            "Install the casa-kernel kernelspec. The cluster options are checked "
            "(hostfile read, processes placed) before anything is written."
        ),
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--user", action="store_true", help="install for the current user (Jupyter data dir)"
    )
    where.add_argument(
        "--sys-prefix",
        action="store_true",
        help=f"install into this environment's prefix ({sys.prefix})",
    )
    where.add_argument(
        "--prefix", metavar="P", help="install into P/share/jupyter/kernels (default: system-wide)"
    )
    p.add_argument("--name", default=KERNEL_NAME, help=f"kernelspec name (default: {KERNEL_NAME})")
    p.add_argument(
        "--display-name",
        metavar="D",
        default=None,
        help=f"name shown in Jupyter (default: {DISPLAY_NAME!r})",
    )
    p.add_argument(
        "-n",
        "--nprocs",
        metavar="N",
        type=_nprocs,
        default=None,
        help=(
            "total MPI processes, the client (this kernel) included, as mpicasa -n N; "
            "default: every hostfile slot; without a hostfile, every slot of the batch "
            f"job (Slurm, PBS, LSF) the kernel runs in, else {DEFAULT_NPROCS}"
        ),
    )
    p.add_argument("--hostfile", metavar="F", help="OpenMPI-syntax hostfile (slots=K per host)")
    p.add_argument(
        "--mpiexec",
        metavar="PATH",
        help="a site MPI's mpiexec (default: the one installed in this environment)",
    )
    p.add_argument(
        "--python",
        metavar="PATH",
        default=None,
        help="the Python that runs the kernel, e.g. a monolithic CASA's bin/python3 "
        "(default: this one); it must import casa_kernel and casatasks",
    )
    p.add_argument(
        "--batch",
        metavar="SPEC",
        help="servers from the batch queue at kernel start, e.g. "
        "--batch 'slurm --time 2:00:00 --partition P' (the words of %%casa_cluster "
        "start --slurm; N from -n)",
    )
    p.set_defaults(func=_run_install)


def _run_install(args: argparse.Namespace) -> int:
    from casa_kernel.config.batch import parse_batch_spec
    from casa_kernel.config.settings import DEFAULT_NPROCS
    from casa_kernel.kernel.kernelspec import check_python, install, mpi_report

    extra_env = None
    if args.batch:
        parse_batch_spec(args.batch, 1)  # a bad spec fails here, before anything is written
        extra_env = {variables.BATCH: args.batch}
    report = None
    if args.python is not None:
        # another environment's Python: what it will launch with (its mpi4py, its
        # MPI); asked before writing, so an explicit --mpiexec that mismatches
        # leaves nothing behind
        report = mpi_report(check_python(args.python).path, args.mpiexec)
    destination = install(
        kernel_name=args.name,
        user=args.user,
        prefix=args.prefix,
        sys_prefix=args.sys_prefix,
        display_name=args.display_name,
        nprocs=args.nprocs,
        hostfile=args.hostfile,
        mpiexec=args.mpiexec,
        env=extra_env,
        python=args.python,
    )
    # Jupyter lowercases the name: report the one it installed under.
    print(f"Installed kernelspec {os.path.basename(destination)} in {destination}")
    # Echo the cluster configuration from the file just written, so what the
    # user sees is what Jupyter will use.
    with open(os.path.join(destination, "kernel.json"), encoding="utf-8") as f:
        spec = json.load(f)
    env = spec.get("env", {})
    for key in (variables.NPROCS, variables.HOSTFILE, variables.MPIEXEC, variables.BATCH):
        if key in env:
            print(f"  {key}={env[key]}")
    if report is not None:
        print(f"  python: {spec['argv'][0]}")
        print(f"  {report}")
    if variables.NPROCS not in env and variables.HOSTFILE not in env and variables.BATCH not in env:
        print(
            "  cluster size: every slot of the batch job the kernel runs in "
            f"(Slurm, PBS, LSF), else N={DEFAULT_NPROCS} on its machine"
        )
    return EXIT_OK


def _add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    """``casa-kernel demo``: run the quickstart notebook headless and summarise it."""
    from casa_kernel.kernel.kernelspec import DEFAULT_NPROCS

    p = subparsers.add_parser(
        "demo",
        help="run the quickstart notebook on a local cluster and print what it found",
        description=(
            "Execute the packaged quickstart notebook headless (nbclient) on a real "
            "casa-kernel with a local cluster: simulate a MeasurementSet, partition it "
            "into a Multi-MS, flag it in parallel, split one spectral window, talk MPI "
            "to the servers. Needs no data and no network."
        ),
    )
    p.add_argument(
        "-n",
        "--nprocs",
        metavar="N",
        type=_nprocs,
        default=DEFAULT_NPROCS,
        help=f"total MPI processes, the client included (default: {DEFAULT_NPROCS})",
    )
    p.add_argument(
        "--workdir",
        metavar="DIR",
        default=None,
        help="run the notebook in DIR (created if missing, kept); default: a temporary "
        "directory, removed afterwards",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary working directory (data, executed notebook) and print it",
    )
    p.add_argument(
        "--timeout",
        metavar="S",
        type=float,
        default=900.0,
        help="give up after S seconds in all (default: 900)",
    )
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import tempfile
    import time

    from casa_kernel.cli.demo import EXECUTED_NAME, DemoError, run
    from casa_kernel.kernel.kernelspec import cluster_env

    cluster_env(nprocs=args.nprocs)  # a bad -n fails here (exit 2), before anything runs
    workdir = args.workdir
    if workdir is None and args.keep:
        workdir = tempfile.mkdtemp(prefix="casa-kernel-demo-")

    def progress(position: int, total: int, first_line: str) -> None:
        print(f"  [{position:2d}/{total}] {first_line}", file=sys.stderr, flush=True)

    print(
        f"{PROG} demo: running the quickstart notebook on {args.nprocs} processes "
        f"(1 client + {args.nprocs - 1} servers)",
        file=sys.stderr,
        flush=True,
    )
    start = time.monotonic()
    try:
        result = run(workdir, nprocs=args.nprocs, timeout=args.timeout, progress=progress)
    except DemoError as exc:
        print(f"{PROG} demo: error: {exc}", file=sys.stderr)
        if workdir is not None:
            path = os.path.join(os.path.abspath(workdir), EXECUTED_NAME)
            print(f"  {'executed notebook:':<21} {path}", file=sys.stderr)
        return EXIT_FAILURE
    seconds = time.monotonic() - start
    print(_demo_summary(result, seconds))
    if workdir is not None:
        path = os.path.join(os.path.abspath(workdir), EXECUTED_NAME)
        print(f"  {'executed notebook:':<21} {path}")
    return EXIT_OK


def _demo_summary(result: dict[str, Any], seconds: float) -> str:
    """The human summary of a demo run, from the notebook's ``quickstart_result``."""
    total = result.get("total") or 0

    def flagged(key: str) -> str:
        count = result.get(key, 0)
        share = f" ({count / total:.1%})" if total else ""
        return f"{count} visibilities{share}"

    rows = [
        ("servers", f"{result.get('servers')}"),
        ("simulated MS", f"{result.get('rows')} rows, {total} visibilities"),
        ("flagged before", flagged("flagged_before")),
        ("flagged after rflag", flagged("flagged_after_rflag")),
        ("target.mms (spw 0)", f"{result.get('target_rows')} rows"),
        ("wall time", f"{seconds:.1f} s"),
    ]
    lines = [f"{PROG} demo: the quickstart notebook ran to the end"]
    lines += [f"  {label + ':':<21} {value}" for label, value in rows]
    return "\n".join(lines)


def _add_check_parser(subparsers: argparse._SubParsersAction) -> None:
    """``casa-kernel check``: the preflight of a multi-host cluster, from a shell."""
    p = subparsers.add_parser(
        "check",
        help="check the servers' hosts before a multi-host launch (ssh, paths, versions)",
        description=(
            "Probe every host the servers would use (hostfile or batch allocation), all at "
            "once, as the kernel does before a launch; print the host x requirement table. "
            "Exit code 0 when every requirement passes, 1 when one fails."
        ),
    )
    p.add_argument("-n", "--nprocs", type=_nprocs, default=None, help="N, the client included")
    p.add_argument("--hostfile", default=None, help="OpenMPI hostfile of the cluster")
    p.add_argument("--mpiexec", default=None, help="mpiexec of a site MPI")
    p.add_argument(
        "--vis",
        action="append",
        default=[],
        metavar="PATH",
        help="a data path every host must see at the same path, repeatable",
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds per host (default 20)")
    p.set_defaults(func=_run_check)


def _run_check(args: argparse.Namespace) -> int:
    from casa_kernel import preflight
    from casa_kernel.casa.config import casa_environment, default_log_dir
    from casa_kernel.config.settings import ClusterConfig

    overrides: dict[str, Any] = {}
    if args.nprocs is not None:
        overrides["nprocs"] = args.nprocs
    if args.hostfile is not None:
        overrides["hostfile"] = args.hostfile
    if args.mpiexec is not None:
        overrides["mpiexec"] = args.mpiexec
    config = ClusterConfig.from_env(**overrides)
    # what the kernel gives its servers (CASASITECONFIG, the log folder)
    env = casa_environment(default_log_dir())
    report = preflight.check(config, env, vis=args.vis, timeout=args.timeout)
    print(repr(report.table()))
    return EXIT_OK if report.ok else EXIT_FAILURE


#: name -> function adding that subcommand's parser (which sets ``func``).
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "install": _add_install_parser,
    "demo": _add_demo_parser,
    "check": _add_check_parser,
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="casa-kernel: a Jupyter kernel that is the client of a CASA cluster"
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", title="commands", required=True
    )
    for add_parser in SUBCOMMANDS.values():
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code instead of exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse exits on --help (0) and on usage errors (2, message already
        # printed); turn that into a return value so main() is callable in-process.
        if exc.code is None:
            return EXIT_OK
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Handler = args.func
    try:
        return handler(args)
    except CasaKernelError as exc:
        # Bad input (hostfile, placement, mpiexec, name): the message names the
        # file and line where there is one, and nothing was written.
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        # The input was fine but the destination was not (permissions, disk).
        hint = ""
        if isinstance(exc, PermissionError):
            hint = " (try --user or --sys-prefix)"
        print(f"{PROG} {args.command}: error: {exc}{hint}", file=sys.stderr)
        return EXIT_FAILURE
