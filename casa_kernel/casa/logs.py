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
