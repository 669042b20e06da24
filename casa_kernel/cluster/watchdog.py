"""A watchdog process that ends the cluster when its kernel dies.

ipyparallel starts the controller and mpiexec in their own sessions, so when the
kernel is killed (SIGKILL, OOM) they live on as orphans. The kernel starts this
small process with a pipe on its stdin and tells it, line by line, which
process ids and folders belong to the cluster. If the pipe closes without a
clean ``exit`` line, the kernel is gone: the watchdog ends those processes
(TERM, then KILL) and removes the folders.

Run as ``python -m casa_kernel.cluster.watchdog``; driven by :class:`Watchdog`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading


class Watchdog:
    """The kernel's end of the pipe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "casa_kernel.cluster.watchdog", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            # its own session: a Ctrl-C (SIGINT) for the kernel is not for it
            start_new_session=True,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _send(self, line: str) -> None:
        with self._lock:
            if self._proc.stdin is None or self._proc.poll() is not None:
                return
            try:
                self._proc.stdin.write(line + "\n")
                self._proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass

    def watch(
        self,
        pids: set[int],
        folders: set[str] = frozenset(),  # type: ignore[assignment]
        cancel: list[list[str]] | None = None,
    ) -> None:
        """Replace the set of processes to end and of batch-job cancel commands
        (``scancel ID``) to run; add folders (and files) to remove at the end."""
        self._send("pids " + " ".join(str(p) for p in sorted(pids)))
        self._send("dirs " + "\0".join(sorted(folders)))
        self._send("cancel " + json.dumps(cancel or []))

    def close(self) -> None:
        """Clean shutdown: the kernel has stopped the cluster itself."""
        self._send("exit")
        with self._lock:
            if self._proc.stdin is not None:
                try:
                    self._proc.stdin.close()
                except BrokenPipeError:
                    pass
        # Not waited for: after "exit" it waits for this process to end.


def main() -> None:
    # Ignore the signals a terminal or the kernel's process group may send: the
    # watchdog must outlive the kernel to do its job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    kernel = int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid()
    pids: set[int] = set()
    dirs: set[str] = set()
    cancel: list[list[str]] = []
    for line in sys.stdin:
        line = line.rstrip("\n")
        if line == "exit":
            # Clean shutdown: the kernel stopped its cluster. Its last folder is
            # removed once more after the kernel is gone, in case ipyparallel's
            # exit handlers recreated part of it.
            _wait_gone(kernel, timeout=30.0)
            _remove(dirs)
            return
        kind, _, rest = line.partition(" ")
        if kind == "pids":
            pids = {int(p) for p in rest.split()}
        elif kind == "dirs":
            dirs.update(d for d in rest.split("\0") if d)
        elif kind == "cancel":
            cancel = json.loads(rest)
    # EOF without "exit": the kernel died.
    from casa_kernel.cluster.janitor import cancel_quietly, reap

    # The servers' batch job first: its processes are not ours to reap.
    for command in cancel:
        cancel_quietly(command)
    reap(pids, grace=3.0)
    _wait_gone(kernel, timeout=5.0)
    _remove(dirs)


def _wait_gone(pid: int, timeout: float) -> None:
    import psutil

    try:
        psutil.Process(pid).wait(timeout=timeout)
    except (psutil.Error, psutil.TimeoutExpired):
        pass


def _remove(paths: set[str]) -> None:
    from casa_kernel.cluster.janitor import remove_path

    for path in paths:
        remove_path(path)


if __name__ == "__main__":
    main()
