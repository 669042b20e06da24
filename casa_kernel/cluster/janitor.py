"""The cluster's processes and private folder: tracked, told to the watchdog, removed.

Nothing of a cluster may outlive it: every process it started (controller,
mpiexec/prterun, servers, their nannies) is tracked here, reported to the
watchdog (which ends them if the kernel dies) and reaped at stop; the private
folder (connection files, hostfile) is owner-only and removed at stop.
Servers from the batch queue are no processes of ours: their job's cancel
command (``scancel ID``) is kept instead, run at stop and by the watchdog.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable
from typing import Any

import psutil

from casa_kernel import variables

# The watchdog's hook: (pids, folders, batch-job cancel commands).
OnChange = Callable[[set[int], set[str], list[list[str]]], None]


def reap(pids: Iterable[int], grace: float = 3.0) -> None:
    """Make sure these processes (and their children) are gone: TERM, then KILL."""
    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs[pid] = p
            for child in p.children(recursive=True):
                procs[child.pid] = child
        except psutil.Error:
            continue
    if not procs:
        return
    for p in procs.values():
        try:
            p.terminate()
            p.resume()  # a stopped (SIGSTOP) process acts on TERM only once resumed
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)


def remove_path(path: str) -> None:
    """Remove a folder with what it holds, or a file; gone already is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def owned_by(owner: int) -> set[int]:
    """Pids of the processes whose environment names ``owner`` as their cluster's
    owner (``variables.OWNER``, set for every process of a cluster): found even
    when nothing tracked them (forked while the start was cut short, orphaned)."""
    found = set()
    for proc in psutil.process_iter():
        try:
            if proc.pid != owner and proc.environ().get(variables.OWNER) == str(owner):
                found.add(proc.pid)
        except psutil.Error:
            continue
    return found


def kill_now(pids: Iterable[int]) -> None:
    """SIGKILL at once (stuck or stopped servers honour nothing else)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def cancel_quietly(command: list[str], timeout: float = 30.0) -> None:
    """Run a batch job's cancel command; its failure (job gone, no scheduler) is
    not ours to report here: the launcher's stop reports a failed cancel."""
    try:
        subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        pass


class Janitor:
    """Pids and the private folder of one cluster; thread-safe."""

    def __init__(self, on_change: OnChange | None = None):
        self._lock = threading.Lock()
        self._pids: set[int] = set()
        self._jobs: dict[int, list[str]] = {}  # id(launcher) -> its job's cancel command
        self.workdir: str | None = None
        self.paths: set[str] = set()  # others of the cluster (a shared connection folder, markers)
        self.removed: list[str] = []
        self.on_change = on_change  # the watchdog's hook

    def make_workdir(self) -> str:
        with self._lock:
            self.workdir = tempfile.mkdtemp(prefix="casa-kernel-")  # 0700: private
        self._report()
        return self.workdir

    def add_path(self, path: str) -> None:
        """Another folder or file of the cluster (the shared connection folder, a
        preflight marker), removed with the private folder."""
        with self._lock:
            self.paths.add(path)
        self._report()

    def track(self, launcher: Any) -> None:
        """A launcher's process and its children (now, in case the parent dies first),
        or its batch job (known from submission on, so even a pending job is cancelled)."""
        command = getattr(launcher, "cancel_command", None)
        if command:
            with self._lock:
                self._jobs[id(launcher)] = list(command)
            self._report()
        pid = getattr(launcher, "pid", -1)
        if not pid or pid <= 0:
            return
        found = {pid}
        try:
            found.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass
        self.add(found)

    def kill_everything(self, launchers: Iterable[Any], extra: set[int]) -> None:
        """A start given up on: all of it at once (TERM, KILL after 1 s): the
        launchers' process trees, what is tracked, ``extra``, and whatever carries
        this kernel's OWNER mark (a start cut short inside start_controller() had
        tracked nothing yet: its controller outlived the error; and a process forked
        between a listing and the kill)."""
        for launcher in launchers:
            self.track(launcher)
        reap(self.pids() | extra | owned_by(os.getpid()), grace=1.0)

    def add(self, pids: Iterable[int]) -> None:
        with self._lock:
            self._pids.update(pids)
        self._report()

    def forget(self, pids: Iterable[int]) -> None:
        with self._lock:
            self._pids.difference_update(pids)
        self._report()

    def forget_job(self, launcher: Any) -> None:
        """A batch job that has left the queue (its servers were replaced)."""
        with self._lock:
            self._jobs.pop(id(launcher), None)
        self._report()

    def pids(self) -> set[int]:
        with self._lock:
            return set(self._pids)

    def make_private(self) -> None:
        """Connection, cluster and log files: owner only (0600, folders 0700).

        ipyparallel writes its connection files 0600 but its launcher logs with
        the default umask; the kernel's umask is the user's, so fix the modes
        here rather than change it for the whole process.
        """
        if not self.workdir:
            return
        for root, dirs, files in os.walk(self.workdir):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o700)
            for name in files:
                os.chmod(os.path.join(root, name), 0o600)

    def clean(self, grace: float = 3.0) -> None:
        """Cancel the batch job (if a clean stop did not), reap every tracked
        process and remove the folder."""
        with self._lock:
            jobs = list(self._jobs.values())
        for command in jobs:  # cancelling a job that has ended is harmless
            cancel_quietly(command)
        reap(self.pids(), grace=grace)
        with self._lock:
            self._pids.clear()
            self._jobs.clear()
            folder, self.workdir = self.workdir, None
            others, self.paths = self.paths, set()
        for path in [folder, *sorted(others)]:
            if path:
                remove_path(path)
                self.removed.append(path)
        self._report()

    def remove_late_files(self) -> None:
        """Late ipyparallel callbacks may recreate part of a removed folder."""
        for path in self.removed:
            remove_path(path)

    def _report(self) -> None:
        if self.on_change is not None:
            with self._lock:
                pids, folders = set(self._pids), {self.workdir} if self.workdir else set()
                folders |= self.paths
                jobs = list(self._jobs.values())
            self.on_change(pids, folders, jobs)
