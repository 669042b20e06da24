"""A casatasks release newer than every one the kernel has read: it runs.

A real kernel with 2 real servers sees casatasks as release 6.8.0.1 (a
``casatasks-6.8.0.1.dist-info`` first on PYTHONPATH: importlib.metadata finds it
before the real one, whose code is imported as usual). The kernel scans the
installed casatasks at start-up (the contract test's scan, casa/contract.py),
tells the first cell that reaches CASA's parallel layer, and serves it. When the
scan finds a name the kernel does not serve (here: put in the scan's cache, which
the kernel trusts), CASA's tasks run serially, the cell names file:line and the
name, and the results are serial's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from kernels import execute, kernel_env, make_mms, running_kernel

NEWER = "6.8.0.1"


@pytest.fixture(scope="module")
def data(tmp_path_factory, casa_env):
    root = tmp_path_factory.mktemp("unread-release")
    ms, mms = make_mms(root, "obs", nant=6, nchan=8, nint=20, nscans=2)
    overlay = root / "overlay" / f"casatasks-{NEWER}.dist-info"
    overlay.mkdir(parents=True)
    (overlay / "METADATA").write_text(f"Metadata-Version: 2.1\nName: casatasks\nVersion: {NEWER}\n")
    return root, ms, mms


def _env(root: Path, cache: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, (str(root / "overlay"), os.environ.get("PYTHONPATH"))))
    return kernel_env(CASA_KERNEL_NPROCS="3", PYTHONPATH=path, XDG_CACHE_HOME=str(cache))


def _serial_summary(ms: str, tmp: Path) -> dict:
    from casatasks import flagdata

    copy = shutil.copytree(ms, tmp / "serial.ms", symlinks=True)
    flagdata(vis=str(copy), mode="rflag", flagbackup=False)
    return flagdata(vis=str(copy), mode="summary")


def _rflag_in_kernel(kc, mms: str, tmp: Path, casa_env) -> tuple[dict, str, list[str]]:
    """rflag then summary on a copy of the Multi-MS in the kernel: (summary,
    the first cell's stderr, the servers' logs that name its sub-MSs)."""
    copy = shutil.copytree(mms, tmp / "k.mms", symlinks=True)
    logs = Path(casa_env["CASA_KERNEL_LOG_DIR"])
    before = {p: p.stat().st_size for p in logs.glob("casa-*-rank*.log")}
    reply = execute(kc, f"flagdata(vis={str(copy)!r}, mode='rflag', flagbackup=False)")
    assert reply.status == "ok", reply.error
    summary = execute(
        kc, f"import json; print(json.dumps(flagdata(vis={str(copy)!r}, mode='summary')))"
    )
    assert summary.status == "ok", summary.error
    on_servers = [
        log.name
        for log in logs.glob("casa-*-rank*.log")
        if "k.mms/SUBMSS" in log.read_text(errors="replace")[before.get(log, 0) :]
    ]
    return json.loads(summary.stdout), reply.stderr, on_servers


def test_newer_release_is_scanned_told_and_served(data, tmp_path, casa_env):
    root, ms, mms = data
    serial = _serial_summary(ms, tmp_path)
    with running_kernel(_env(root, tmp_path / "cache"), cwd=str(root)) as (_km, kc):
        seen = execute(kc, "from casa_kernel.casa import private; print(private.CASATASKS_VERSION)")
        assert seen.stdout.strip() == NEWER
        parallel, stderr, on_servers = _rflag_in_kernel(kc, mms, tmp_path, casa_env)
    assert f"casatasks {NEWER} is newer than the releases casa-kernel was read" in stderr
    assert "every one is served" in stderr
    assert len(on_servers) == 2, on_servers
    for key in ("flagged", "total", "antenna", "spw", "scan"):
        assert parallel[key] == serial[key], key
    # the scan was kept for the next start (one file per release and install path)
    assert list((tmp_path / "cache" / "casa-kernel" / "contract").glob(f"casatasks-{NEWER}-*"))


def test_newer_release_using_an_unserved_name_runs_serially_and_says_where(
    data, tmp_path, casa_env
):
    import casatasks

    from casa_kernel.casa import contract

    root, ms, mms = data
    serial = _serial_summary(ms, tmp_path)
    cache_dir = tmp_path / "cache" / "casa-kernel" / "contract"
    package = Path(casatasks.__file__).parent
    contract.cached_scan(package, NEWER, cache_dir)  # the kernel's scan of this install...
    (cache_file,) = cache_dir.glob(f"casatasks-{NEWER}-*.json")
    rows = json.loads(cache_file.read_text())
    rows.append(["core", "pgc_async", "private/task_tclean.py", 999])  # ...and a new name
    cache_file.write_text(json.dumps(rows))
    with running_kernel(_env(root, tmp_path / "cache"), cwd=str(root)) as (_km, kc):
        parallel, stderr, on_servers = _rflag_in_kernel(kc, mms, tmp_path, casa_env)
        image = execute(
            kc,
            "tclean(vis='obs.ms', imagename='q', imsize=32, cell='16arcsec', niter=0, "
            "parallel=True)",
        )
    assert "casatasks/private/task_tclean.py:999: core pgc_async: not served" in stderr
    assert "CASA's parallel tasks run serially in the kernel" in stderr
    assert on_servers == []
    for key in ("flagged", "total", "antenna", "spw", "scan"):
        assert parallel[key] == serial[key], key
    assert image.status == "ok", image.error
    assert "tclean: parallel=True runs serially" in image.stderr
    assert (root / "q.image").is_dir()
