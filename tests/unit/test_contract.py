"""The contract scan (casa_kernel/casa/contract.py) on small casatasks-like sources,
and the start-up check of a release the kernel has not read (bridge.check_release).

The scan of every real release's wheel is tests/test_casa_releases.py.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from casa_kernel.casa import contract

HELPER = textwrap.dedent(
    """\
    try:
        from casampi.MPIEnvironment import MPIEnvironment
        from casampi.MPICommandClient import MPICommandClient
        mpi_available = True
    except ImportError:
        mpi_available = False

    class ParallelTaskHelper:
        def initialize(self):
            self._cluster = MPICommandClient()  # self._cluster.not_this(
            self._cluster.start_services()
            n = len(MPIEnvironment.mpi_server_rank_list())
            ids = self._cluster.push_command_request(job, False, None, params)
            client = MPICommandClient()
            client.get_command_response(ids, True, True)
    """
)

DATA_HELPER = textwrap.dedent(
    """\
    from .parallel_task_helper import ParallelTaskHelper

    class ParallelDataHelper(ParallelTaskHelper):
        def postExecution(self):
            return self._cluster.get_command_response(self._ids, True, True)
    """
)

TCLEAN = textwrap.dedent(
    """\
    try:
        from casampi.MPIEnvironment import MPIEnvironment
        from casampi import MPIInterface
        mpi_available = True
    except ImportError:
        mpi_available = False

    def tclean():
        if mpi_available and MPIEnvironment.is_mpi_enabled:
            cl = MPIInterface.MPIInterface().getCluster()
            cl._cluster.pgc("si.initmpi()", False)
    """
)


def _keys(uses: list[contract.Use]) -> set[tuple[str, str]]:
    return {u.key for u in uses}


def test_task_helper_names_are_the_clients_with_lines():
    uses = contract.scan_text(HELPER, "private/parallel/parallel_task_helper.py")
    assert _keys(uses) == {
        ("module", "MPIEnvironment"),
        ("module", "MPICommandClient"),
        ("env", "mpi_server_rank_list"),
        ("client", "start_services"),
        ("client", "push_command_request"),
        ("client", "get_command_response"),
    }
    where = {u.name: u.line for u in uses}
    assert where["push_command_request"] == 13
    assert str(next(u for u in uses if u.name == "start_services")) == (
        "casatasks/private/parallel/parallel_task_helper.py:11: client start_services"
    )


def test_a_comment_is_not_a_use():
    uses = contract.scan_text(HELPER, "h.py")
    assert "not_this" not in {u.name for u in uses}


def test_subclass_of_the_task_helper_is_scanned_without_naming_casampi():
    uses = contract.scan_text(DATA_HELPER, "private/parallel/parallel_data_helper.py")
    assert _keys(uses) == {("client", "get_command_response")}


def test_a_tasks_cluster_is_the_interfaces_core_and_initmpi_a_command():
    uses = contract.scan_text(TCLEAN, "private/task_tclean.py")
    assert _keys(uses) == {
        ("module", "MPIEnvironment"),
        ("module", "MPIInterface"),
        ("env", "is_mpi_enabled"),
        ("core", "pgc"),
        ("command", "initmpi"),
    }


def test_a_file_that_never_names_casampi_uses_nothing():
    assert contract.scan_text("x = self._cluster.pgc('a')\nMPIEnvironment.x\n", "t.py") == []


def test_unserved_names_each_use_and_skips_the_server_loop():
    text = "import casampi.private.start_mpi\n" + TCLEAN + "cl._cluster.brand_new(1)\n"
    uses = contract.scan_text(text, "task_x.py")
    served = {("core", "pgc"), ("env", "is_mpi_enabled"), ("iface", "getCluster")}
    served |= {("module", "MPIEnvironment"), ("module", "MPIInterface"), ("command", "initmpi")}
    missing = contract.unserved(uses, lambda kind, name: (kind, name) in served)
    assert [str(u) for u in missing] == ["casatasks/task_x.py:13: core brand_new"]


def test_problems_name_what_is_missing_from_every_release_read():
    uses = contract.scan_text(TCLEAN, "private/task_tclean.py")
    lines = contract.problems(uses, lambda kind, name: True)
    assert "casatasks no longer uses client push_command_request" in "\n".join(lines)
    assert not any("initmpi" in line for line in lines)


def _tree(root: Path, extra: str = "") -> Path:
    package = root / "casatasks"
    (package / "private" / "parallel").mkdir(parents=True)
    (package / "private" / "imagerhelpers").mkdir(parents=True)
    (package / "private" / "parallel" / "parallel_task_helper.py").write_text(HELPER)
    (package / "private" / "task_tclean.py").write_text(TCLEAN + extra)
    (package / "private" / "imagerhelpers" / "parallel_imager_helper.py").write_text(
        "from casampi.MPIInterface import MPIInterface as mpi_clustermanager\n"
        "self.CL.odo('x', 1)\nself.CL.check_job(j)\nself.CL.get_engines()\n"
    )
    (package / "private" / "task_other.py").write_text("print('no MPI here')\n")
    return package


def test_scan_tree_paths_are_relative_and_the_cache_gives_the_same(tmp_path):
    package = _tree(tmp_path)
    uses = contract.scan_tree(package)
    assert {u.path for u in uses} == {
        "private/parallel/parallel_task_helper.py",
        "private/task_tclean.py",
        "private/imagerhelpers/parallel_imager_helper.py",
    }
    assert contract.missing_required(uses) == []
    cache = tmp_path / "cache"
    assert contract.cached_scan(package, "9.9.9.9", cache) == uses
    (cache_file,) = cache.glob("casatasks-9.9.9.9-*.json")
    # the second call reads the cache: what is in it is what comes back
    cache_file.write_text('[["env", "from_cache", "x.py", 1]]')
    assert contract.cached_scan(package, "9.9.9.9", cache) == [
        contract.Use("env", "from_cache", "x.py", 1)
    ]
    cache_file.write_text("not json")
    assert contract.cached_scan(package, "9.9.9.9", cache) == uses


@pytest.fixture
def bridge():
    pytest.importorskip("casatasks")  # the bridge reads its release at import
    from casa_kernel.casampi import bridge

    return bridge


def test_an_unread_release_that_uses_only_served_names_runs_with_a_warning(tmp_path, bridge):
    warning, reason = bridge.check_release("6.9.0.1", _tree(tmp_path), tmp_path / "c")
    assert "casatasks 6.9.0.1 is newer" in warning and "not read" in warning
    assert reason is None


def test_an_unread_release_with_an_unserved_name_runs_serially_naming_it(tmp_path, bridge):
    _, reason = bridge.check_release(
        "6.9.0.1", _tree(tmp_path, extra="cl._cluster.pgc_async('x')\n"), tmp_path / "c"
    )
    assert reason is not None and "run serially" in reason
    assert "casatasks/private/task_tclean.py:12: core pgc_async" in reason


def test_the_bridge_serves_what_every_release_read_uses(bridge):
    for kind, name in contract.REQUIRED:
        assert bridge.serves(kind, name), (kind, name)
    assert not bridge.serves("module", "private.start_mpi")
    assert bridge.serves("env", "is_mpi_enabled")  # a property of the metaclass
    assert not bridge.serves("client", "no_such_method")
