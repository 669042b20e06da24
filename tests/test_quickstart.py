"""The packaged quickstart notebook, run to the end on a real kernel, and ``casa-kernel demo``.

Everything is real: nbclient drives a casa-kernel started from a temporary
kernelspec, which starts 2 servers under mpiexec; the notebook simulates a small
MS (9000 rows), partitions, flags, splits. One run takes ~15 s on 2 idle cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import psutil
import pytest
from kernels import wait_gone

from casa_kernel.casa.simulate import SIZES, expected_rows
from casa_kernel.cli import demo as demo_runner

ROOT = Path(__file__).resolve().parent.parent
CASA_KERNEL = Path(sys.executable).parent / "casa-kernel"
SMALL = SIZES["small"]
NCORR = 4  # RR, RL, LR, LL
RESULT_KEYS = {
    "rows",
    "total",
    "flagged_before",
    "flagged_after_rflag",
    "target_rows",
    "servers",
    "kernel_pid",
}
CLEANUP_TIMEOUT = 30  # seconds for the last cluster process to go after shutdown


def executed_notebook(workdir: Path) -> Any:
    path = workdir / demo_runner.EXECUTED_NAME
    assert path.is_file(), f"no executed notebook in {workdir}"
    return nbformat.read(path, as_version=4)


def assert_no_errors(nb: Any) -> None:
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"cell {index + 1}: {out.get('evalue')}"


def assert_kernel_and_cluster_gone(kernel_pid: int) -> None:
    """Neither the kernel nor any process of its cluster (controller, mpiexec, servers) is left."""
    left = wait_gone(kernel_pid, CLEANUP_TIMEOUT)
    assert not left, [(p.pid, p.name()) for p in left]
    try:
        kernel = psutil.Process(kernel_pid)
    except psutil.NoSuchProcess:
        return
    assert kernel.status() == psutil.STATUS_ZOMBIE or not kernel.is_running()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The notebook run once in process, in a kept working directory."""
    workdir = tmp_path_factory.mktemp("quickstart")
    seen: list[tuple[int, int, str]] = []
    result = demo_runner.run(
        str(workdir), nprocs=3, timeout=300, progress=lambda *a: seen.append(a)
    )
    code_cells = [c for c in demo_runner.read_notebook().cells if c.cell_type == "code"]
    assert [s[:2] for s in seen] == [(i, len(code_cells)) for i in range(1, len(code_cells) + 1)]
    return workdir, result


# --------------------------------------------------------------------------- the notebook file


def test_packaged_notebook_is_the_repository_file_without_outputs() -> None:
    nb = demo_runner.read_notebook()
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec == {
        "name": "casa-mpi",
        "display_name": "CASA (MPI)",
        "language": "python",
    }
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert any(c.cell_type == "markdown" for c in nb.cells)
    tagged = [c for c in nb.cells if demo_runner.RESULT_TAG in c.metadata.get("tags", [])]
    assert tagged == [code[-1]]
    # Editable install: the package serves the repository's file, not a copy.
    source = ROOT / "notebooks" / demo_runner.NOTEBOOK_NAME
    if source.exists():
        assert nb == nbformat.read(source, as_version=4)


# --------------------------------------------------------------------------- run() for real


@pytest.mark.second_release
def test_quickstart_runs_to_the_end_with_sensible_numbers(
    first_run: tuple[Path, dict[str, Any]],
) -> None:
    workdir, result = first_run
    assert set(result) == RESULT_KEYS
    rows = expected_rows(SMALL.nant, SMALL.nint)
    assert result["rows"] == rows == 9000
    # Every row has nchan channels x 4 correlations; a fresh simulated MS has no flags.
    assert result["total"] == rows * SMALL.nchan * NCORR
    assert result["flagged_before"] == 0
    assert 0 < result["flagged_after_rflag"] < result["total"]
    assert result["target_rows"] == rows // 2  # spw 0 of the 2 spws
    assert result["servers"] == 2

    nb = executed_notebook(workdir)
    assert_no_errors(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    status = code[0].outputs[-1]["data"]["text/plain"]
    assert "2 servers" in status and "N=3" in status
    spmd = code[-2].outputs[-1]["data"]["text/plain"]
    assert spmd.startswith("[(0, 2, 1, ") and "(1, 2, 1, " in spmd
    assert json.loads(code[-1].outputs[-1]["text"]) == result
    for name in ("quickstart.ms", "quickstart.mms", "target.mms"):
        assert (workdir / name).is_dir(), name
    assert (workdir / "target.mms" / "SUBMSS").is_dir()  # split of a Multi-MS: a Multi-MS
    assert (workdir / demo_runner.KERNEL_LOG_NAME).is_file()


def test_quickstart_leaves_no_process_behind(first_run: tuple[Path, dict[str, Any]]) -> None:
    _, result = first_run
    assert result["kernel_pid"] != os.getpid()
    assert_kernel_and_cluster_gone(result["kernel_pid"])


def test_cli_demo_reruns_in_the_same_workdir(first_run: tuple[Path, dict[str, Any]]) -> None:
    """`casa-kernel demo --workdir` where the notebook already ran: it starts afresh."""
    workdir, first = first_run
    proc = subprocess.run(
        [str(CASA_KERNEL), "demo", "--workdir", str(workdir), "--timeout", "300"],
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "ran to the end" in out
    assert "servers:              2" in out
    assert f"{first['rows']} rows" in out
    assert "flagged before:       0 visibilities (0.0%)" in out
    assert f"target.mms (spw 0):   {first['target_rows']} rows" in out
    assert "wall time:" in out and str(workdir / demo_runner.EXECUTED_NAME) in out
    assert "[ 1/" in proc.stderr  # progress goes to stderr
    assert "IPKernelApp" not in proc.stderr + out  # the kernel's own output is in its log

    nb = executed_notebook(workdir)
    assert_no_errors(nb)
    again = json.loads(nb.cells[-1].outputs[-1]["text"])
    # The same simulated data and the same flagging: the same numbers.
    assert {k: v for k, v in again.items() if k != "kernel_pid"} == {
        k: v for k, v in first.items() if k != "kernel_pid"
    }
    assert_kernel_and_cluster_gone(again["kernel_pid"])


# --------------------------------------------------------------------------- failures


def test_failing_cell_is_named_and_the_cluster_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("A notebook that fails in its fourth cell."),
            nbformat.v4.new_code_cell("import os\nprint(os.getpid())"),
            nbformat.v4.new_code_cell("%casa_cluster status"),
            nbformat.v4.new_code_cell("raise ValueError('boom in the demo')"),
            nbformat.v4.new_code_cell("print('never run')"),
        ],
        metadata={"kernelspec": {"name": "casa-mpi", "display_name": "CASA (MPI)"}},
    )
    monkeypatch.setattr(demo_runner, "read_notebook", lambda name=None: nb)
    with pytest.raises(demo_runner.DemoError) as info:
        demo_runner.run(str(tmp_path), nprocs=3, timeout=120)
    error = info.value
    assert error.cell == 4 and error.ename == "ValueError"
    assert "cell 4" in str(error) and "ValueError: boom in the demo" in str(error)
    assert str(tmp_path / demo_runner.KERNEL_LOG_NAME) in str(error)

    executed = executed_notebook(tmp_path)  # written also on failure
    assert executed.cells[3].outputs[0]["output_type"] == "error"
    assert executed.cells[4].outputs == []
    kernel_pid = int(executed.cells[1].outputs[0]["text"])
    assert_kernel_and_cluster_gone(kernel_pid)


def test_cli_demo_bad_nprocs_is_a_usage_error(tmp_path: Path) -> None:
    from casa_kernel.cli import main

    assert main(["demo", "-n", "1", "--workdir", str(tmp_path / "w")]) == 2
    assert not (tmp_path / "w").exists()
