"""Live progress: ONE display per long parallel operation, updated in place.

The rendering is pure and tested as such (tests/unit/test_progress_display.py);
here a real kernel with real servers, read through the IOPub messages a front end
would get.
"""

from __future__ import annotations

import re
import shutil

import pytest
from kernels import execute, kernel_env, running_kernel

# ---------------------------------------------------------------- a real kernel


@pytest.fixture(scope="module")
def kc(tmp_path_factory):
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3")) as (km, kc):
        reply = execute(kc, "%casa_cluster status")
        assert reply.status == "ok", reply.error
        yield kc


@pytest.fixture
def mms(tiny_mms, tmp_path):
    return shutil.copytree(tiny_mms, tmp_path / "tiny.mms", symlinks=True)


def _one_display(reply) -> list[dict]:
    """The data of every state of the one display this cell made, in order."""
    messages = reply.display_messages()
    assert messages, "no display"
    kind, first = messages[0]
    assert kind == "display_data"
    display_id = first["transient"]["display_id"]
    assert all(c.get("transient", {}).get("display_id") == display_id for _, c in messages)
    assert [k for k, _ in messages[1:]] == ["update_display_data"] * (len(messages) - 1)
    return [c["data"] for _, c in messages]


def test_per_submms_cell_shows_one_live_table_then_a_summary(kc, mms):
    reply = execute(kc, f"%%casa_parallel --vis {mms}\nimport time; time.sleep(0.8); vis[-7:]")
    assert reply.status == "ok", reply.error
    states = _one_display(reply)
    assert len(states) >= 3  # shown, updated while running, final
    running = [s for s in states if ">busy</span>" in s["text/html"]]
    assert running, "no state showed a busy server"
    assert re.search(r"tiny\.mms\.000\d\.ms", running[-1]["text/html"])
    # each server's memory against its share, as in %casa_cluster status
    assert len(re.findall(r"[\d.]+ MiB of [\d.]+ GiB", running[-1]["text/html"])) == 2
    assert all("\n" not in s["text/plain"] for s in states)  # plain front ends: one line
    final = states[-1]["text/plain"]
    assert re.fullmatch(
        r"casa-kernel: %%casa_parallel --vis tiny\.mms: 4/4 sub-MS in [\d.]+ s; "
        r"busy: rank 0@\S+ \d+%, rank 1@\S+ \d+%",
        final,
    ), final
    assert "rank 1@" in states[-1]["text/html"]


def test_transparent_task_shows_its_progress(kc, mms):
    reply = execute(kc, f"flagdata(vis={str(mms)!r}, mode='summary')['total']")
    assert reply.status == "ok", reply.error
    final = _one_display(reply)[-1]["text/plain"]
    assert final.startswith("casa-kernel: flagdata: 4/4 sub-MS in "), final


def test_quick_spmd_cell_shows_no_display_and_none_shows_no_out(kc):
    reply = execute(kc, "%%casa_parallel\nrank")
    assert reply.status == "ok" and reply.result == "[0, 1]"
    assert reply.display_messages() == []
    reply = execute(kc, "%%casa_parallel\nprint('hello from', rank)")
    assert reply.status == "ok"
    assert reply.result is None  # all servers returned None: no Out
    assert "hello from 0" in reply.stdout and "hello from 1" in reply.stdout
    reply = execute(kc, "%%casa_parallel\nNone if rank == 0 else rank")
    assert reply.result == "[None, 1]"


def test_long_spmd_cell_shows_its_table(kc):
    reply = execute(kc, "%%casa_parallel\nimport time; time.sleep(1.6)")
    assert reply.status == "ok"
    states = _one_display(reply)
    assert states[-1]["text/plain"].startswith("casa-kernel: %%casa_parallel: 2/2 servers in ")


def test_status_shows_work_and_memory(kc):
    reply = execute(kc, "%casa_cluster status")
    assert reply.status == "ok", reply.error
    lines = reply.result.splitlines()
    assert lines[1].split() == ["rank", "host", "pid", "state", "work", "memory"]
    for line in lines[2:]:
        assert re.search(r"idle\s+-\s+\d+\.\d MiB of \d+\.\d GiB$", line), line


def test_cluster_start_is_one_live_display(kc):
    reply = execute(kc, "%casa_cluster restart")
    assert reply.status == "ok", reply.error
    states = _one_display(reply)
    assert "starting the CASA cluster" in states[0]["text/plain"]
    assert re.fullmatch(
        r"casa-kernel: starting the CASA cluster: 2/2 servers in [\d.]+ s; ready",
        states[-1]["text/plain"],
    )
