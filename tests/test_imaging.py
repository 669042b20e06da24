"""tclean in parallel from a real kernel with 2 real servers, compared with serial.

The kernel images a small simulated MS (mfs with ``parallel=True``: CASA's
PyParallelContSynthesisImager gridding on the servers; cubes: CASA's C++
channel parallelism with its client on server rank 0); the test process runs
the same call serially. Every product must be within 1e-3 of serial's peak,
pixel by pixel, and the return dictionary must be serial's.
"""

from __future__ import annotations

import ast
import glob
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from kernels import execute, kernel_env, kernel_pid, running_kernel

PRODUCTS = (".image", ".residual", ".model", ".psf", ".pb", ".sumwt", ".mask")
LAST: dict[str, object] = {}  # the kernel's last reply (progress lines in its stderr)
DIFFS: dict[str, dict[str, float]] = {}  # per case and product, printed by -s
COMMON = dict(imsize=64, cell="16arcsec", gridder="standard", threshold="0mJy")


@pytest.fixture(scope="module")
def root(tmp_path_factory, casa_env):
    from casa_kernel.casa.simulate import simulate_ms

    root = tmp_path_factory.mktemp("imaging")
    simulate_ms(root / "obs.ms", nant=8, nchan=8, nint=40, nscans=2)
    return root


@pytest.fixture(scope="module")
def kernel(root):
    # the default: 2 servers and CASA's cube client (issue 20: a cube gets 2
    # workers, as under mpicasa -n 3)
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3"), cwd=str(root)) as (km, kc):
        kc.km = km
        reply = execute(kc, "%casa_cluster status")
        assert reply.status == "ok", reply.error
        yield kc


def _serial(root: Path, imagename: str, **params) -> dict:
    from casatasks import tclean

    params.pop("parallel", None)  # plain CASA: parallel=True is a NameError there
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return tclean(vis="obs.ms", imagename=imagename, **params)
    finally:
        os.chdir(cwd)


def _in_kernel(kc, imagename: str, **params) -> dict:
    return _call_in_kernel(kc, "tclean", vis="obs.ms", imagename=imagename, **params)


def _call_in_kernel(kc, task: str, **params) -> dict:
    args = ", ".join(f"{k}={v!r}" for k, v in params.items())
    reply = execute(
        kc,
        f"_r = {task}({args})\n"
        "import pickle, base64\n"
        "print('RET', base64.b64encode(pickle.dumps(_r)).decode())",
        timeout=300,
    )
    assert reply.status == "ok", reply.error + reply.traceback
    LAST["reply"] = reply
    import base64
    import pickle

    encoded = re.search(r"RET (\S+)", reply.stdout).group(1)
    return pickle.loads(base64.b64decode(encoded))


def _pixels(path: str) -> np.ndarray:
    from casatools import image

    ia = image()
    ia.open(path)
    try:
        return ia.getchunk()
    finally:
        ia.close()


def _kind(ext: str) -> str:
    """A product's kind: '.image.tt1' (mtmfs Taylor term) -> '.image'."""
    return re.sub(r"\.tt\d+$", "", ext)


def assert_products_equal(
    root: Path,
    serial: str,
    parallel: str,
    mask_pixels_may_differ: float = 0.0,
    required: tuple[str, ...] = (".image", ".residual", ".psf", ".pb", ".sumwt"),
    exact: bool = False,
) -> None:
    """Every product of ``parallel`` equals ``serial``'s within 1e-3 of the serial
    peak, or bit for bit when ``exact`` (cubes: CASA's C++ channel parallelism
    runs serial's arithmetic per channel); an auto-multithresh mask may differ in
    ``mask_pixels_may_differ`` of its pixels."""
    names = {os.path.basename(p)[len(serial) :] for p in glob.glob(str(root / serial) + ".*")}
    assert set(required) <= names, names
    theirs = {os.path.basename(p)[len(parallel) :] for p in glob.glob(str(root / parallel) + ".*")}
    # CASA's parallel imager keeps the summed weight grid for restarts (briggs,
    # uniform): <name>.gridwt_temp, as under mpicasa; serial has no such file
    assert theirs - {".gridwt_temp"} == names
    # required[0]: the restored image, whose peak is "the serial peak"
    image_peak = float(np.abs(_pixels(str(root / (serial + required[0])))).max())
    bad: list[str] = []
    compared = {
        ext
        for ext in names
        if any(_kind(ext).endswith(p) for p in PRODUCTS) or ext.startswith(".alpha")
    }
    for ext in sorted(compared):
        a, b = _pixels(str(root / (serial + ext))), _pixels(str(root / (parallel + ext)))
        assert a.shape == b.shape, ext
        # "the serial peak": the restored image's for the sky-brightness products
        # (a cleaned residual's own peak is near the noise), else the product's own
        own = float(np.abs(a).max())
        sky = _kind(ext).endswith((".residual", ".model"))
        peak = max(image_peak if sky else own, 1e-12)
        worst = float(np.abs(a.astype(float) - b.astype(float)).max())
        DIFFS.setdefault(parallel, {})[ext] = worst / peak
        n = int((np.abs(a.astype(float) - b.astype(float)) > 1e-3 * peak).sum())
        print(f"{parallel}{ext}: max |diff| / peak = {worst / peak:.2e} ({n} pixels over)")
        if _kind(ext).endswith(".mask") and n <= mask_pixels_may_differ * a.size:
            continue
        if exact and worst != 0.0:
            bad.append(f"{ext}: not bit-equal, max |diff| {worst:g} (peak {peak:g})")
        elif worst > 1e-3 * peak:
            bad.append(f"{ext}: max |diff| {worst:g} > 1e-3 x peak {peak:g} at {n} pixels")
    assert not bad, bad


def assert_returns_equal(serial, parallel, scale: float, path: str = "ret") -> None:
    """Same keys, same integers and strings (iterations, cycles, stop code); fluxes
    (peak residuals, thresholds, model flux) within 1e-3 of the image peak."""
    if isinstance(serial, dict):
        assert isinstance(parallel, dict), path
        assert sorted(serial, key=str) == sorted(parallel, key=str), path
        for key in serial:
            assert_returns_equal(serial[key], parallel[key], scale, f"{path}[{key!r}]")
    elif isinstance(serial, (list, tuple, np.ndarray)):
        a, b = np.asarray(serial), np.asarray(parallel)
        assert a.shape == b.shape, path
        if a.dtype.kind in "fc":
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * scale, err_msg=path)
        else:
            assert a.tolist() == b.tolist(), path
    elif isinstance(serial, float):
        assert parallel == pytest.approx(serial, rel=1e-3, abs=1e-3 * scale), path
    else:
        assert serial == parallel, path


def _case(root, kernel, name, mask_pixels_may_differ=0.0, exact=False, **params):
    serial = _serial(root, f"s_{name}", **COMMON, **params)
    parallel = _in_kernel(kernel, f"p_{name}", **COMMON, **params)
    assert_products_equal(root, f"s_{name}", f"p_{name}", mask_pixels_may_differ, exact=exact)
    scale = float(np.abs(_pixels(str(root / f"s_{name}.image"))).max())
    assert_returns_equal(serial, parallel, scale)
    return serial, parallel


@pytest.mark.second_release
def test_mfs_parallel_hogbom_natural_equals_serial(root, kernel):
    serial, _ = _case(
        root, kernel, "mfs", specmode="mfs", niter=60, parallel=True, weighting="natural"
    )
    assert serial["iterdone"] > 0
    assert re.search(r"gridding on rank 0@\S+, rank 1@\S+;", LAST["reply"].stderr)
    # ONE live display for the whole call: the major cycle (client side) and
    # which server grids what, then a summary
    messages = LAST["reply"].display_messages()
    assert messages and messages[0][0] == "display_data", messages
    display_id = messages[0][1]["transient"]["display_id"]
    assert all(c["transient"]["display_id"] == display_id for _, c in messages)
    assert [k for k, _ in messages[1:]] == ["update_display_data"] * (len(messages) - 1)
    states = [c["data"] for _, c in messages]
    shown = [s["text/plain"] for s in states]
    for stage in ("making the psf", "major cycle 1", "major cycle 2"):
        assert any(f"({stage})" in text for text in shown), (stage, shown)
    final = states[-1]["text/plain"]
    assert re.fullmatch(
        r"casa-kernel: tclean on 'p_mfs' \(parallel continuum\): 1/1 call in [\d.]+ s; "
        r"busy: rank 0@\S+ \d+%, rank 1@\S+ \d+%; \d+ major cycles",
        final,
    ), final
    # CASA's parallel imager removed its servers' work folder (the partial images)
    listing = execute(kernel, "import os; print(sorted(os.listdir('.')))").stdout
    assert "p_mfs.image" in listing
    assert "p_mfs.workdirectory" not in listing


def test_continuum_progress_names_each_servers_step():
    """What a server's job reads as in the live table (pure: no servers needed)."""
    from casa_kernel.casampi import imaging as casampi_imaging
    from casa_kernel.client import progress

    with progress.operation("tclean") as op:
        casampi_imaging._note_stage("toolsi.makepsf()")
        assert op.stage == "making the psf"
        casampi_imaging._note_stage("toolsi.executemajorcycle(controls={'lastcycle':False})")
        casampi_imaging._note_stage("casalog.post('node 1 has completed its job')")
        assert op.stage == "major cycle 1"
        work = casampi_imaging._work("toolsi.executemajorcycle(controls={'lastcycle':True})")
        assert work == "major cycle 1: gridding its data partition"
        assert casampi_imaging._work("toolsi.makepb()") == "making the primary beam"
    assert progress.current_operation() is None


def test_mfs_parallel_multiscale_briggs_user_mask_equals_serial(root, kernel):
    _case(
        root,
        kernel,
        "ms",
        specmode="mfs",
        niter=40,
        parallel=True,
        deconvolver="multiscale",
        scales=[0, 3],
        weighting="briggs",
        robust=0.5,
        usemask="user",
        mask="circle[[32pix,32pix],8pix]",
    )


def test_mfs_parallel_restart_without_psf_equals_serial(root, kernel):
    first = dict(specmode="mfs", niter=20, parallel=True)
    _serial(root, "s_rs", **COMMON, **first)
    _in_kernel(kernel, "p_rs", **COMMON, **first)
    again = dict(specmode="mfs", niter=40, parallel=True, calcpsf=False, calcres=False)
    _case(root, kernel, "rs", **again)


MTMFS_PRODUCTS = (
    ".image.tt0",
    ".image.tt1",
    ".residual.tt0",
    ".residual.tt1",
    ".model.tt0",
    ".model.tt1",
    ".psf.tt0",
    ".psf.tt1",
    ".psf.tt2",
    ".pb.tt0",
    ".sumwt.tt0",
    ".sumwt.tt1",
    ".alpha",
    ".alpha.error",
)
# CASA's own parallel mtmfs (mpicasa: casampi, mpiexec -n 3, the same call) differs
# from serial by 1.75e-3 of the tt0 peak in .image.tt1 and 1.72e-3 in .model.tt1
# (partial grids summed in another order, amplified by the Taylor-term solve);
# casa-kernel's equals mpicasa's to 1.4e-6. tt1 is held to that, tt0 to 1e-3.
TT1_TOLERANCE = 2.5e-3


def test_mtmfs_parallel_equals_serial_in_every_taylor_term(root, kernel):
    params = dict(specmode="mfs", deconvolver="mtmfs", nterms=2, niter=60, parallel=True)
    serial = _serial(root, "s_mt", **COMMON, **params)
    parallel = _in_kernel(kernel, "p_mt", **COMMON, **params)
    assert "gridding on rank 0@" in LAST["reply"].stderr
    names = {os.path.basename(p)[len("s_mt") :] for p in glob.glob(str(root / "s_mt.*"))}
    theirs = {os.path.basename(p)[len("p_mt") :] for p in glob.glob(str(root / "p_mt.*"))}
    assert set(MTMFS_PRODUCTS) <= names and theirs == names, (names, theirs)
    tt0 = _pixels(str(root / "s_mt.image.tt0")).astype(float)
    peak = float(np.abs(tt0).max())
    sumwt = float(np.abs(_pixels(str(root / "s_mt.sumwt.tt0"))).max())
    # the spectral index means something where the source is: tt0 above 10 % of peak
    source = np.abs(tt0) > 0.1 * peak
    bad = []
    for ext in MTMFS_PRODUCTS:
        a = _pixels(str(root / f"s_mt{ext}")).astype(float)
        b = _pixels(str(root / f"p_mt{ext}")).astype(float)
        kind = _kind(ext)
        if ext.startswith(".alpha"):  # dimensionless: 1e-2 in the index
            worst, limit = float(np.abs(a - b)[source].max()), 1e-2
        elif kind in (".image", ".residual", ".model"):
            worst = float(np.abs(a - b).max())
            limit = (1e-3 if ext.endswith("tt0") else TT1_TOLERANCE) * peak
        elif kind == ".sumwt":  # tt1's sum cancels to ~0: against tt0's weight
            worst, limit = float(np.abs(a - b).max()), 1e-3 * sumwt
        else:  # psf, pb: their own peak
            worst, limit = float(np.abs(a - b).max()), 1e-3 * float(np.abs(a).max())
        print(f"p_mt{ext}: max |diff| {worst:.3g}, limit {limit:.3g}")
        if worst > limit:
            bad.append(f"{ext}: max |diff| {worst:g} > {limit:g}")
    assert not bad, bad
    assert_returns_equal(serial, parallel, peak)
    assert serial["iterdone"] > 0


def _serial_task(root: Path, task: str, **params) -> dict:
    import casatasks

    cwd = os.getcwd()
    os.chdir(root)
    try:
        return getattr(casatasks, task)(**params)
    finally:
        os.chdir(cwd)


def test_deconvolve_on_a_cube_with_servers_equals_without(root, kernel):
    """CASA parallelises deconvolve on a cube (not mtmfs, not one channel) with
    its C++ channel parallelism; with servers up it must equal the serial call."""
    _serial(root, "dc_in", **COMMON, specmode="cube", spw="0", niter=0)
    for prefix in ("s_dc", "p_dc"):
        for ext in (".psf", ".residual", ".pb"):
            shutil.copytree(root / f"dc_in{ext}", root / f"{prefix}{ext}")
    params = dict(niter=60, deconvolver="hogbom", threshold="0mJy")
    serial = _serial_task(root, "deconvolve", imagename="s_dc", **params)
    parallel = _call_in_kernel(kernel, "deconvolve", imagename="p_dc", **params)
    assert "cube client (world rank 0 on" in LAST["reply"].stderr
    assert_products_equal(
        root, "s_dc", "p_dc", required=(".image", ".residual", ".model"), exact=True
    )
    scale = float(np.abs(_pixels(str(root / "s_dc.image"))).max())
    assert_returns_equal(serial, parallel, scale)


def test_deconvolve_on_one_channel_stays_serial_in_the_kernel(root, kernel):
    """One channel (an mfs image): task_deconvolve does not start its servers,
    under mpicasa either; the kernel runs it itself, equal to serial."""
    _serial(root, "d1_in", **COMMON, specmode="mfs", niter=0)
    for prefix in ("s_d1", "p_d1"):
        for ext in (".psf", ".residual", ".pb"):
            shutil.copytree(root / f"d1_in{ext}", root / f"{prefix}{ext}")
    params = dict(niter=40, deconvolver="hogbom", threshold="0mJy")
    serial = _serial_task(root, "deconvolve", imagename="s_d1", **params)
    parallel = _call_in_kernel(kernel, "deconvolve", imagename="p_d1", **params)
    assert "cube client" not in LAST["reply"].stderr, LAST["reply"].stderr
    assert_products_equal(
        root, "s_d1", "p_d1", required=(".image", ".residual", ".model"), exact=True
    )
    scale = float(np.abs(_pixels(str(root / "s_d1.image"))).max())
    assert_returns_equal(serial, parallel, scale)


def test_sdintimaging_with_servers_equals_without(root, kernel):
    """sdintimaging (here its interferometer-only mode on a cube) goes to CASA's
    C++ channel parallelism whenever servers exist, as under mpicasa."""
    params = dict(COMMON, usedata="int", specmode="cube", spw="0", niter=30, deconvolver="hogbom")
    serial = _serial_task(root, "sdintimaging", vis="obs.ms", imagename="s_sdi", **params)
    parallel = _call_in_kernel(kernel, "sdintimaging", vis="obs.ms", imagename="p_sdi", **params)
    assert "cube client (world rank 0 on" in LAST["reply"].stderr
    images = sorted(os.path.basename(p)[len("s_sdi") :] for p in glob.glob(str(root / "s_sdi.*")))
    main = next(ext for ext in images if ext.endswith(".image"))
    assert_products_equal(root, "s_sdi", "p_sdi", required=(main,), exact=True)
    scale = float(np.abs(_pixels(str(root / f"s_sdi{main}"))).max())
    assert_returns_equal(serial, parallel, scale)


@pytest.mark.second_release
def test_cube_equals_serial_and_servers_share_channels(root, kernel, casa_log_dir):
    serial, _ = _case(
        root, kernel, "cube", exact=True, specmode="cube", spw="0", niter=60, weighting="natural"
    )
    assert serial["iterdone"] > 0
    assert "cube client (world rank 0 on" in LAST["reply"].stderr
    # both servers served CASA's C++ cube client, world rank 0 (initmpi renames
    # their log origin by world rank: server rank R is MPIServer-<R+1>)
    for rank in (0, 1):
        logs = "".join(p.read_text(errors="replace") for p in casa_log_dir.glob(f"*rank{rank}.log"))
        assert f"MPIServer-{rank + 1}" in logs, rank
    # the live display showed each server's step, read from its CASA log
    shown = [c["data"].get("text/html", "") for _, c in LAST["reply"].display_messages()]
    steps = set(
        re.findall(r"major cycle \d|making the psf|minor cycle, channels \d+-\d+", " ".join(shown))
    )
    assert steps, shown[-1]


def test_cube_after_parallel_continuum_on_the_same_servers_equals_serial(root, kernel):
    """When server rank 0 was CASA's cube client, a cube after a parallel
    continuum clean on the same servers put data in an LSRK edge channel serial
    leaves blank (bench MS): the cube client had gridded. CASA's cube client is a
    rank of its own now, which never grids: the same servers image the cube equal
    to serial, none replaced."""
    import ast

    _in_kernel(kernel, "cc_mfs", **dict(COMMON, specmode="mfs", niter=20, parallel=True))
    before = ast.literal_eval(execute(kernel, "%%casa_parallel\nimport os\nos.getpid()").result)
    _case(
        root, kernel, "cc_cube", exact=True, specmode="cube", spw="0", niter=60, weighting="natural"
    )
    assert "starting fresh servers first" not in LAST["reply"].stderr
    after = ast.literal_eval(execute(kernel, "%%casa_parallel\nimport os\nos.getpid()").result)
    assert before == after


def test_mtmfs_via_cube_goes_cpp_parallel_equal_to_serial(root, kernel):
    """specmode='mvc' is a cube to task_tclean (C++ parallel under mpicasa too)."""
    params = dict(specmode="mvc", deconvolver="mtmfs", nterms=2, niter=30, spw="0")
    serial = _serial(root, "s_mvc", **COMMON, **params)
    parallel = _in_kernel(kernel, "p_mvc", **COMMON, **params)
    assert "cube client (world rank 0 on" in LAST["reply"].stderr
    assert_products_equal(root, "s_mvc", "p_mvc", required=(".image.tt0", ".image.tt1"), exact=True)
    scale = float(np.abs(_pixels(str(root / "s_mvc.image.tt0"))).max())
    assert_returns_equal(serial, parallel, scale)


def test_cube_auto_multithresh_briggs_equals_serial(root, kernel):
    serial, _ = _case(
        root,
        kernel,
        "cam",
        specmode="cube",
        spw="0",
        niter=60,
        weighting="briggs",
        robust=0.0,
        usemask="auto-multithresh",
        sidelobethreshold=1.5,
        noisethreshold=3.0,
        # CASA's C++ cube path leaves a final .mask differing from serial's in 13
        # of 32768 pixels here; mpicasa's (casampi, mpiexec -n 3) differs in the
        # same 13; image, residual and model are bit-equal
        mask_pixels_may_differ=1e-3,
        exact=True,
    )
    assert serial["iterdone"] > 0


def test_failure_leaves_no_image_and_names_rank_and_host(root, kernel):
    reply = execute(
        kernel,
        "tclean(vis='missing.ms', imagename='bad', specmode='cube', imsize=32, cell='16arcsec')",
    )
    assert reply.status == "error"
    assert re.search(r"CASA's cube client on \S+", reply.evalue), reply.evalue
    assert "channels of bad" in reply.evalue
    assert not glob.glob(str(root / "bad.*"))


def test_tclean_imported_from_casatasks_sends_a_cube_to_the_servers(root, kernel):
    """A script written for mpicasa says `from casatasks import tclean`: the same
    route as the notebook's tclean (the cube on the servers), equal to serial."""
    reply = execute(kernel, "from casatasks import tclean as mpicasa_tclean")
    assert reply.status == "ok", reply.error
    params = dict(COMMON, specmode="cube", spw="0", niter=30, weighting="natural")
    serial = _serial(root, "s_imported", **params)
    parallel = _call_in_kernel(
        kernel, "mpicasa_tclean", vis="obs.ms", imagename="p_imported", **params
    )
    assert "cube client (world rank 0 on" in LAST["reply"].stderr
    assert_products_equal(root, "s_imported", "p_imported", exact=True)
    scale = float(np.abs(_pixels(str(root / "s_imported.image"))).max())
    assert_returns_equal(serial, parallel, scale)


def test_casatasks_own_tclean_on_a_cube_is_a_clear_error(root, kernel):
    """casatasks' own task object, unrouted (the package's names are the
    notebook's, so only code that kept the original reaches it): a cube then
    says what to call."""
    reply = execute(
        kernel,
        "from casa_kernel.casa.tasks import _originals\n"
        "casa_tclean = _originals['tclean']\n"
        "casa_tclean(vis='obs.ms', imagename='own', specmode='cube', imsize=32, "
        "cell='16arcsec', niter=0)",
    )
    assert reply.status == "error"
    assert "call the notebook's tclean" in reply.evalue, reply.evalue
    # the servers are not left in C++ MPI mode: the next cube works
    _in_kernel(kernel, "after_own", **dict(COMMON, specmode="cube", spw="0", niter=0))


def test_killed_server_during_cube_costs_no_result(root, kernel):
    import ast
    import signal

    params = dict(specmode="cube", spw="0", niter=400, cycleniter=20, imsize=128, cell="8arcsec")
    serial = _serial(root, "s_kill", **dict(COMMON, **params))
    # warm: CASA imported on every server, so the kill lands in the cube itself
    _in_kernel(kernel, "warm_kill", **dict(COMMON, specmode="cube", spw="0", niter=0, imsize=32))
    pids = execute(kernel, "%%casa_parallel\nimport os\nos.getpid()")
    victim = ast.literal_eval(pids.result)[1]
    killer = threading.Timer(1.0, os.kill, (victim, signal.SIGKILL))
    killer.start()
    parallel = _in_kernel(kernel, "p_kill", **dict(COMMON, **params))
    killer.join()
    assert "re-ran" in LAST["reply"].stderr, LAST["reply"].stderr[-2000:]
    assert_products_equal(root, "s_kill", "p_kill", exact=True)
    scale = float(np.abs(_pixels(str(root / "s_kill.image"))).max())
    assert_returns_equal(serial, parallel, scale)


def test_killed_server_during_continuum_costs_no_result(root, kernel):
    """The servers' imagers die with the MPI world: the whole call is re-run."""
    import ast
    import signal

    params = dict(
        specmode="mfs", niter=400, cycleniter=20, imsize=128, cell="8arcsec", parallel=True
    )
    serial = _serial(root, "s_ckill", **dict(COMMON, **params))
    # warm: CASA imported on every server, so the kill lands in the call itself
    _in_kernel(kernel, "warm_ckill", **dict(COMMON, specmode="mfs", niter=0, imsize=32))
    pids = execute(kernel, "%%casa_parallel\nimport os\nos.getpid()")
    victim = ast.literal_eval(pids.result)[1]
    killer = threading.Timer(1.5, os.kill, (victim, signal.SIGKILL))
    killer.start()
    parallel = _in_kernel(kernel, "p_ckill", **dict(COMMON, **params))
    killer.join()
    stderr = LAST["reply"].stderr
    assert "re-ran tclean from the start" in stderr, stderr[-3000:]
    assert_products_equal(root, "s_ckill", "p_ckill")
    scale = float(np.abs(_pixels(str(root / "s_ckill.image"))).max())
    assert_returns_equal(serial, parallel, scale)
    after = ast.literal_eval(execute(kernel, "%%casa_parallel\nimport os\nos.getpid()").result)
    assert victim not in after


LONG_CUBE = dict(
    COMMON,
    imsize=256,
    cell="4arcsec",
    specmode="cube",
    spw="0",
    niter=100000,
    cycleniter=1,
    nsigma=0.0,
)


def test_interrupt_during_cube_stops_every_server_and_leaves_no_image(root, kernel):
    # The servers a killed server's recovery left (the test before): replaced
    # here, so the interrupt finds a cluster as a user's first cube would (CASA's
    # cube client then imports CASA first: the interrupt may land there too).
    reply = execute(kernel, "%casa_cluster restart")
    assert reply.status == "ok", reply.error
    args = ", ".join(f"{k}={v!r}" for k, v in LONG_CUBE.items())
    interrupted: list[float] = []

    def in_the_cube(reply) -> None:
        """Interrupt once the live display shows the workers in the minor cycle:
        the cube itself, whatever the load (a 4 s timer sometimes landed while
        the fresh cube client was still importing CASA or handing out work)."""
        shown = " ".join(c["data"].get("text/html", "") for _, c in reply.display_messages())
        if not interrupted and "minor cycle, channels" in shown:
            interrupted.append(time.monotonic())
            kernel.km.interrupt_kernel()

    reply = execute(
        kernel, f"tclean(vis='obs.ms', imagename='intr', {args})", on_output=in_the_cube
    )
    assert interrupted, "the cube ended without showing its minor cycle"
    elapsed = time.monotonic() - interrupted[0]
    assert reply.status == "error" and reply.ename == "KeyboardInterrupt", reply.error
    assert elapsed < 10, elapsed  # liveness: the servers let go within seconds
    assert not glob.glob(str(root / "intr.*"))
    status = execute(kernel, "%casa_cluster status")
    assert status.result.count("idle") == 3, status.result  # 2 servers, the cube client
    again = execute(kernel, "%%casa_parallel\nrank")
    assert again.status == "ok" and again.result == "[0, 1]", again.error


SHORT_CUBE = dict(COMMON, specmode="cube", spw="0", niter=30)


def _cube_workers(kernel) -> list[int]:
    """The pids of the cube's workers (the servers; CASA's cube client is not one)."""
    pids = execute(kernel, "%%casa_parallel\nimport os\nos.getpid()")
    assert pids.status == "ok", pids.error
    return ast.literal_eval(pids.result)


def test_workers_interrupted_while_a_cube_starts_follow_their_client(root, kernel):
    """The kernel signals the cube client and its workers one after the other: a
    worker may get SIGINT while it waits for the client's word, the client only
    after it said "start". Such a worker still serves the cube (the client ends
    an interrupted cube and releases its workers). It used to raise as soon as
    Python ran again: right after the word "start" (never entering CASA's
    initmpi(): the client waited for it for ever) or after initmpi() (seen here:
    the cube failed with KeyboardInterrupt on both workers though the client was
    never interrupted). Here only the workers get SIGINT, while the fresh cube
    client imports CASA."""
    reply = execute(kernel, "%casa_cluster restart")
    assert reply.status == "ok", reply.error
    workers = _cube_workers(kernel)
    timers: list[threading.Timer] = []

    def when_dispatched(reply) -> None:
        if not timers and "channels gridded by" in reply.stderr:
            for delay in (1.0, 2.0):  # the workers wait: the client imports CASA (~3 s)
                for pid in workers:
                    timers.append(threading.Timer(delay, os.kill, (pid, signal.SIGINT)))
            for timer in timers:
                timer.start()

    args = ", ".join(f"{k}={v!r}" for k, v in SHORT_CUBE.items())
    reply = execute(
        kernel,
        f"tclean(vis='obs.ms', imagename='held', {args})",
        timeout=120,
        on_output=when_dispatched,
    )
    for timer in timers:
        timer.join()
    assert timers, reply.stderr
    assert reply.status == "ok", reply.error + reply.traceback
    assert "new servers" not in reply.stderr, reply.stderr
    assert os.path.isdir(root / "held.image")
    assert _cube_workers(kernel) == workers  # the same servers, none replaced


def test_cube_on_one_server_runs_serially_in_the_kernel_equal_to_serial(root, kernel):
    reply = execute(kernel, "%casa_cluster restart -n 2")
    assert reply.status == "ok", reply.error
    _case(root, kernel, "c1", exact=True, specmode="cube", spw="0", niter=30)
    assert "runs serially in the kernel" in LAST["reply"].stderr
    reply = execute(kernel, "%casa_cluster restart -n 3")
    assert reply.status == "ok", reply.error


def test_serial_mfs_runs_on_a_server_equal_to_serial(root, kernel, casa_log_dir):
    """With servers, a serial tclean runs on one of them, not in the kernel
    (issue 21: a full disk aborts the process that writes an image), with every
    core of its host; the server's OpenMP threads are what they were after it."""
    threads = "%%casa_parallel\nimport casatasks\ncasatasks.casalog.ompGetNumThreads()"
    reply = execute(
        kernel, "%%casa_parallel\nimport casatasks\ncasatasks.casalog.ompSetNumThreads(1)"
    )
    assert reply.status == "ok", reply.error
    serial, _ = _case(root, kernel, "smfs", specmode="mfs", niter=40)
    assert serial["iterdone"] > 0
    assert execute(kernel, threads).result == "[1, 1]"
    pid = kernel_pid(kernel.km)

    def log(role: str) -> str:
        files = casa_log_dir.glob(f"casa-*-kernel{pid}-{role}.log")
        return "".join(p.read_text(errors="replace") for p in files)

    assert "p_smfs" in log("rank0"), log("rank0")[-2000:]
    assert "p_smfs" not in log("client")


def test_parallel_without_servers_runs_serially_with_a_note(root, kernel):
    reply = execute(kernel, "%casa_cluster stop")
    assert reply.status == "ok", reply.error
    shutil.rmtree(root / "q.image", ignore_errors=True)
    reply = execute(
        kernel,
        "r = tclean(vis='obs.ms', imagename='q', imsize=32, cell='16arcsec', niter=0, "
        "parallel=True)",
    )
    assert reply.status == "ok", reply.error
    assert "runs serially" in reply.stderr
    assert (root / "q.image").is_dir()
