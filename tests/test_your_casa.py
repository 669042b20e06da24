"""The CASA a user already has: casampi beside casatasks, a server that cannot
import CASA, scripts written for mpicasa.

Real kernels, real mpiexec, real casatasks. .ci/run also runs this file in a
venv that has casampi 0.6.0 installed (the one that sets up MPI under mpi4py 4
and, unhidden, makes ``import casatasks`` a server loop on every rank but 0).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest
from kernels import execute, kernel_env, running_kernel

# Where casampi is installed, what casatasks' import would load of it.
CASAMPI_SERVER_LOOP = "casampi.private.start_mpi"


# .ci/run's venv with casampi says which release it installed: the tests then
# check it is what the kernel and its servers can import.
EXPECT_CASAMPI = os.environ.get("EXPECT_CASAMPI", "")
VERSION_OF_CASAMPI = (
    "import importlib.metadata as m\n"
    "try:\n    v = m.version('casampi')\nexcept m.PackageNotFoundError:\n    v = ''\n"
)


def _casampi_installed() -> str:
    try:
        return importlib.metadata.version("casampi")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _json(kc, expression: str):
    reply = execute(kc, f"import json, sys; print(json.dumps({expression}))")
    assert reply.status == "ok", reply.error + reply.traceback
    return json.loads(reply.stdout)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory, casa_env):
    root = tmp_path_factory.mktemp("your-casa")
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3"), cwd=str(root)) as (km, kc):
        reply = execute(kc, "%casa_cluster status")
        assert reply.status == "ok", reply.error
        kc.root = root
        yield kc


def test_no_casampi_is_set_up_in_the_kernel_or_on_the_servers(kernel, tiny_mms):
    print(f"casampi installed: {_casampi_installed() or 'no'}")
    if EXPECT_CASAMPI:
        assert _casampi_installed() == EXPECT_CASAMPI
        reply = execute(kernel, f"%%casa_parallel\n{VERSION_OF_CASAMPI}v")
        assert reply.result == f"[{EXPECT_CASAMPI!r}, {EXPECT_CASAMPI!r}]", reply.error
    mms = shutil.copytree(tiny_mms, kernel.root / "probe.mms", symlinks=True)
    # a task on every server: casatasks is imported there
    reply = execute(kernel, f"flagdata(vis={str(mms)!r}, mode='summary')['total']")
    assert reply.status == "ok", reply.error
    # the kernel: only its stand-in (no file), casampi's server side never imported
    kernel_side = _json(
        kernel,
        "sorted((m, getattr(sys.modules[m], '__file__', None)) for m in sys.modules "
        "if m.startswith('casampi'))",
    )
    assert [name for name, _ in kernel_side] == [
        "casampi",
        "casampi.MPICommandClient",
        "casampi.MPIEnvironment",
        "casampi.MPIInterface",
    ]
    assert all(file is None for _, file in kernel_side), kernel_side
    # the servers: casampi hidden (None), nothing of it loaded, casatasks loaded
    reply = execute(
        kernel,
        "%%casa_parallel\nimport sys\n"
        "(repr(sys.modules.get('casampi', 'absent')), "
        "sorted(m for m in sys.modules if m.startswith('casampi.')), 'casatasks' in sys.modules)",
    )
    assert reply.status == "ok", reply.error
    assert reply.result == "[('None', [], True), ('None', [], True)]", reply.result
    assert CASAMPI_SERVER_LOOP not in reply.result


def test_from_casatasks_import_gives_the_notebooks_tasks(kernel):
    """`from casatasks import *` / `import tclean` / `casatasks.X`: the same objects
    the kernel put in the notebook (same routes, same clean-up of failed outputs)."""
    reply = execute(
        kernel,
        "import casatasks\n"
        "from casatasks import tclean as t1, flagdata as f1\n"
        "from casatasks.split import split as s1\n"
        "ns = {}\n"
        "exec('from casatasks import *', ns)\n"
        "from casa_kernel.casa.tasks import CasaTask, routes\n"
        "print([type(x).__name__ for x in (t1, f1, ns['split'], casatasks.applycal, s1)], "
        "t1.name, 'tclean' in routes, t1 is casatasks.tclean, casatasks.casalog is not None)",
    )
    assert reply.status == "ok", reply.error + reply.traceback
    assert reply.stdout.split() == [
        "['CasaTask',",
        "'CasaTask',",
        "'CasaTask',",
        "'CasaTask',",
        "'CasaTask']",
        "tclean",
        "True",
        "True",
        "True",
    ], reply.stdout


def test_mpicasa_script_runs_unchanged_in_parallel_equal_to_serial(
    kernel, tiny_ms, tiny_mms, casa_env
):
    """A script written for `mpicasa -n 3 casa -c flag.py`, run with %run: its
    flagdata calls go to the servers per sub-MS; the flags equal serial CASA's."""
    from casatasks import flagdata

    root = kernel.root
    ms = shutil.copytree(tiny_ms, root / "script.ms")
    shutil.copytree(tiny_mms, root / "script.mms", symlinks=True)
    (root / "flag.py").write_text(
        textwrap.dedent(
            """\
            # written for mpicasa: mpicasa -n 3 casa -c flag.py
            from casatasks import *

            flagdata(vis='script.mms', mode='manual', antenna='0&1', flagbackup=False)
            flagdata(vis='script.mms', mode='clip', clipminmax=[0.0, 2.0], flagbackup=False)
            summary = flagdata(vis='script.mms', mode='summary')
            print('FLAGGED', summary['flagged'], 'OF', summary['total'])
            """
        )
    )
    flagdata(vis=str(ms), mode="manual", antenna="0&1", flagbackup=False)
    flagdata(vis=str(ms), mode="clip", clipminmax=[0.0, 2.0], flagbackup=False)
    serial = flagdata(vis=str(ms), mode="summary")
    assert 0 < serial["flagged"] < serial["total"]

    logs = Path(casa_env["CASA_KERNEL_LOG_DIR"])
    before = {p: p.stat().st_size for p in logs.glob("casa-*-rank*.log")}
    reply = execute(kernel, "%run flag.py")
    assert reply.status == "ok", reply.error + reply.traceback
    assert f"FLAGGED {serial['flagged']} OF {serial['total']}" in reply.stdout, reply.stdout
    parallel = _json(kernel, "summary")
    for axis in ("antenna", "spw", "scan", "correlation"):
        assert parallel[axis] == serial[axis], axis
    # each call showed the per-sub-MS progress of a parallel task
    finals = [c["data"]["text/plain"] for k, c in reply.display_messages()]
    assert sum(f.startswith("casa-kernel: flagdata: 4/4 sub-MS in ") for f in finals) >= 3, finals
    # and the jobs ran on both servers: their CASA logs name sub-MSs of script.mms
    grown = [
        log.name
        for log in logs.glob("casa-*-rank*.log")
        if "script.mms/SUBMSS" in log.read_text(errors="replace")[before.get(log, 0) :]
    ]
    assert len(grown) == 2, grown


# -- a server that cannot import CASA ---------------------------------------------

# On server rank 1 only (world rank 2: world rank 0 is CASA's cube client),
# `import casatasks` raises or never returns: a broken installation on one node.
# Loaded by every Python process of the kernel through PYTHONPATH; inert in the
# kernel (not an MPI rank).
SITECUSTOMIZE = """\
import importlib.abc, importlib.machinery, os, sys, time

class _BrokenCasa(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name != "casatasks" or os.environ.get("OMPI_COMM_WORLD_RANK") != "2":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        spec.loader = self  # found where it is installed; its import breaks
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        if {mode!r} == "hang":
            while True:
                time.sleep(3600)
        raise ImportError("casatasks is broken on this node (a test's sitecustomize)")

sys.meta_path.insert(0, _BrokenCasa())
"""
# the hang is reported at the cluster's start_timeout after the server's setup
START_TIMEOUT = "30"  # 10x a healthy server's import of CASA here, under load too


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("raise", "import casatasks failed: ImportError: casatasks is broken on this node"),
        ("hang", f"import casatasks did not finish within {START_TIMEOUT} s"),
    ],
)
def test_server_that_cannot_import_casa_is_named_with_the_reason(tmp_path, tiny_mms, mode, reason):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(mode=mode))
    mms = shutil.copytree(tiny_mms, tmp_path / "broken.mms", symlinks=True)
    env = kernel_env(
        CASA_KERNEL_NPROCS="3", CASA_KERNEL_START_TIMEOUT=START_TIMEOUT, PYTHONPATH=str(site)
    )
    with running_kernel(env, cwd=str(tmp_path)) as (km, kc):
        reply = execute(kc, "%casa_cluster status")
        assert reply.status == "ok", reply.error
        reply = execute(kc, f"flagdata(vis={str(mms)!r}, mode='summary')", timeout=300)
        assert reply.status == "error"
        print(reply.evalue)  # what the user reads (pytest -s)
        assert "rank 1 on " in reply.evalue, reply.evalue
        assert reason in reply.evalue, reply.evalue
        if mode == "hang":  # where it is stuck: the test's endless sleep
            assert "sitecustomize.py" in reply.evalue, reply.evalue
        assert "rank 0 on " not in reply.evalue, reply.evalue  # the healthy server worked
        # the kernel still answers, and the healthy server still runs tasks
        reply = execute(kc, "%%casa_parallel\nrank")
        assert reply.status == "ok" and reply.result == "[0, 1]", reply.error
