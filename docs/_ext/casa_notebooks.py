"""Execute the tutorial notebooks on a real casa-kernel before Sphinx reads them.

At ``builder-inited`` each notebook named in ``casa_notebooks`` (a name in the
repository's ``notebooks/`` -> N, the processes to run it on) is run headless by
the project's own runner, the one ``casa-kernel demo`` uses: a temporary
``casa-mpi`` kernelspec for N processes, nbclient driving a real kernel that
starts a local cluster (1 client + N-1 servers under one mpiexec), the kernel
shut down gracefully at the end (it stops its cluster). The executed copy is
written to ``<srcdir>/<casa_notebooks_dir>/<name>`` (gitignored) and myst-nb
renders it with ``nb_execution_mode = "off"``. The data the notebook makes (the
MeasurementSets, images) stays in a temporary folder, removed afterwards.

After each run every process of that kernel's cluster must be gone within
``CLEANUP_TIMEOUT`` seconds; stragglers are ended and fail the build.

A copy whose source notebook has not changed since it was executed (same
SHA-256, kept in its metadata) is reused: a second local build does not start a
cluster (delete the copies to run them again, e.g. after changing the kernel).
CI builds from a fresh clone and so always executes. Options (``-D``):
``casa_notebooks_execute=0`` copies the notebooks without outputs (no cluster);
``casa_notebooks_timeout`` bounds one notebook's run (seconds, default 900).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import nbformat
import psutil
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util import logging

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
METADATA_KEY = "casa_kernel_docs"
CLEANUP_TIMEOUT = 30.0


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_current(target: Path, digest: str, executed: bool) -> bool:
    """The copy at ``target`` was made from this source, executed or not as asked."""
    try:
        meta = nbformat.read(target, as_version=4).metadata.get(METADATA_KEY, {})
    except (OSError, ValueError):
        return False
    return meta.get("source_sha256") == digest and meta.get("executed") == executed


def _cluster_processes(kernel_pid: int) -> list[psutil.Process]:
    """Every process of that kernel's cluster (controller, mpiexec/prterun, engines):
    each carries the kernel's pid in ``CASA_KERNEL_OWNER``, orphaned or not."""
    from casa_kernel.variables import OWNER

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != kernel_pid and proc.environ().get(OWNER) == str(kernel_pid):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        except psutil.Error:
            continue
    return found


def _check_nothing_left(name: str, kernel_pid: int) -> float:
    """Wait until the kernel's cluster is gone; end stragglers and fail. Returns seconds."""
    start = time.monotonic()
    deadline = start + CLEANUP_TIMEOUT
    delay = 0.01
    while True:
        left = _cluster_processes(kernel_pid)
        if not left:
            return time.monotonic() - start
        if time.monotonic() > deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    names = [f"{p.pid} {p.name()}" for p in left]
    for proc in left:  # processes of the kernel this build started, by pid
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    raise ExtensionError(
        f"{name}: the kernel (pid {kernel_pid}) left {len(names)} cluster process(es) "
        f"{CLEANUP_TIMEOUT:.0f} s after its shutdown (ended now): {', '.join(names)}"
    )


def _execute(name: str, nprocs: int, timeout: float) -> Any:
    """``notebooks/<name>`` run on a fresh kernel with ``nprocs`` processes, outputs included."""
    from casa_kernel.cli.demo import DemoError, run

    def progress(position: int, total: int, first_line: str) -> None:
        log.info(f"  {name} [{position:2d}/{total}] {first_line}")

    stem = name.removesuffix(".ipynb")
    with tempfile.TemporaryDirectory(prefix=f"casa-kernel-docs-{stem}-") as workdir:
        start = time.monotonic()
        try:
            result = run(workdir, nprocs=nprocs, timeout=timeout, progress=progress, notebook=name)
        except DemoError as exc:
            raise ExtensionError(f"executing {name} for the docs failed: {exc}") from exc
        seconds = time.monotonic() - start
        cleanup = _check_nothing_left(name, int(result["kernel_pid"]))
        log.info(
            f"casa_notebooks: {name} ran in {seconds:.0f} s on {nprocs} processes; "
            f"its cluster was gone {cleanup:.1f} s after"
        )
        return nbformat.read(Path(workdir) / f"{stem}.executed.ipynb", as_version=4)


def write_notebooks(app: Sphinx) -> None:
    config = app.config
    execute = str(config.casa_notebooks_execute).strip().lower() not in ("0", "false", "no", "")
    target_dir = Path(app.srcdir) / config.casa_notebooks_dir
    target_dir.mkdir(parents=True, exist_ok=True)
    for name, nprocs in config.casa_notebooks.items():  # one cluster at a time
        source = NOTEBOOKS / name
        target = target_dir / name
        digest = _digest(source)
        if _is_current(target, digest, executed=execute):
            log.info(f"casa_notebooks: {target.name} is current (source unchanged), not re-run")
            continue
        if execute:
            log.info(f"casa_notebooks: executing {name} on a local cluster, N={nprocs} ...")
            nb = _execute(name, int(nprocs), float(config.casa_notebooks_timeout))
        else:
            log.info(f"casa_notebooks: {name} copied WITHOUT outputs (casa_notebooks_execute=0)")
            nb = nbformat.read(source, as_version=4)
        nb.metadata[METADATA_KEY] = {"source_sha256": digest, "executed": execute}
        tmp = target.with_suffix(".ipynb.tmp")
        nbformat.write(nb, tmp)
        shutil.move(tmp, target)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("casa_notebooks", {}, "env", dict)
    app.add_config_value("casa_notebooks_dir", "tutorial", "env", str)
    app.add_config_value("casa_notebooks_execute", True, "env", (bool, int, str))
    app.add_config_value("casa_notebooks_timeout", 900.0, "env", (float, int, str))
    app.connect("builder-inited", write_notebooks)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
