"""Follow a CASA log file, so a server's warnings and errors reach the notebook.

A CASA log line (casatools 6.7, C++ ``LogSink`` writing ``casalog``'s file) is::

    2026-11-25 22:01:28<TAB>WARN<TAB>flagdata::::casa<TAB>the message

date and time (local), level, origin, message.  Levels are SEVERE, WARN, INFO,
INFO1..INFO5, DEBUG1, DEBUG2.  A message with newlines is written as several lines
with the same level whose origin ends in ``+``; they belong to the line above.
casatools flushes after every message, but a reader may still meet a last line
without its newline: it is left for the next call.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

# Messages CASA logs as WARN/SEVERE that say nothing about the user's work.
# casadata's leap second table is older than casacore expects ("could be wrong by
# 1s or more"): posted as SEVERE (3 lines) once per process that uses measures,
# i.e. on every server, which would show a scary red error in the first cell.
KNOWN_HARMLESS: tuple[str, ...] = ("Leap second table TAI_UTC seems out-of-date",)


class LogTail:
    """Return the lines appended to a CASA log file since the previous call.

    The first :meth:`read_new` returns what was written after the ``LogTail`` was
    made (or, with ``from_start=True``, the whole file).  A file that does not exist
    yet is waited for; a file that was truncated or replaced is read from its start.
    Messages whose first line contains one of ``ignore`` are dropped, with their
    continuation lines.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        from_start: bool = False,
        ignore: Iterable[str] = KNOWN_HARMLESS,
    ) -> None:
        self.path = os.fspath(path)
        self.ignore = tuple(ignore)
        self._offset = 0
        self._inode: tuple[int, int] | None = None
        # Whether the message being continued by "+" lines was kept, across calls.
        self._keep_continuation = False
        if not from_start:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                pass
            else:
                self._offset = st.st_size
                self._inode = (st.st_dev, st.st_ino)

    def read_new(self, levels: Iterable[str] = ("WARN", "SEVERE")) -> list[str]:
        """Lines appended since the last call whose level is in ``levels``.

        Lines are returned whole (date, level, origin, message, tab-separated),
        without their newline.
        """
        wanted = {level.upper() for level in levels}
        data = self._read_complete_lines()
        kept: list[str] = []
        for line in data.decode("utf-8", errors="replace").splitlines():
            fields = line.split("\t", 3)
            if len(fields) < 4:
                # Not a CASA log line (e.g. text a library wrote into the file):
                # it goes with the message before it.
                if self._keep_continuation:
                    kept.append(line)
                continue
            _when, level, origin, message = fields
            if not origin.endswith("+"):  # a new message starts
                self._keep_continuation = level.strip() in wanted and not any(
                    pattern in message for pattern in self.ignore
                )
            if self._keep_continuation:
                kept.append(line)
        return kept

    def _read_complete_lines(self) -> bytes:
        """The bytes after the offset up to the last newline; moves the offset."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return b""
        with f:
            st = os.fstat(f.fileno())
            inode = (st.st_dev, st.st_ino)
            if inode != self._inode or st.st_size < self._offset:
                # A file seen for the first time (the offset is then 0 already), a
                # replaced (rotated) file or a truncated one: read it from its start.
                self._offset = 0
                self._inode = inode
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        return data[:end]


# Files one kernel leaves in the log folder (casa-<host>-kernel<pid>-<role>.log,
# the engines' ipengine-casa-kernel-<pid>-*.log, casa-kernel-<pid>-cluster.log):
# one set per kernel ever started, so without pruning the folder only grows.
KERNEL_LOG_PATTERNS: tuple[str, ...] = (
    "casa-*-kernel*-*.log",
    "casa-*-kernel*-*.casarc",  # a server's memory share for CASA (server/memory.py)
    "ipengine-casa-kernel-*.log",
    "casa-kernel-*-cluster.log",
)
KEEP_LOG_DAYS = 30  # long enough to read a month-old failure; a live log is newer


def prune_old_logs(log_dir: str, keep_days: float = KEEP_LOG_DAYS) -> list[str]:
    """Remove per-kernel log files not written for ``keep_days`` days; return them.

    Age is the file's modification time: a running kernel's logs are written on
    every message, so only those of kernels long gone (or long idle) qualify.
    Files of other names (the user's, CASA's own) are never touched; a file that
    vanishes or cannot be removed meanwhile (another kernel pruning, permissions)
    is skipped.
    """
    import fnmatch
    import time

    cutoff = time.time() - keep_days * 86400.0
    removed: list[str] = []
    try:
        names = os.listdir(log_dir)
    except OSError:
        return removed
    for name in names:
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in KERNEL_LOG_PATTERNS):
            continue
        path = os.path.join(log_dir, name)
        try:
            if os.path.isfile(path) and os.stat(path).st_mtime < cutoff:
                os.remove(path)
                removed.append(path)
        except OSError:
            continue
    return removed
