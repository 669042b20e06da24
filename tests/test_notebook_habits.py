"""The notebook's habits work on the servers too: quoted paths with spaces, %cd,
--out names, --help. A real kernel with real servers."""

from __future__ import annotations

import ast
import shutil

import pytest
from kernels import execute, kernel_env, running_kernel


@pytest.fixture(scope="module")
def kc(tmp_path_factory):
    root = tmp_path_factory.mktemp("habits")
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3"), cwd=str(root)) as (km, kc):
        reply = execute(kc, "%casa_cluster status")
        assert reply.status == "ok", reply.error
        yield kc


def test_quoted_vis_path_with_spaces(kc, tiny_mms, tmp_path):
    folder = tmp_path / "my data"
    shutil.copytree(tiny_mms, folder / "my obs.mms", symlinks=True)
    reply = execute(kc, f'%%casa_parallel --vis "{folder}/my obs.mms" --out seen\nvis')
    assert reply.status == "ok", reply.error
    seen = ast.literal_eval(execute(kc, "sorted(seen_per_submms)").result)
    assert len(seen) == 4
    assert all(path.startswith(f"{folder}/my obs.mms/SUBMSS/") for path in seen), seen
    reply = execute(kc, '%%casa_parallel --vis "unclosed.mms\nvis')
    assert reply.status == "error" or "No closing quotation" in reply.error
    assert "No closing quotation" in reply.error


def test_servers_follow_the_kernels_working_directory(kc, tmp_path):
    (tmp_path / "sub dir").mkdir()
    assert execute(kc, f'%cd "{tmp_path}/sub dir"').status == "ok"
    reply = execute(kc, "%%casa_parallel\nimport os; os.getcwd()")
    assert ast.literal_eval(reply.result) == [f"{tmp_path}/sub dir"] * 2
    # a relative path written on the servers is where the kernel reads it
    reply = execute(kc, "%%casa_parallel\nopen(f'from-rank-{rank}.txt', 'w').write(str(rank))")
    assert reply.status == "ok", reply.error
    assert sorted(p.name for p in (tmp_path / "sub dir").iterdir()) == [
        "from-rank-0.txt",
        "from-rank-1.txt",
    ]
    assert execute(kc, f"%cd {tmp_path}").status == "ok"
    reply = execute(kc, "%%casa_parallel\nos.getcwd()")
    assert ast.literal_eval(reply.result) == [str(tmp_path)] * 2


@pytest.mark.parametrize("name", ["get_ipython", "In", "Out", "exit", "quit", "casa_cluster", "_2"])
def test_out_refuses_names_the_kernel_relies_on(kc, name):
    reply = execute(kc, f"%%casa_parallel --out {name}\nrank")
    assert f"the kernel or IPython relies on {name}" in reply.error
    # nothing was stored: the magics still work
    assert execute(kc, "%%casa_parallel\nrank").result == "[0, 1]"


def test_out_refuses_keywords_and_hides_a_task_only_when_forced(kc):
    reply = execute(kc, "%%casa_parallel --out class\nrank")
    assert reply.status == "error" or reply.error
    assert "--out 'class' is not a valid variable name" in reply.error
    reply = execute(kc, "%%casa_parallel --out flagdata\nrank")
    assert "would hide the CASA task flagdata()" in reply.error and "--force" in reply.error
    assert execute(kc, "type(flagdata).__name__").result == "'CasaTask'"
    reply = execute(kc, "%%casa_parallel --out flagdata --force\nrank")
    assert reply.status == "ok"
    assert "hides the CASA task flagdata()" in reply.stderr
    assert execute(kc, "flagdata").result == "[0, 1]"
    reply = execute(kc, "%%casa_parallel --out total\nrank")
    assert reply.stderr == ""


def test_cell_magic_help_names_itself_with_two_percent(kc):
    reply = execute(kc, "%%casa_parallel --help\nrank")
    assert reply.stdout.lstrip(": \n").startswith("%%casa_parallel [--vis VIS]"), reply.stdout
    assert "%casa_parallel [" not in reply.stdout.replace("%%casa_parallel [", "")
