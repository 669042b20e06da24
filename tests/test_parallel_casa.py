"""Real CASA tasks on the servers of a real kernel, compared with serial casatasks.

The kernel and its servers run casatasks per sub-MS; the test process runs the
same task serially on the original MS, and the results must be equal.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from kernels import execute, kernel_env, make_mms, running_kernel


def _copy(src: str, dst: Path) -> str:
    shutil.copytree(src, dst, symlinks=True)
    return str(dst)


def _checksum(path: str) -> str:
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            if name == "table.lock":  # CASA rewrites lock files on read
                continue
            digest.update(full[len(path) :].encode())
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def _json(kc, expression: str):
    reply = execute(kc, f"import json; print(json.dumps({expression}))")
    assert reply.status == "ok", reply.traceback
    return json.loads(reply.stdout)


@pytest.fixture(scope="module")
def data(tmp_path_factory, casa_env):
    """A small MS (4 (scan, spw) pairs) and its 4-sub-MS Multi-MS."""
    root = tmp_path_factory.mktemp("parallel-casa")
    ms, mms = make_mms(root, "obs", nant=6, nchan=16, nint=40, nscans=2)
    return root, ms, mms


@pytest.fixture(scope="module")
def kernel(data):
    root = data[0]
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3"), cwd=str(root)) as (km, kc):
        reply = execute(kc, "%casa_cluster status")
        assert reply.status == "ok", reply.error
        yield kc


@pytest.mark.second_release
def test_per_submms_summary_equals_serial(data, kernel, tmp_path):
    from casatasks import flagdata

    _, ms, mms = data
    ms2, mms2 = _copy(ms, tmp_path / "a.ms"), _copy(mms, tmp_path / "a.mms")
    for vis in (ms2, mms2):  # the same manual flags on both, serially
        flagdata(vis=vis, mode="manual", antenna="ea01", flagbackup=False)
        flagdata(vis=vis, mode="manual", scan="1", spw="1:0~3", flagbackup=False)
    serial = flagdata(vis=ms2, mode="summary")
    assert 0 < serial["flagged"] < serial["total"]

    reply = execute(
        kernel, f"%%casa_parallel --vis {mms2} --out summ\nflagdata(vis=vis, mode='summary')"
    )
    assert reply.status == "ok", reply.error
    merged = _json(kernel, "summ")
    per = _json(kernel, "summ_per_submms")
    assert len(per) == 4
    for key in ("total", "flagged"):
        assert merged[key] == serial[key]
    for axis in ("antenna", "spw", "scan", "correlation", "field"):
        assert merged[axis] == serial[axis], axis


@pytest.mark.second_release
def test_transparent_rflag_equals_serial_and_runs_on_servers(data, kernel, tmp_path, casa_env):
    from casatasks import flagdata

    _, ms, mms = data
    ms2, mms2 = _copy(ms, tmp_path / "r.ms"), _copy(mms, tmp_path / "r.mms")
    flagdata(vis=ms2, mode="rflag", flagbackup=False)
    serial = flagdata(vis=ms2, mode="summary")
    assert serial["flagged"] > 0

    logs = Path(casa_env["CASA_KERNEL_LOG_DIR"])
    before = {p: p.stat().st_size for p in logs.glob("casa-*-rank*.log")}
    reply = execute(kernel, f"flagdata(vis={mms2!r}, mode='rflag', flagbackup=False)")
    assert reply.status == "ok", reply.error
    parallel = _json(kernel, f"flagdata(vis={mms2!r}, mode='summary')")
    for axis in ("antenna", "spw", "scan", "correlation"):
        assert parallel[axis] == serial[axis], axis
    assert parallel["flagged"] == serial["flagged"]

    # The rflag jobs ran on the servers: both servers' logs name sub-MSs of r.mms.
    grown = []
    for log in logs.glob("casa-*-rank*.log"):
        text = log.read_text(errors="replace")[before.get(log, 0) :]
        if "r.mms/SUBMSS" in text and "rflag" in text:
            grown.append(log.name)
    assert len(grown) == 2, grown


def _table_digest(path: str) -> tuple[int, float, list]:
    from casatools import table

    tb = table()
    tb.open(path)
    try:
        rows = tb.nrows()
        data = tb.getcol("DATA")
        keys = sorted(zip(tb.getcol("TIME").round(3), tb.getcol("ANTENNA1"), tb.getcol("ANTENNA2")))
        return rows, float(np.abs(data).sum()), [tuple(map(float, k)) for k in keys]
    finally:
        tb.close()


def test_transparent_split_gives_the_serial_rows_and_data(data, kernel, tmp_path):
    from casatasks import split

    root, ms, mms = data
    serial_out = str(tmp_path / "serial.ms")
    split(vis=ms, outputvis=serial_out, spw="0", datacolumn="data")
    out = str(tmp_path / "target.mms")
    reply = execute(kernel, f"split(vis={mms!r}, outputvis={out!r}, spw='0', datacolumn='data')")
    assert reply.status == "ok", reply.error
    assert os.path.isdir(os.path.join(out, "SUBMSS"))  # a Multi-MS
    rows, total, keys = _table_digest(out)
    s_rows, s_total, s_keys = _table_digest(serial_out)
    assert rows == s_rows > 0
    assert keys == s_keys
    assert total == pytest.approx(s_total, rel=1e-6)


def test_cell_failing_on_one_submms_names_it_and_keeps_the_rest(data, kernel):
    _, _, mms = data
    cell = (
        f"%%casa_parallel --vis {mms} --out part\n"
        "if vis.endswith('.0002.ms'):\n"
        "    raise ValueError('bad sub-MS')\n"
        "flagdata(vis=vis, mode='summary')['total']"
    )
    reply = execute(kernel, cell)
    assert reply.status == "error"
    assert reply.ename == "RemoteError"
    assert "obs.mms.0002.ms" in reply.evalue
    assert "ValueError: bad sub-MS" in reply.evalue
    assert "server rank" in reply.evalue
    per = _json(kernel, "part_per_submms")
    assert len(per) == 3 and not any(k.endswith(".0002.ms") for k in per)
    assert all(v > 0 for v in per.values())


def test_failed_split_leaves_no_output_and_input_unchanged(data, kernel, tmp_path):
    _, _, mms = data
    broken = _copy(mms, tmp_path / "broken.mms")
    # Lose the DATA column's storage of one sub-MS: its split fails on a server
    # while the Multi-MS still opens on the client.
    sub = sorted(Path(broken, "SUBMSS").iterdir())[1]
    data_files = [p for p in sub.glob("table.f*_TSM*")]
    assert data_files
    for p in data_files:
        p.unlink()
    before = _checksum(broken)
    out = str(tmp_path / "out.mms")
    reply = execute(kernel, f"split(vis={broken!r}, outputvis={out!r}, spw='0', datacolumn='data')")
    assert reply.status == "error", reply.result
    assert sub.name in reply.error
    assert not os.path.exists(out)
    assert _checksum(broken) == before


def test_not_a_multims_is_refused_with_a_clear_error(data, kernel):
    _, ms, _ = data
    reply = execute(kernel, f"%%casa_parallel --vis {ms}\nvis")
    assert reply.status == "error"
    assert "not a Multi-MS" in reply.error and "obs.ms" in reply.error
    reply = execute(kernel, "%%casa_parallel --vis nowhere.mms\nvis")
    assert reply.status == "error" and "nowhere.mms" in reply.error


def _column_digest(path: str, column: str) -> tuple[int, float]:
    from casatools import table

    tb = table()
    tb.open(path)
    try:
        return tb.nrows(), float(np.abs(tb.getcol(column)).sum())
    finally:
        tb.close()


@pytest.mark.parametrize(
    "task, kwargs",
    [
        ("hanningsmooth", {"datacolumn": "data"}),
        ("mstransform", {"datacolumn": "data", "chanaverage": True, "chanbin": 2}),
    ],
)
def test_transparent_output_tasks_equal_serial(data, kernel, tmp_path, task, kwargs):
    import casatasks

    _, ms, mms = data
    serial_out = str(tmp_path / "serial.ms")
    getattr(casatasks, task)(vis=ms, outputvis=serial_out, **kwargs)
    out = str(tmp_path / "parallel.mms")
    reply = execute(kernel, f"{task}(vis={mms!r}, outputvis={out!r}, **{kwargs!r})")
    assert reply.status == "ok", reply.error
    assert os.path.isdir(os.path.join(out, "SUBMSS"))
    rows, total, keys = _table_digest(out)
    s_rows, s_total, s_keys = _table_digest(serial_out)
    assert rows == s_rows > 0 and keys == s_keys
    assert total == pytest.approx(s_total, rel=1e-5)


@pytest.mark.second_release
def test_transparent_setjy_and_applycal_equal_serial(data, kernel, tmp_path):
    from casatasks import applycal, gaincal, setjy

    _, ms, mms = data
    ms2, mms2 = _copy(ms, tmp_path / "c.ms"), _copy(mms, tmp_path / "c.mms")
    manual = {"standard": "manual", "fluxdensity": [1.7, 0, 0, 0], "usescratch": True}
    setjy(vis=ms2, **manual)
    reply = execute(kernel, f"setjy(vis={mms2!r}, **{manual!r})")
    assert reply.status == "ok", reply.error
    assert _column_digest(mms2, "MODEL_DATA") == pytest.approx(_column_digest(ms2, "MODEL_DATA"))

    caltable = str(tmp_path / "phase.G")
    gaincal(vis=ms2, caltable=caltable, solint="int", refant="ea01", calmode="p")
    assert os.path.isdir(caltable)
    applycal(vis=ms2, gaintable=[caltable], flagbackup=False)
    reply = execute(kernel, f"applycal(vis={mms2!r}, gaintable=[{caltable!r}], flagbackup=False)")
    assert reply.status == "ok", reply.error
    rows, corrected = _column_digest(mms2, "CORRECTED_DATA")
    s_rows, s_corrected = _column_digest(ms2, "CORRECTED_DATA")
    assert rows == s_rows and corrected == pytest.approx(s_corrected, rel=1e-6)
    assert corrected != pytest.approx(_column_digest(ms2, "DATA")[1], rel=1e-9)


def test_without_a_cluster_the_same_call_runs_serially(data, kernel, tmp_path):
    from casatasks import flagdata

    _, ms, mms = data
    mms2 = _copy(mms, tmp_path / "s.mms")
    expected = flagdata(vis=ms, mode="summary")
    assert execute(kernel, "%casa_cluster stop").status == "ok"
    try:
        got = _json(kernel, f"flagdata(vis={mms2!r}, mode='summary')")
        assert got["total"] == expected["total"] and got["spw"] == expected["spw"]
        reply = execute(kernel, "%%casa_parallel\nrank")
        assert reply.status == "error" and "no cluster is running" in reply.error
    finally:
        reply = execute(kernel, "%casa_cluster start -n 3")
        assert reply.status == "ok", reply.error


def test_server_casa_warnings_reach_the_notebook(data, kernel):
    _, _, mms = data
    cell = (
        f"%%casa_parallel --vis {mms}\n"
        "from casatasks import casalog\n"
        "casalog.post('careful: ' + vis[-7:], 'WARN')\n"
        "casalog.post('quiet info line', 'INFO')"
    )
    reply = execute(kernel, cell)
    assert reply.status == "ok", reply.error
    assert reply.stderr.count("careful: ") == 4
    assert "quiet info line" not in reply.stderr
    assert "@" in reply.stderr.split("careful")[0]  # marked with rank@host
