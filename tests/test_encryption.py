"""The controller's connections encrypted across hosts (ipyparallel's CurveZMQ).

The proof is a capture: on the fake-host harness (two "hosts" as Linux
namespaces, see ``tests/multihost/``) every TCP byte of the namespace is recorded
while a cell sends a distinctive text and its servers return distinctive bytes;
neither may appear in clear outside the kernel's own Jupyter channels. The same
run with encryption turned off is the control: there both DO appear, or the
capture proved nothing.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from kernels import execute, kernel_env, running_kernel
from test_multihost import run_in_namespaces

from casa_kernel.cluster import encryption
from casa_kernel.config.settings import ClusterConfig
from casa_kernel.errors import ClusterError

DRIVER = Path(__file__).resolve().parent / "multihost" / "capture_driver.py"
DRIVER_TIMEOUT = 100.0  # seconds; a run takes ~13 s

as_root = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root on Linux: network, UTS and mount namespaces fake the hosts",
)

# ------------------------------------------------------------------ pure: when and how


@pytest.mark.parametrize(
    ("setting", "all_local", "encrypted", "words"),
    [
        (None, True, False, "traffic not encrypted (loopback only)"),
        (None, False, True, "traffic encrypted (CurveZMQ)"),
        (True, True, True, "traffic encrypted (CurveZMQ)"),
        (False, False, False, "traffic NOT encrypted (CASA_KERNEL_ENCRYPT=0)"),
    ],
)
def test_encrypted_when_servers_may_be_remote(
    setting: bool | None, all_local: bool, encrypted: bool, words: str
) -> None:
    assert encryption.wanted(setting, all_local) is encrypted
    assert encryption.describe(encrypted, all_local) == words
    args = encryption.controller_args(encrypted)
    # CURVE on, and the HMAC signature kept (ipyparallel drops it with CURVE)
    assert args == (["--IPController.enable_curve=True", "--secure"] if encrypted else [])


@pytest.mark.parametrize(
    ("hostfile", "value", "encrypted"),
    [
        ("localhost slots=3\n", None, False),
        ("localhost slots=3\n", "1", True),
        ("localhost slots=1\nantares slots=2\n", None, True),
        ("localhost slots=1\nantares slots=2\n", " off ", False),
    ],
)
def test_config_reads_casa_kernel_encrypt(
    tmp_path: Path, hostfile: str, value: str | None, encrypted: bool
) -> None:
    path = tmp_path / "hosts"
    path.write_text(hostfile)
    env = {"CASA_KERNEL_HOSTFILE": str(path)}
    if value is not None:
        env["CASA_KERNEL_ENCRYPT"] = value
    config = ClusterConfig.from_env(env)
    assert config.encrypted is encrypted
    assert config.replace(nprocs=2).encrypted is encrypted  # survives a restart


def test_servers_from_the_batch_queue_are_remote() -> None:
    config = ClusterConfig.from_env({"CASA_KERNEL_BATCH": "slurm"})
    assert config.batch is not None and config.encrypted


def test_a_bad_encrypt_value_is_refused_naming_it() -> None:
    with pytest.raises(ClusterError, match="CASA_KERNEL_ENCRYPT='maybe'"):
        ClusterConfig.from_env({"CASA_KERNEL_ENCRYPT": "maybe"})


# ------------------------------------------------------------------ real: one machine


def test_encryption_asked_on_one_machine_works() -> None:
    """CASA_KERNEL_ENCRYPT=1 on one machine: cells run, status says encrypted."""
    env = kernel_env(CASA_KERNEL_NPROCS="3", CASA_KERNEL_ENCRYPT="1", CASA_KERNEL_PRELOAD="0")
    with running_kernel(env) as (km, kc):
        reply = execute(kc, "%%casa_parallel\nrank, comm.allreduce(rank)")
        assert reply.status == "ok", reply.traceback
        assert ast.literal_eval(reply.result) == [(0, 1), (1, 1)]
        status = execute(kc, "%casa_cluster status")
        assert status.status == "ok", status.traceback
        title = status.result.strip("'\"").splitlines()[0]
        assert title.endswith("; traffic encrypted (CurveZMQ)"), title


# ------------------------------------------------------------------ real: two hosts, captured


def run_capture(workdir: Path, encrypt: str | None) -> dict[str, Any]:
    """The capture driver in fresh namespaces (nothing of its kernel left behind)."""
    args = ["--workdir", str(workdir)]
    if encrypt is not None:
        args += ["--encrypt", encrypt]
    return run_in_namespaces(DRIVER, args, DRIVER_TIMEOUT)


@as_root
@pytest.mark.timeout(2 * DRIVER_TIMEOUT)
@pytest.mark.parametrize(
    ("encrypt", "words"),
    [
        (None, "traffic encrypted (CurveZMQ)"),  # the default across hosts
        ("0", "traffic NOT encrypted (CASA_KERNEL_ENCRYPT=0)"),  # the control
    ],
    ids=["default-encrypted", "control-clear"],
)
def test_no_cell_text_or_result_bytes_in_clear_across_hosts(
    tmp_path: Path, encrypt: str | None, words: str
) -> None:
    report = run_capture(tmp_path, encrypt)
    parallel = report["parallel"]
    assert parallel["status"] == "ok", parallel["error"]
    assert parallel["result"].count("2654435761") == 2  # both servers returned the pattern
    status = report["status"]
    assert status["status"] == "ok", status["error"]
    title = status["result"].strip("'\"").splitlines()[0]
    assert "client on orion" in title and title.endswith(words), title

    # key and connection files: owner only, in an owner-only folder
    modes = report["files"]
    assert len(modes) == 3, modes  # the folder, the client's file, the engines' file
    folder = next(path for path in modes if path.startswith("/"))
    assert modes.pop(folder) == "0o700"
    assert set(modes.values()) == {"0o600"}, modes

    # encrypted across hosts, the servers read their connection info from a file
    # in a shared folder: 0600 in 0700 folders, there only while servers start
    keyfiles = report["keyfiles"]
    markers = [p for p in keyfiles if p.startswith(".casa-kernel-preflight-")]
    for marker in markers:  # the preflight checked every host sees this folder
        del keyfiles[marker]
    assert len(markers) == (1 if encrypt is None else 0), markers
    if encrypt is None:
        # the base folder, the cluster's, the file (and maybe the file's .part)
        files = [p for p in keyfiles if p.endswith("/engine.json")]
        assert len(files) == 1 and len(keyfiles) - len(files) - 2 in (0, 1), keyfiles
        assert {m for p, m in keyfiles.items() if p.endswith((".json", ".part"))} == {"0o600"}
        assert {m for p, m in keyfiles.items() if "json" not in p} == {"0o700"}, keyfiles
        assert report["keys_while_running"] == [], report  # gone once servers registered
        assert report["keys_left"] == [], report["keys_left"]
        # both servers and CASA's cube client (3 engines) read that file, and had
        # no connection info in their environment
        key_file = str(tmp_path / "keys" / files[0])
        assert report["engines"] == [{"url_file": key_file, "info_in_env": False}] * 3, report
    else:  # not encrypted: the environment, as on one machine; no folder made
        assert keyfiles == {} and report["keys_left"] is None, report
        assert report["keys_while_running"] is None, report
        assert report["engines"] == [{"url_file": "", "info_in_env": True}] * 3, report

    cap = report["capture"]
    # the capture saw everything, and the whole path: the Jupyter channels (which
    # carry the text by design), and the controller's connections with more bytes
    # than the two results (2 x 64 KiB)
    assert cap["drops"] == 0, cap
    assert cap["text_in_jupyter"], cap
    assert cap["controller_bytes"] > 2 * 65536, cap
    if encrypt is None:
        assert cap["text_in"] == [], cap
        assert cap["result_in"] == [], cap
        # every controller connection chose CURVE, none the NULL mechanism
        assert cap["curve_greetings"] > 0 and cap["null_greetings"] == 0, cap
        # The HMAC key crosses no connection: not in the servers' environment
        # (mpiexec's daemons would pass it on in clear), but in a shared file.
        assert cap["key_in"] == [] and cap["key_owners"] == [], cap
    else:
        # client -> controller -> each server, and back
        assert len(cap["text_in"]) >= 3, cap
        assert len(cap["result_in"]) >= 3, cap
        assert cap["curve_greetings"] == 0 and cap["null_greetings"] > 0, cap
        # and the control shows the capture would see the key: unencrypted, it
        # still travels in the servers' environment, through mpiexec's daemons:
        # every stream with it has a daemon at one end (the other: a daemon, or an
        # MPI process on the daemon's host, e.g. CASA's cube client beside prterun)
        daemons = {"prterun", "prted"}
        assert cap["key_in"] and cap["key_owners"], cap
        assert all(daemons & set(pair) for pair in cap["key_owners"]), cap
    assert report["left"] == []
