"""Fuzz the magics' own arguments in ONE real kernel (hypothesis).

Whatever the options of ``%casa_cluster`` and ``%%casa_parallel`` are, the
kernel answers (within a liveness bound), and an error is a usage error
(printed ``UsageError: ...``) or one of casa-kernel's errors shown without
casa-kernel's frames -- never a traceback from inside casa_kernel.
"""

from __future__ import annotations

import ast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernels import execute, kernel_env, running_kernel

# A generous liveness bound: a usage error takes milliseconds, a timed-out
# cell a few seconds (the servers' interrupt grace).
ANSWER_WITHIN = 60

# (no line breaks: they would end the magic's line and start Python code)
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
# (nor surrogates: JSON messages cannot carry them to the kernel)
junk = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters=LINE_BREAKS), max_size=12
)
quoted = junk.map(lambda t: repr(t))
weird = st.sampled_from(
    ["", "-", "--", "'", '"', "'open", "\x00", "a\x00b", "$HOME", "~", ".", "/", "-n", "--vis",
     "=", "--nprocs=", "\\", "é", "\u200b", "1e9999", "nan", "-0", "0x10", "None"]
)  # fmt: skip
token = st.one_of(junk, quoted, weird)

bad_n = st.sampled_from(["0", "1", "-3", "10000", "1e3", "x", "2.5", "99999999999999999999", "''"])
cluster_option = st.one_of(
    st.tuples(st.sampled_from(["-n", "--nprocs"]), st.one_of(bad_n, token)),
    st.tuples(st.just("--hostfile"), token),
    st.tuples(st.just("--mpiexec"), token),
    st.tuples(st.just("--oversubscribe"), st.just("")),
    st.tuples(st.just("--vis"), token),  # check's data paths (refused by other actions)
    st.tuples(token, st.just("")),
)


@st.composite
def cluster_lines(draw) -> str:
    action = draw(st.sampled_from(["", "status", "start", "restart", "check"]) | junk)
    words = [action]
    for option, value in draw(st.lists(cluster_option, max_size=4)):
        words += [option, value]
    if action in ("start", "restart"):
        # Never a valid (re)start: each would take seconds. The last -n wins.
        # ("10000" is only refused without --oversubscribe, which may be drawn
        # above: with it, 9999 servers would really be launched.)
        words += ["-n", draw(bad_n.filter(lambda n: n != "10000"))]
    return " ".join(words)


def parallel_lines(paths: dict[str, str]):
    vis = st.one_of(st.sampled_from(sorted(paths.values())), token)
    out = st.one_of(st.sampled_from(["x", "class", "None", "1a", "a-b", "_", "é"]), token)
    timeout = st.one_of(
        st.sampled_from(["-1", "0", "nan", "inf", "-inf", "1e-9", "0.5", "30", "x"]), token
    )
    option = st.one_of(
        st.tuples(st.just("--vis"), vis),
        st.tuples(st.just("--out"), out),
        st.tuples(st.just("--timeout"), timeout),
        st.tuples(token, st.just("")),
    )
    return st.lists(option, max_size=4).map(lambda pairs: " ".join(f"{o} {v}" for o, v in pairs))


@pytest.fixture(scope="module")
def kc(tmp_path_factory, tiny_ms, tiny_mms):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "plain.txt").write_text("not an MS\n")
    with running_kernel(kernel_env(CASA_KERNEL_NPROCS="3"), cwd=str(root)) as (_km, kc):
        assert execute(kc, "%%casa_parallel\nrank").result == "[0, 1]"
        kc.paths = {"mms": tiny_mms, "ms": tiny_ms, "file": str(root / "plain.txt")}
        yield kc


def _check(kc, code: str) -> None:
    reply = execute(kc, code, timeout=ANSWER_WITHIN)  # raises if the kernel is stuck
    if reply.status == "ok":
        return
    if reply.ename is None:  # IPython prints a UsageError instead of raising it
        assert reply.stderr.startswith("UsageError: "), (code, reply.stderr)
        return
    assert reply.ename in {"TaskTimeout"}, (code, reply.ename, reply.evalue)
    assert "casa_kernel/" not in reply.traceback, (code, reply.traceback)


SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@SETTINGS
@given(line=cluster_lines())
def test_casa_cluster_options(kc, line):
    _check(kc, f"%casa_cluster {line}")


@given(data=st.data())
@SETTINGS
def test_casa_parallel_options(kc, data):
    line = data.draw(parallel_lines(kc.paths))
    _check(kc, f"%%casa_parallel {line}\nrank")


def test_kernel_and_cluster_still_work_after_fuzzing(kc):
    reply = execute(kc, "%casa_cluster status")
    assert reply.status == "ok" and reply.result.count("idle") == 3, reply.result
    reply = execute(kc, "%%casa_parallel\n(rank, size)")
    assert ast.literal_eval(reply.result) == [(0, 2), (1, 2)]
    reply = execute(kc, "%casa_cluster restart -n 10000")  # refused before launching
    assert "9999 servers" in reply.stderr and "--oversubscribe" in reply.stderr
    assert execute(kc, "%%casa_parallel\nrank").result == "[0, 1]"
