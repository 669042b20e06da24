"""The preflight over a real ssh: OpenSSH's sshd on 127.0.0.1, the default agent.

No launcher agent is configured here, so the preflight uses ssh itself, as
mpiexec would on a cluster, with ``BatchMode=yes`` and ``ConnectTimeout``; the
host is ``antares-ssh``, an alias (in an ssh client config passed through
``PRTE_MCA_plm_ssh_args``, where a site would put its own options) for a
private sshd of this test on 127.0.0.1. Three states of that host: the key
authorised and the host key known (all pass); the key not authorised
(``Permission denied``); the host key unknown (``Host key verification
failed``, which without BatchMode would be a prompt hanging mpiexec).

Needs root (sshd) and OpenSSH's server; as root a missing sshd is a failure
(CI installs openssh-server).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from casa_kernel import preflight
from casa_kernel.config.settings import ClusterConfig

SSHD = "/usr/sbin/sshd"
HOST = "antares-ssh"

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenSSH on Linux"),
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root: sshd runs as root"
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sshd:
    """A private sshd and the client files that reach it as ``antares-ssh``."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.authorized = root / "authorized_keys"
        self.known = root / "known_hosts"
        self.client_config = root / "ssh_config"

    def start(self) -> subprocess.Popen[bytes]:
        root = self.root
        for name in ("host_key", "client_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True
            )
        (root / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
            f"AuthorizedKeysFile {self.authorized}\nPidFile {root / 'sshd.pid'}\n"
            "StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\n"
        )
        self.client_config.write_text(
            f"Host {HOST}\n  HostName 127.0.0.1\n  Port {self.port}\n  User root\n"
            f"  IdentityFile {root / 'client_key'}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.known}\n  GlobalKnownHostsFile /dev/null\n"
        )
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation
        proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(root / "sshd_config")],
            stdout=subprocess.DEVNULL,
            stderr=open(root / "sshd.log", "wb"),  # open as long as sshd runs
        )
        deadline = time.monotonic() + 20
        delay = 0.01
        while True:  # listening yet?
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return proc
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"sshd did not start:\n{(root / 'sshd.log').read_text()}")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def authorise(self, yes: bool) -> None:
        key = (self.root / "client_key.pub").read_text() if yes else ""
        self.authorized.write_text(key)

    def know_host(self, yes: bool) -> None:
        key = " ".join((self.root / "host_key.pub").read_text().split()[:2])
        self.known.write_text(f"[127.0.0.1]:{self.port} {key}\n" if yes else "")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if not os.path.exists(SSHD) or shutil.which("ssh") is None:
        pytest.fail(f"{SSHD} or ssh not found: apt-get install -y openssh-server openssh-client")
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    proc = server.start()
    try:
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture()
def config(sshd: Sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ClusterConfig:
    monkeypatch.delenv("PRTE_MCA_plm_ssh_agent", raising=False)
    monkeypatch.delenv("PRTE_MCA_plm_rsh_agent", raising=False)
    monkeypatch.setenv("PRTE_MCA_plm_ssh_args", f"-F {sshd.client_config}")
    monkeypatch.chdir(tmp_path)
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text(f"localhost slots=1\n{HOST} slots=2\n")
    return ClusterConfig.from_options(hostfile=str(hostfile))


def only_host(report: preflight.Report) -> dict[str, preflight.Check]:
    assert report.hosts == [HOST]
    return {c.requirement: c for c in report.checks}


def test_password_less_ssh_passes(sshd: Sshd, config: ClusterConfig) -> None:
    sshd.authorise(True)
    sshd.know_host(True)
    report = preflight.check(config, timeout=20)
    checks = only_host(report)
    assert report.ok, repr(report.table())
    assert checks["ssh"].reason == "password-less"
    assert all(c.ok for c in checks.values())
    assert f"via ssh -F {sshd.client_config}" in report.title()


def test_a_key_not_authorised_is_named(sshd: Sshd, config: ClusterConfig) -> None:
    sshd.authorise(False)
    sshd.know_host(True)
    report = preflight.check(config, timeout=20)
    [failure] = report.failures()
    assert (failure.host, failure.requirement) == (HOST, "ssh")
    assert "Permission denied (publickey)" in failure.reason and "exit code 255" in failure.reason
    assert f"ssh-copy-id {HOST}" in failure.fix
    assert "antares-ssh: ssh: root@127.0.0.1: Permission denied" in str(report.error())


def test_an_unknown_host_key_fails_instead_of_prompting(sshd: Sshd, config: ClusterConfig) -> None:
    sshd.authorise(True)
    sshd.know_host(False)
    started = time.monotonic()
    report = preflight.check(config, timeout=20)
    [failure] = report.failures()
    assert (failure.host, failure.requirement) == (HOST, "ssh")
    assert failure.reason == "Host key verification failed. (exit code 255)"
    assert "accept its host key once" in failure.fix
    assert time.monotonic() - started < 20  # no prompt waited on (liveness bound)
