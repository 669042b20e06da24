"""Where the servers' connection file goes, with which modes, and that it goes away.

The real proof (the key crosses no connection) is the capture in
tests/test_encryption.py; these are the pure and file-level parts.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from casa_kernel.cluster import keyfile
from casa_kernel.cluster.janitor import Janitor
from casa_kernel.config.settings import ClusterConfig
from casa_kernel.errors import ClusterError


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "/home/u/.local/state/casa-kernel/clusters"),
        ({"XDG_STATE_HOME": "/state"}, "/state/casa-kernel/clusters"),
        ({"XDG_STATE_HOME": "relative/ignored"}, "/home/u/.local/state/casa-kernel/clusters"),
        ({"CASA_KERNEL_KEY_DIR": "/proj/keys", "XDG_STATE_HOME": "/s"}, "/proj/keys"),
        ({"CASA_KERNEL_KEY_DIR": "~/k"}, os.path.expanduser("~/k")),
        ({"CASA_KERNEL_KEY_DIR": "  "}, "/home/u/.local/state/casa-kernel/clusters"),
    ],
)
def test_where_the_folder_goes(environ: dict[str, str], expected: str) -> None:
    assert keyfile.base_dir(environ, home="/home/u") == expected


@pytest.mark.parametrize(
    ("encrypted", "all_local", "batch", "by_file"),
    [
        (True, False, False, True),  # across hosts: never in the environment
        (True, True, True, True),  # servers from the queue: their hosts are unknown
        (True, True, False, False),  # one machine: the environment stays on it
        (False, False, False, False),  # not encrypted: no secrecy to keep
    ],
)
def test_by_file_only_when_encrypted_and_servers_may_be_remote(
    encrypted: bool, all_local: bool, batch: bool, by_file: bool
) -> None:
    assert keyfile.wanted(encrypted, all_local, batch) is by_file


def test_config_across_hosts_and_from_the_queue_wants_the_file(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=1\nantares slots=2\n")
    for env in ({"CASA_KERNEL_HOSTFILE": str(hosts)}, {"CASA_KERNEL_BATCH": "slurm"}):
        config = ClusterConfig.from_env(env)
        assert keyfile.wanted(config.encrypted, config.placement.is_local, config.batch is not None)


def test_folder_and_file_are_owner_only(tmp_path: Path) -> None:
    base = tmp_path / "state" / "clusters"
    old = os.umask(0o022)  # a usual umask must not make anything readable by others
    try:
        folder = keyfile.make_folder(str(base))
        path = keyfile.write(folder, {"key": "secret", "interface": "tcp://orion"})
        again = keyfile.write(folder, {"key": "other", "interface": "tcp://orion"})
    finally:
        os.umask(old)
    assert Path(folder).parent == base and again == path
    assert mode(base) == 0o700 and mode(folder) == 0o700 and mode(path) == 0o600
    assert json.loads(Path(path).read_text())["key"] == "other"
    assert os.listdir(folder) == [keyfile.FILE_NAME]  # no half-written file left
    # removed once every server has read it; a replacement's start writes it again
    keyfile.remove(folder)
    assert not os.path.exists(folder)
    assert keyfile.write(folder, {"key": "third"}) == path
    assert mode(folder) == 0o700 and mode(path) == 0o600
    assert keyfile.engine_args(path) == [
        f"--IPEngine.url_file={path}",
        f"--IPEngine.wait_for_url_file={keyfile.WAIT_FOR_FILE:g}",
    ]


def test_a_base_folder_open_to_others_is_closed(tmp_path: Path) -> None:
    base = tmp_path / "keys"
    base.mkdir(mode=0o755)
    base.chmod(0o755)
    keyfile.make_folder(str(base))
    assert mode(base) == 0o700


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_a_base_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "keys"
    base.mkdir(mode=0o700)
    os.chown(base, 12345, 12345)
    with pytest.raises(ClusterError, match=r"keys \(CASA_KERNEL_KEY_DIR\) belongs to another"):
        keyfile.make_folder(str(base))


def test_an_impossible_base_folder_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ClusterError, match="set CASA_KERNEL_KEY_DIR to a folder"):
        keyfile.make_folder(str(blocker / "keys"))


def test_the_janitor_removes_the_folder_and_tells_the_watchdog(tmp_path: Path) -> None:
    told: list[set[str]] = []
    janitor = Janitor(on_change=lambda pids, folders, jobs: told.append(folders))
    workdir = janitor.make_workdir()
    folder = keyfile.make_folder(str(tmp_path / "keys"))
    keyfile.write(folder, {"key": "secret"})
    janitor.add_path(folder)
    assert told[-1] == {workdir, folder}  # the watchdog removes both after a killed kernel
    janitor.clean()
    assert not os.path.exists(folder) and not os.path.exists(workdir)
    assert os.path.isdir(tmp_path / "keys")  # the base stays: other kernels may use it
    assert told[-1] == set()


def test_the_watchdog_removes_the_folder_after_a_killed_kernel(tmp_path: Path) -> None:
    """A kernel stand-in hooks its janitor to a real watchdog as the kernel does
    (session.py), adds the key folder and is SIGKILLed: the watchdog removes it."""
    folder = keyfile.make_folder(str(tmp_path / "keys"))
    keyfile.write(folder, {"key": "secret"})
    code = (
        "import os, signal\n"
        "from casa_kernel.cluster.janitor import Janitor\n"
        "from casa_kernel.cluster.watchdog import Watchdog\n"
        "watchdog = Watchdog()\n"
        "janitor = Janitor(on_change=watchdog.watch)\n"
        f"janitor.add_path({folder!r})\n"
        "print(watchdog.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    try:  # the watchdog ends once it has cleaned up
        psutil.Process(int(proc.stdout.split()[0])).wait(timeout=30)
    except psutil.NoSuchProcess:
        pass
    assert not os.path.exists(folder)
