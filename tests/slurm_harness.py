"""A real Slurm for the tests: munged, slurmctld and two slurmd (orion, antares).

Everything runs in private namespaces (see ``tests/slurm/holder.py``): the
harness starts the holder, and runs every command "on the login node" by
entering its namespaces with ``nsenter``.  :func:`slurm` is the context manager
the fixtures use; on exit every job is cancelled, every daemon stopped, and
nothing of them is left (checked).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
import pytest

HOLDER = Path(__file__).resolve().parent / "slurm" / "holder.py"
NODES = ("antares", "orion")  # Slurm's order (by name)
START_TIMEOUT = 90.0


def missing_tools() -> list[str]:
    tools = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "unshare", "nsenter", "ip")
    return [t for t in tools if shutil.which(t) is None]


class Slurm:
    """A running two-node Slurm; :meth:`run` is a command on its login node."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.proc: subprocess.Popen | None = None
        self.pid = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--mount", "--uts", "--fork"]
            + [sys.executable, str(HOLDER), "--root", str(self.root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.root / "holder.err", "w"),
            text=True,
            start_new_session=True,
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("ready "):
            self.stop()
            raise RuntimeError(f"Slurm did not start: {line!r}\n{self.logs()}")
        self.pid = int(line.split()[1])

    def env(self, **extra: str) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf), **extra)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the Slurm's namespaces (network, mount, host name)."""
        return ["nsenter", "-t", str(self.pid), "-n", "-m", "-u", "--", *argv]

    def run(
        self, *argv: str, timeout: float = 60, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            self.command(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env or self.env(),
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        return done

    def queue(self) -> list[str]:
        """Jobs not yet ended (``squeue``'s default states)."""
        out = self.run("squeue", "-h", "-o", "%i %T %j").stdout
        return [line for line in out.splitlines() if line.strip()]

    def wait_queue_empty(self, timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            left = self.queue()
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def logs(self) -> str:
        parts = []
        for name in ("holder.err", "slurmctld.log", "slurmd-orion.log", "slurmd-antares.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n" + "".join(path.read_text().splitlines(True)[-30:]))
        return "\n".join(parts)

    def processes(self) -> list[psutil.Process]:
        """Everything still running that this Slurm started (daemons, jobs)."""
        found = []
        for proc in psutil.process_iter(["cmdline", "environ"]):
            try:
                cmd = " ".join(proc.info["cmdline"] or [])
                conf = (proc.info["environ"] or {}).get("SLURM_CONF", "")
            except psutil.Error:
                continue
            if str(self.root) in cmd or conf == str(self.conf):
                found.append(proc)
        mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        return [p for p in found if p.pid not in mine]

    def node_pid(self, node: str) -> int:
        """The pid of ``node``'s slurmd (its jobs run in its namespaces)."""
        for proc in psutil.process_iter(["cmdline"]):
            argv = proc.info["cmdline"] or []
            if argv[:1] == ["slurmd"] and argv[2:4] == ["-N", node] and str(self.conf) in argv:
                return proc.pid
        raise RuntimeError(f"no slurmd for {node}:\n{self.logs()}")

    @contextlib.contextmanager
    def hidden(self, node: str, folder: Path) -> Iterator[None]:
        """``folder`` is an empty one on ``node`` (a tmpfs over it in that node's
        mount namespace): a node without the file system the others share."""
        enter = ["nsenter", "-t", str(self.node_pid(node)), "-m", "--"]
        subprocess.run(
            [*enter, "mount", "-t", "tmpfs", "-o", "size=1m", "hidden", str(folder)], check=True
        )
        try:
            yield
        finally:
            subprocess.run([*enter, "umount", str(folder)], check=True)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.communicate("stop\n", timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.communicate()
        self.proc = None


@contextlib.contextmanager
def slurm(root: Path) -> Iterator[Slurm]:
    """A started Slurm; stopped afterwards, with nothing of it left running."""
    cluster = Slurm(root)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        left = cluster.processes()
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        assert not left, f"left running after Slurm stopped: {[p.cmdline() for p in left]}"


@contextlib.contextmanager
def slurm_for_test(root: Path) -> Iterator[Slurm]:
    """:func:`slurm` for a test: a missing tool fails it (CI runs as root with
    them installed: never a silent skip)."""
    missing = missing_tools()
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: apt-get install -y slurm-wlm munge "
            "iproute2 util-linux"
        )
    with slurm(root) as running:
        yield running
    # (the context manager checked that no daemon and no job process is left)
