"""CASA layer: offline config and log files, log tails, simulated data, merging results.

Real casatools/casatasks 6.7.0.31, serially in this process (plus two short
subprocesses for the log file names), on the session's ``tiny_ms`` / ``tiny_mms``.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from casa_kernel import variables
from casa_kernel.casa.config import (
    SITECONFIG_VAR,
    apply_to_process,
    casa_environment,
    default_log_dir,
    logfile_path,
    packaged_siteconfig,
)
from casa_kernel.casa.logs import LogTail
from casa_kernel.casa.merge import merge_results
from casa_kernel.casa.simulate import expected_rows, simulate_ms

# --------------------------------------------------------------------------- helpers


def assert_same(got: Any, want: Any, where: str = "result") -> None:
    """Nested equality that names the first difference (numpy arrays compared by value)."""
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{where}: {type(got).__name__} instead of a dict"
        assert sorted(got) == sorted(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), f"{where}: {type(got).__name__} instead of array"
        assert got.shape == want.shape and np.array_equal(got, want), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def submss_of(mms: str) -> list[str]:
    import casatools

    ms = casatools.ms()
    try:
        assert ms.open(mms)
        assert ms.ismultims(), f"{mms} is not a Multi-MS"
        return list(ms.getreferencedtables())
    finally:
        ms.close()
        ms.done()


def copy_table(src: str, dst: Path) -> str:
    # Sub-MSs of an MMS share subtables through relative symlinks: keep them links.
    shutil.copytree(src, dst, symlinks=True)
    return str(dst)


def ms_nrow(path: str) -> int:
    import casatools

    ms = casatools.ms()
    try:
        assert ms.open(path)
        return int(ms.nrow())
    finally:
        ms.close()
        ms.done()


def casa_log() -> str:
    from casatasks import casalog

    return casalog.logfile()


# ------------------------------------------------------------------ simulate_ms


def test_tiny_ms_has_the_expected_rows_and_layout(tiny_ms: str) -> None:
    import casatools

    assert os.path.isabs(tiny_ms) and tiny_ms.endswith("tiny.ms")
    # 4 antennas -> 6 baselines, 8 integrations per spw, 2 spws, no autocorrelations.
    assert expected_rows(4, 8) == 96
    assert ms_nrow(tiny_ms) == 96
    msmd = casatools.msmetadata()
    try:
        assert msmd.open(tiny_ms)
        assert list(msmd.antennanames()) == ["ea01", "ea02", "ea03", "ea04"]
        assert msmd.nspw() == 2
        assert [msmd.nchan(spw) for spw in range(2)] == [4, 4]
        assert sorted(msmd.scannumbers()) == [1, 2]
        for scan in (1, 2):  # every scan has both spws: 4 (scan, spw) pairs
            assert sorted(msmd.spwsforscan(scan)) == [0, 1]
        assert msmd.ncorrforpol(0) == 4
    finally:
        msmd.close()
        msmd.done()


def test_simulate_overrides_the_preset(casa_env: dict[str, str], tmp_path: Path) -> None:
    path = simulate_ms(tmp_path / "sub" / "x.ms", size="tiny", nant=5, nint=7, nscans=3)
    assert path == str(tmp_path / "sub" / "x.ms")
    assert ms_nrow(path) == 5 * 4 // 2 * 7 * 2 == expected_rows(5, 7)
    # Only the MS is left in the folder: no temporary build folder, no component list.
    assert os.listdir(tmp_path / "sub") == ["x.ms"]


def test_simulate_refuses_an_existing_path(
    tiny_ms: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from casa_kernel.casa import simulate

    def must_not_run(*args: object) -> None:
        raise AssertionError("simulated before checking the target")

    monkeypatch.setattr(simulate, "_simulate", must_not_run)  # refused up front
    before = sorted(os.listdir(tiny_ms))
    with pytest.raises(FileExistsError, match=f"refusing to overwrite existing path: {tiny_ms}"):
        simulate_ms(tiny_ms, size="tiny")
    assert sorted(os.listdir(tiny_ms)) == before
    assert not [n for n in os.listdir(os.path.dirname(tiny_ms)) if n.startswith(".")]

    (tmp_path / "empty.ms").mkdir()  # os.rename would silently replace an empty dir
    with pytest.raises(FileExistsError, match="empty.ms"):
        simulate_ms(tmp_path / "empty.ms", size="tiny")


def test_failed_simulation_leaves_nothing(
    casa_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from casa_kernel.casa import simulate

    def broken(ms_path: str) -> None:
        assert os.path.isdir(ms_path)  # the half-built MS exists at this point
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(simulate, "_renumber_scans", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        simulate_ms(tmp_path / "half.ms", size="tiny")
    assert os.listdir(tmp_path) == []


def test_simulate_logs_into_the_casa_log_not_stderr(
    casa_env: dict[str, str], tmp_path: Path
) -> None:
    # A fresh process that never imports casatasks (as a notebook cell might).
    log_dir = tmp_path / "logs"
    code = (
        "import sys; from casa_kernel.casa.simulate import simulate_ms; "
        f"simulate_ms({str(tmp_path / 't.ms')!r}, size='tiny'); "
        # Twice: routing the tools' log twice would crash the process.
        f"simulate_ms({str(tmp_path / 'u.ms')!r}, size='tiny'); "
        "assert 'casatasks' not in sys.modules"
    )
    env = {**os.environ, **casa_env, variables.LOG_DIR: str(log_dir)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "\tINFO\t" not in proc.stderr  # only WARN and SEVERE reach the console
    text = Path(logfile_path(str(log_dir))).read_text()
    assert "NewMSSimulator" in text and "componentlist closed" not in text


def test_simulate_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size must be one of tiny, small, medium, large"):
        simulate_ms(tmp_path / "a.ms", size="huge")
    with pytest.raises(ValueError, match="nant"):
        simulate_ms(tmp_path / "a.ms", size="tiny", nant=1)
    with pytest.raises(ValueError, match="nint"):
        simulate_ms(tmp_path / "a.ms", size="tiny", nint=2, nscans=3)
    assert os.listdir(tmp_path) == []


def test_demo_reexports_simulate_ms() -> None:
    import casa_kernel.casa.simulate as demo

    assert demo.simulate_ms is simulate_ms
    assert demo.__all__ == ["simulate_ms"]


# ------------------------------------------------------------------ partition


def test_partition_gives_four_submss(tiny_ms: str, tiny_mms: str) -> None:
    subs = submss_of(tiny_mms)
    assert len(subs) == 4
    assert all(s.startswith(tiny_mms + "/SUBMSS/") for s in subs)
    assert sum(ms_nrow(s) for s in subs) == ms_nrow(tiny_ms) == 96
    assert all(ms_nrow(s) > 0 for s in subs)


# ------------------------------------------------------------------ merge_results on flagdata


@pytest.fixture
def flagged_copies(tiny_ms: str, tiny_mms: str, tmp_path: Path) -> tuple[str, str, list[str]]:
    """Copies of the MS and of the MMS with the same manual flags applied to both.

    Flags: antenna ea01 everywhere, and RR of channels 0-1 of spw 1 in scan 2, so
    the counts differ between antennas, scans, spws and correlations.
    """
    from casatasks import flagdata

    plain = copy_table(tiny_ms, tmp_path / "plain.ms")
    multi = copy_table(tiny_mms, tmp_path / "multi.mms")
    subs = submss_of(multi)
    assert all(s.startswith(multi) for s in subs)  # the copy, not the session's MMS
    selected = 0
    for vis in [plain, *subs]:
        flagdata(vis=vis, mode="manual", antenna="ea01", flagbackup=False)
        try:
            flagdata(
                vis=vis, mode="manual", scan="2", spw="1:0~1", correlation="RR", flagbackup=False
            )
        except RuntimeError as exc:
            # On a sub-MS without scan 2 / spw 1 the selection is empty and flagdata
            # raises; casatasks' own MMS loop ignores exactly this error.
            assert "NullSelection" in str(exc)
        else:
            selected += 1
    assert 1 < selected < 1 + len(subs)  # the plain MS and some sub-MSs, not all
    return plain, multi, subs


def test_merged_flagdata_summary_equals_the_plain_ms(
    flagged_copies: tuple[str, str, list[str]],
) -> None:
    from casatasks import flagdata

    plain, multi, subs = flagged_copies
    per_submms = {s: flagdata(vis=s, mode="summary") for s in subs}
    snapshot = copy.deepcopy(per_submms)
    merged = merge_results(per_submms, "flagdata")
    want = flagdata(vis=plain, mode="summary")

    assert 0 < want["flagged"] < want["total"]  # non-trivial counts
    assert want["antenna"]["ea01"]["flagged"] == want["antenna"]["ea01"]["total"]
    assert want["correlation"]["RR"]["flagged"] > want["correlation"]["LL"]["flagged"]
    assert_same(merged, want)
    assert_same(per_submms, snapshot, "per_submms")  # the caller's dicts are untouched
    # And casatasks' own serial run on the MMS (its ParallelTaskHelper) agrees.
    assert_same(merged, flagdata(vis=multi, mode="summary"))


def test_merged_rflag_equals_the_plain_ms(flagged_copies: tuple[str, str, list[str]]) -> None:
    from casatasks import flagdata
    from casatasks.private.parallel.parallel_task_helper import ParallelTaskHelper

    plain, multi, subs = flagged_copies
    before = flagdata(vis=plain, mode="summary")["flagged"]

    # rflag thresholds from the data (action='calculate'): the report per sub-MS,
    # merged as casatasks merges them (median of the per-sub-MS thresholds).
    reports = {s: flagdata(vis=s, mode="rflag", action="calculate") for s in subs}
    snapshot = copy.deepcopy(reports)
    merged_report = merge_results(reports, "flagdata")
    assert_same(reports, snapshot, "reports")
    report = merged_report["report0"]
    assert report["type"] == "rflag" and report["name"] == "Rflag"
    assert report["freqdev"].shape == report["timedev"].shape == (2, 3)
    assert_same(
        merged_report,
        ParallelTaskHelper.consolidateResults(copy.deepcopy(reports), "flagdata"),
    )
    assert_same(merged_report, flagdata(vis=multi, mode="rflag", action="calculate"))

    # rflag applied: same flags per sub-MS as on the whole MS.
    applied = {s: flagdata(vis=s, mode="rflag", flagbackup=False) for s in subs}
    assert_same(
        merge_results(applied, "flagdata"), flagdata(vis=plain, mode="rflag", flagbackup=False)
    )
    want = flagdata(vis=plain, mode="summary")
    assert want["flagged"] > before  # rflag did flag something
    merged = merge_results({s: flagdata(vis=s, mode="summary") for s in subs}, "flagdata")
    assert_same(merged, want)


# ------------------------------------------------------------------ merge_results, pure


def test_merge_booleans_are_anded(casa_env: dict[str, str]) -> None:
    assert merge_results({"a.ms": True, "b.ms": True}, "t") is True
    assert merge_results({"a.ms": True, "b.ms": False, "c.ms": True}, "t") is False
    assert merge_results({"a.ms": False}, "t") is False
    assert merge_results({"a.ms": np.bool_(True), "b.ms": True}, "t") is True
    assert merge_results({"a.ms": True, "b.ms": np.bool_(False)}, "t") is False


def test_merge_none_empty_and_other_types(casa_env: dict[str, str]) -> None:
    assert merge_results({}, "t") is None
    assert merge_results({"a.ms": None, "b.ms": None}, "t") is None
    # None next to dicts is skipped, as casatasks does.
    assert merge_results({"a.ms": None, "b.ms": {"n": 2}, "c.ms": {"n": 3}}, "t") == {"n": 5}
    for values in (
        {"a.ms": [1, 2], "b.ms": [3]},
        {"a.ms": "x", "b.ms": "y"},
        {"a.ms": 1.5, "b.ms": 2.5},
        {"a.ms": None, "b.ms": True},  # casatasks: None or False, by order
        {"a.ms": True, "b.ms": {"n": 1}},
    ):
        merged = merge_results(values, "t")
        assert merged == values and merged is not values


def test_merge_leaves_the_callers_values_alone(casa_env: dict[str, str]) -> None:
    # casatasks' combine_dictionaries keeps the first sub-MS's lists and arrays as
    # the accumulator and adds the others into them (+=): without copies, the
    # caller's first result would change.
    per_submms = {
        "a.ms": {"n": 1, "amp": np.array([1.0, 2.0]), "ids": [1], "sub": {"k": np.array([1])}},
        "b.ms": {"n": 2, "amp": np.array([10.0, 20.0]), "ids": [2], "sub": {"k": np.array([2])}},
        "c.ms": {"n": 3, "amp": np.array([100.0, 200.0]), "ids": [3], "sub": {"k": np.array([3])}},
    }
    snapshot = copy.deepcopy(per_submms)
    merged = merge_results(per_submms, "t")
    assert_same(
        merged,
        {"n": 6, "amp": np.array([111.0, 222.0]), "ids": [1, 2, 3], "sub": {"k": np.array([6])}},
    )
    assert_same(per_submms, snapshot, "per_submms")
    merged["amp"][0] = -1  # nor is the result tied to them
    assert_same(per_submms, snapshot, "per_submms")


def test_merge_does_not_log_casatasks_debug_warnings(casa_env: dict[str, str]) -> None:
    tail = LogTail(casa_log())
    merge_results({"a.ms": {"flagged": 1.0}, "b.ms": {"flagged": 2.0}}, "flagdata")
    assert not [line for line in tail.read_new() if "consolidateResults, subMS" in line]
    # The bool path keeps casatasks' WARN naming the sub-MS that failed.
    assert merge_results({"good.ms": True, "bad.ms": False}, "flagdata") is False
    warns = tail.read_new()
    assert any("flagdata failed for sub-MS bad.ms" in line for line in warns), warns
    assert not any("good.ms" in line for line in warns)


# ------------------------------------------------------------------ config and log files


def test_log_file_of_this_process_is_the_client_log(casa_log_dir: Path) -> None:
    host = socket.gethostname().split(".")[0]
    assert casa_log() == str(casa_log_dir / f"casa-{host}-client.log")
    assert casa_log() == logfile_path(str(casa_log_dir))
    assert os.path.getsize(casa_log()) > 0
    assert oct(casa_log_dir.stat().st_mode & 0o777) == oct(0o700)


def test_log_files_of_client_and_server_never_in_cwd(
    casa_env: dict[str, str], casa_log_dir: Path, tmp_path: Path
) -> None:
    code = (
        "import casatasks, casaconfig.config as c; "
        "casatasks.casalog.post('hello from the test', 'WARN'); "
        "print(casatasks.casalog.logfile()); print(c.load_success()[-1])"
    )
    procs = {}
    for role, rank_env in (("client", {}), ("server", {"OMPI_COMM_WORLD_RANK": "3"})):
        cwd = tmp_path / role
        cwd.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.endswith("_RANK")}
        env.update(casa_env, **rank_env)
        procs[role] = (
            cwd,
            subprocess.Popen(
                [sys.executable, "-c", code],
                cwd=cwd,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ),
        )
    for role, (cwd, proc) in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        logfile, site = out.split()
        assert site == packaged_siteconfig()
        want = logfile_path(str(casa_log_dir), rank=3 if role == "server" else None)
        assert logfile == want
        assert want.endswith("-rank3.log" if role == "server" else "-client.log")
        assert "hello from the test" in Path(want).read_text()
        assert os.listdir(cwd) == [], f"{role} wrote into its cwd"


def test_site_config_as_casaconfig_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import casadata

    text = Path(packaged_siteconfig()).read_text()

    def run(**env: str) -> dict[str, Any]:
        ranks = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
        for name in (*ranks, variables.LOG_DIR, variables.LOG_TAG):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        namespace: dict[str, Any] = {"logfile": "casa-19700101-000000.log"}  # a default
        exec(text, namespace)  # what casaconfig.config does with it
        return namespace

    host = socket.gethostname().split(".")[0]
    ns = run(CASA_KERNEL_LOG_DIR=str(tmp_path / "logs"))
    assert ns["measurespath"] == casadata.datapath
    assert ns["datapath"] == [casadata.datapath]
    assert ns["measures_auto_update"] is False and ns["data_auto_update"] is False
    assert ns["nologger"] is True and ns["nogui"] is True
    assert ns["logfile"] == str(tmp_path / "logs" / f"casa-{host}-client.log")
    assert (tmp_path / "logs").is_dir()
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"):
        ns = run(CASA_KERNEL_LOG_DIR=str(tmp_path / "logs"), **{var: "7"})
        assert ns["logfile"] == logfile_path(str(tmp_path / "logs"), rank=7)
    # A kernel's tag: its own files, for the kernel and each of its servers.
    ns = run(CASA_KERNEL_LOG_DIR=str(tmp_path / "logs"), CASA_KERNEL_LOG_TAG="kernel42")
    assert ns["logfile"] == str(tmp_path / "logs" / f"casa-{host}-kernel42-client.log")
    ns = run(
        CASA_KERNEL_LOG_DIR=str(tmp_path / "logs"), CASA_KERNEL_LOG_TAG="kernel42", PMI_RANK="3"
    )
    assert ns["logfile"] == logfile_path(str(tmp_path / "logs"), rank=3, tag="kernel42")
    assert ns["logfile"].endswith(f"casa-{host}-kernel42-rank3.log")
    # Without the variable: a per-user folder in the temp dir, not the cwd.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    ns = run()
    assert ns["logfile"] == str(
        tmp_path / "tmp" / f"casa-kernel-{os.getuid()}" / "logs" / f"casa-{host}-client.log"
    )
    # An unusable folder: the temp dir fallback, and the data settings still apply.
    (tmp_path / "file").write_text("")
    ns = run(CASA_KERNEL_LOG_DIR=str(tmp_path / "file" / "logs"))
    assert ns["logfile"].startswith(str(tmp_path / "tmp") + "/")
    assert ns["measurespath"] == casadata.datapath


def test_casa_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SITECONFIG_VAR, raising=False)
    env = casa_environment("relative/logs")
    assert env == {
        SITECONFIG_VAR: packaged_siteconfig(),
        variables.LOG_DIR: os.path.join(os.getcwd(), "relative", "logs"),
    }
    assert os.path.isabs(env[SITECONFIG_VAR]) and os.path.isfile(env[SITECONFIG_VAR])

    mine = tmp_path / "site.py"
    mine.write_text("nogui = True\n")
    monkeypatch.setenv(SITECONFIG_VAR, str(mine))  # the user's: kept
    assert casa_environment(str(tmp_path))[SITECONFIG_VAR] == str(mine)

    monkeypatch.setenv(SITECONFIG_VAR, "site.py")  # casaconfig would ignore it
    with pytest.warns(RuntimeWarning, match="not an absolute path"):
        assert casa_environment(str(tmp_path))[SITECONFIG_VAR] == packaged_siteconfig()


def test_default_log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(variables.LOG_DIR, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    path = default_log_dir()
    assert path == str(tmp_path / "state" / "casa-kernel" / "logs")
    assert os.stat(path).st_mode & 0o777 == 0o700

    monkeypatch.setenv("XDG_STATE_HOME", "relative")  # ignored, per the XDG spec
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_log_dir() == str(tmp_path / "home" / ".local" / "state" / "casa-kernel" / "logs")

    monkeypatch.setenv(variables.LOG_DIR, str(tmp_path / "chosen"))
    assert default_log_dir() == str(tmp_path / "chosen")
    assert os.path.isdir(tmp_path / "chosen")


def test_apply_to_process_warns_when_too_late(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "CASA_KERNEL_TEST_APPLY"
    monkeypatch.setenv(name, "old")  # restored afterwards
    monkeypatch.delitem(sys.modules, "casaconfig.config", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert apply_to_process({name: "early"}) is True
    assert os.environ[name] == "early"
    monkeypatch.setitem(sys.modules, "casaconfig.config", object())
    with pytest.warns(RuntimeWarning, match="already read"):
        assert apply_to_process({name: "late"}) is False
    assert os.environ[name] == "late"  # still set, for child processes


def test_importing_casa_kernel_does_not_load_casatools(casa_env: dict[str, str]) -> None:
    code = (
        "import sys, casa_kernel, casa_kernel.casa.simulate, casa_kernel.casa.config, "
        "casa_kernel.casa.logs, casa_kernel.casa.merge, casa_kernel.casa.simulate; "
        "print(sorted(m for m in sys.modules if m.startswith(('casatools', 'casatasks', "
        "'casaconfig'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ LogTail


def _line(level: str, message: str, origin: str = "flagdata::::casa") -> str:
    return f"2026-11-25 22:01:28\t{level}\t{origin}\t{message}\n"


def test_logtail_returns_only_new_warn_and_severe(tmp_path: Path) -> None:
    log = tmp_path / "casa.log"
    log.write_text(_line("WARN", "old warning") + _line("INFO", "old info"))
    tail = LogTail(log)
    assert tail.read_new() == []  # what was there before is not new

    with log.open("a") as f:
        f.write(_line("INFO", "info"))
        f.write(_line("WARN", "first"))
        f.write(_line("SEVERE", "two\tlines"))  # a tab inside the message
        f.write(_line("SEVERE", "second line", origin="flagdata::::casa+"))
        f.write(_line("INFO1", "detail"))
        f.write(_line("INFO", "continued info", origin="flagdata::::casa+"))
    assert tail.read_new() == [
        _line("WARN", "first").rstrip("\n"),
        _line("SEVERE", "two\tlines").rstrip("\n"),
        _line("SEVERE", "second line", origin="flagdata::::casa+").rstrip("\n"),
    ]
    assert tail.read_new() == []

    with log.open("a") as f:  # a line still being written is left for later
        f.write(_line("WARN", "partial").rstrip("\n"))
    assert tail.read_new() == []
    with log.open("a") as f:
        f.write("\n")
    assert tail.read_new() == [_line("WARN", "partial").rstrip("\n")]

    with log.open("a") as f:
        f.write(_line("INFO", "info only"))
    assert tail.read_new(levels=("INFO",)) == [_line("INFO", "info only").rstrip("\n")]


def test_logtail_ignores_the_leap_second_severe(tmp_path: Path) -> None:
    log = tmp_path / "casa.log"
    tail = LogTail(log)  # no file yet
    assert tail.read_new() == []
    origin = "MeasTable::dUTC(Double) (file MeasTable.cc, line 4290)"
    log.write_text(
        _line("SEVERE", "Leap second table TAI_UTC seems out-of-date.", origin)
        + _line("SEVERE", "Until the table is updated ...", origin + "+")
        + _line("SEVERE", "times ... could be wrong by 1s or more.", origin + "+")
        + _line("SEVERE", "real trouble")
    )
    assert tail.read_new() == [_line("SEVERE", "real trouble").rstrip("\n")]
    assert LogTail(log, from_start=True, ignore=()).read_new()[0].endswith("out-of-date.")


def test_logtail_follows_a_truncated_or_replaced_file(tmp_path: Path) -> None:
    log = tmp_path / "casa.log"
    log.write_text(_line("WARN", "a") * 5)
    tail = LogTail(log)
    log.write_text(_line("WARN", "after truncation"))
    assert tail.read_new() == [_line("WARN", "after truncation").rstrip("\n")]
    replacement = tmp_path / "new.log"
    replacement.write_text(_line("WARN", "rotated") + _line("WARN", "x" * 200))
    os.replace(replacement, log)
    assert [line.split("\t")[3] for line in tail.read_new()] == ["rotated", "x" * 200]


def test_logtail_on_the_real_casa_log(casa_env: dict[str, str]) -> None:
    from casatasks import casalog

    tail = LogTail(casa_log())
    casalog.post("marker info", "INFO", "test_casa")
    casalog.post("marker warn", "WARN", "test_casa")
    casalog.post("marker severe\nsecond line", "SEVERE", "test_casa")
    casalog.post("marker debug", "DEBUG1", "test_casa")
    lines = tail.read_new()
    fields = [line.split("\t") for line in lines]
    # The origin column is "<casalog.origin()>::<origin of the post>::casa".
    assert [(f[1], f[3]) for f in fields] == [
        ("WARN", "marker warn"),
        ("SEVERE", "marker severe"),
        ("SEVERE", "second line"),
    ]
    assert all("::test_casa::" in f[2] for f in fields)
    assert fields[2][2].endswith("+") and not fields[1][2].endswith("+")
    assert tail.read_new() == []
