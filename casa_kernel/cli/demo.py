"""Run the packaged quickstart notebook headless on a real casa-kernel.

:func:`run` is what ``casa-kernel demo`` does: it writes a temporary ``casa-mpi``
kernelspec for ``nprocs`` processes (1 client + ``nprocs - 1`` servers on this
machine), executes ``casa_kernel/notebooks/quickstart.ipynb`` cell by cell with
nbclient in a working directory, shuts the kernel (and so its cluster) down, and
returns the numbers the notebook's last cell printed as JSON (``quickstart_result``).

The kernelspec is found through a :class:`~jupyter_client.kernelspec.KernelSpecManager`
that only looks at the temporary directory, so a ``casa-mpi`` kernelspec the user
installed (maybe with a hostfile) is neither used nor touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from typing import IO, Any

from casa_kernel import variables
from casa_kernel.kernel.kernelspec import DEFAULT_NPROCS, KERNEL_NAME

__all__ = [
    "EXECUTED_NAME",
    "KERNEL_LOG_NAME",
    "NOTEBOOK_NAME",
    "NOTEBOOK_PACKAGE",
    "RESULT_TAG",
    "DemoError",
    "read_notebook",
    "run",
]

NOTEBOOK_PACKAGE = "casa_kernel.notebooks"
NOTEBOOK_NAME = "quickstart.ipynb"
#: The executed copy (outputs included), written into the working directory.
EXECUTED_NAME = "quickstart.executed.ipynb"
#: The kernel process's own stdout and stderr (Jupyter's and MPI's messages),
#: written into the working directory rather than onto the caller's terminal.
KERNEL_LOG_NAME = "quickstart.kernel.log"
#: Tag of the cell that prints ``quickstart_result`` as JSON on its last line.
RESULT_TAG = "quickstart-result"

#: Seconds the kernel may take to answer its first message (the cluster starts
#: in the background after that, and the first cell waits for it).
STARTUP_TIMEOUT = 120.0

#: progress(position, total, first_line): called before each code cell runs;
#: ``position`` counts code cells from 1.
Progress = Callable[[int, int, str], None]


class DemoError(RuntimeError):
    """The quickstart notebook did not run to the end, or gave no result.

    ``cell`` is the 1-based position of the failing cell in the notebook (``None``
    when the failure is not a cell's), ``ename``/``evalue`` the error it raised.
    """

    def __init__(
        self,
        message: str,
        cell: int | None = None,
        ename: str | None = None,
        evalue: str | None = None,
    ):
        super().__init__(message)
        self.cell = cell
        self.ename = ename
        self.evalue = evalue


def read_notebook(name: str = NOTEBOOK_NAME) -> Any:
    """A packaged notebook (the quickstart by default), as an ``nbformat`` v4 NotebookNode."""
    import nbformat

    text = resources.files(NOTEBOOK_PACKAGE).joinpath(name).read_text(encoding="utf-8")
    return nbformat.reads(text, as_version=4)


def _first_line(source: str) -> str:
    """The cell's first non-blank line, shortened, to name a cell in messages."""
    for line in source.splitlines():
        if line.strip():
            return line.strip() if len(line.strip()) <= 60 else line.strip()[:57] + "..."
    return ""


def _kernel_env() -> dict[str, str]:
    """The kernel's environment: this one, minus cluster settings the spec does not set.

    The kernelspec sets ``variables.NPROCS``; an inherited ``variables.HOSTFILE``
    would spread the demo over the hosts of someone's own cluster, so it is dropped.
    ``variables.MPIEXEC`` (a site MPI) is kept.
    """
    env = dict(os.environ)
    for key in (variables.HOSTFILE, variables.NPROCS):
        env.pop(key, None)
    return env


def _result(nb: Any, tag: str = RESULT_TAG) -> dict[str, Any]:
    """The JSON dict on the last stdout line of the cell tagged ``tag``."""
    for cell in nb.cells:
        if tag not in cell.get("metadata", {}).get("tags", []):
            continue
        text = "".join(
            out.get("text", "")
            for out in cell.get("outputs", [])
            if out.get("output_type") == "stream" and out.get("name") == "stdout"
        )
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise DemoError(f"the {tag!r} cell printed nothing")
        try:
            value = json.loads(lines[-1])
        except json.JSONDecodeError as exc:
            raise DemoError(f"the {tag!r} cell printed no JSON: {lines[-1]!r}") from exc
        if not isinstance(value, dict):
            raise DemoError(f"the {tag!r} cell printed {type(value).__name__}, not a dict")
        return value
    raise DemoError(f"the notebook has no cell tagged {tag!r}")


def _execute(
    nb: Any,
    workdir: str,
    kernel_dirs: str,
    deadline: float,
    progress: Progress | None,
    log: IO[bytes],
) -> None:
    """Run every code cell of ``nb`` in place on a new kernel; the kernel is always shut down.

    The kernel runs in ``workdir`` with its stdout and stderr going to ``log``.
    """
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    km = AsyncKernelManager(
        kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dirs])
    )
    client = NotebookClient(
        nb,
        km=km,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": workdir}},
        startup_timeout=int(min(STARTUP_TIMEOUT, max(1.0, deadline - time.monotonic()))),
        # Graceful: the kernel stops its cluster (servers, controller, mpiexec) itself.
        shutdown_kernel="graceful",
    )
    try:
        # cleanup_kc=True: shut the kernel down on leaving, also on errors (we own km).
        with client.setup_kernel(
            env=_kernel_env(), stdout=log, stderr=subprocess.STDOUT, cleanup_kc=True
        ):
            _run_cells(client, nb, deadline, progress)
    except DemoError:
        raise
    except (RuntimeError, TimeoutError, OSError) as exc:
        # The kernel did not start (or not answer), or could not be shut down.
        raise DemoError(f"the kernel failed: {type(exc).__name__}: {exc}") from exc


def _run_cells(client: Any, nb: Any, deadline: float, progress: Progress | None) -> None:
    """Execute the code cells in order; the first failure raises :class:`DemoError`."""
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    code_cells = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    for position, index in enumerate(code_cells, start=1):
        cell = nb.cells[index]
        where = f"cell {index + 1} ({_first_line(cell.source)!r})"
        left = deadline - time.monotonic()
        if left <= 0:
            raise DemoError(f"timed out before {where}", cell=index + 1)
        client.timeout = max(1, int(left))
        if progress is not None:
            progress(position, len(code_cells), _first_line(cell.source))
        try:
            client.execute_cell(cell, index, execution_count=position)
        except CellExecutionError as exc:
            raise DemoError(
                f"{where} failed: {exc.ename}: {exc.evalue}",
                cell=index + 1,
                ename=exc.ename,
                evalue=exc.evalue,
            ) from exc
        except CellTimeoutError as exc:
            raise DemoError(
                f"{where} did not finish within the demo's time limit", cell=index + 1
            ) from exc
        except DeadKernelError as exc:
            raise DemoError(f"the kernel died while running {where}", cell=index + 1) from exc


def _tail(path: str, lines: int = 15) -> str:
    """The last ``lines`` lines of a text file ('' if unreadable)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return ""


def run(
    workdir: str | None = None,
    nprocs: int = DEFAULT_NPROCS,
    timeout: float = 900,
    progress: Progress | None = None,
    notebook: str = NOTEBOOK_NAME,
) -> dict[str, Any]:
    """Execute the quickstart notebook on a fresh casa-kernel and return ``quickstart_result``.

    ``notebook`` names another packaged notebook (``ngc5921.ipynb``): its executed
    copy and kernel log are then ``<stem>.executed.ipynb`` and ``<stem>.kernel.log``,
    and its result the JSON printed by the cell tagged ``<stem>-result``.

    ``nprocs`` is the total process count, client included (``mpicasa -n N``);
    ``timeout`` bounds the whole run in seconds. The notebook runs with ``workdir``
    as its current directory (created if missing, and kept); without one, in a
    temporary directory removed afterwards. The executed notebook is written to
    ``<workdir>/quickstart.executed.ipynb``, also when a cell fails, and what
    the kernel process itself prints to ``<workdir>/quickstart.kernel.log``.

    The result holds ``rows`` (of the simulated MS), ``total`` (visibilities),
    ``flagged_before``, ``flagged_after_rflag``, ``target_rows`` (of the spw-0
    split), ``servers`` and ``kernel_pid``. Raises :class:`DemoError` naming the
    cell when one fails (or times out), and the kernelspec's errors
    (:class:`~casa_kernel.errors.PlacementError`) for an impossible ``nprocs``,
    before anything is started.
    """
    import nbformat

    from casa_kernel.kernel.kernelspec import write_kernel_spec

    deadline = time.monotonic() + timeout
    scratch = tempfile.mkdtemp(prefix="casa-kernel-demo-")
    try:
        kernel_dirs = os.path.join(scratch, "kernels")
        # Validates nprocs before anything runs; argv is this Python.
        write_kernel_spec(os.path.join(kernel_dirs, KERNEL_NAME), nprocs=nprocs)
        keep = workdir is not None
        if workdir is None:
            workdir = os.path.join(scratch, "work")
        workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
        os.makedirs(workdir, exist_ok=True)
        stem = notebook.removesuffix(".ipynb")
        log_path = os.path.join(workdir, f"{stem}.kernel.log")
        nb = read_notebook(notebook)
        try:
            with open(log_path, "wb") as log:
                _execute(nb, workdir, kernel_dirs, deadline, progress, log)
        except DemoError as exc:
            if keep:
                exc.args = (f"{exc} (kernel output: {log_path})",)
            else:
                tail = _tail(log_path)
                if tail:
                    exc.args = (f"{exc}\nlast lines of the kernel's output:\n{tail}",)
            raise
        finally:
            nbformat.write(nb, os.path.join(workdir, f"{stem}.executed.ipynb"))
        return _result(nb, f"{stem}-result")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
