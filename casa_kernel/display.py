"""Display: the only module that knows how things look in the notebook.

Servers' output is written with a ``[rank R@host]`` prefix on every line, to the
kernel's own stdout/stderr so it lands in the cell that asked for it.
"""

from __future__ import annotations

import html
import sys
from collections.abc import Iterable
from typing import Any, TextIO


class StreamPrinter:
    """Re-emits servers' stdout/stderr as whole lines with a rank@host prefix.

    Text arrives in arbitrary chunks; a partial line is held until its end
    arrives (or :meth:`flush` at the end of the cell), so prefixes never land in
    the middle of a server's line.
    """

    def __init__(self, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self._out = {"stdout": stdout, "stderr": stderr}
        self._pending: dict[tuple[str, str], str] = {}

    def _stream(self, name: str) -> TextIO:
        stream = self._out.get(name)
        if stream is not None:
            return stream
        return sys.stderr if name == "stderr" else sys.stdout

    def write(self, label: str, name: str, text: str) -> None:
        key = (label, name)
        buf = self._pending.get(key, "") + text
        *lines, rest = buf.split("\n")
        self._pending[key] = rest
        if lines:
            stream = self._stream(name)
            stream.write("".join(f"[{label}] {line}\n" for line in lines))
            stream.flush()

    def flush(self) -> None:
        for (label, name), rest in list(self._pending.items()):
            if rest:
                stream = self._stream(name)
                stream.write(f"[{label}] {rest}\n")
                stream.flush()
        self._pending.clear()


def server_label(rank: int | None, host: str | None) -> str:
    return f"rank {rank}@{host}" if host else f"rank {rank}"


class StatusTable:
    """``%casa_cluster status``: one row per server, as text and as HTML."""

    columns = ("rank", "host", "pid", "state")

    def __init__(self, title: str, rows: Iterable[Any]):
        self.title = title
        self.rows = [tuple(getattr(r, c) for c in self.columns) for r in rows]

    def __repr__(self) -> str:
        widths = [
            max([len(c)] + [len(str(row[i])) for row in self.rows])
            for i, c in enumerate(self.columns)
        ]
        lines = [self.title]
        lines.append("  ".join(c.ljust(w) for c, w in zip(self.columns, widths)))
        for row in self.rows:
            lines.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{c}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
            for row in self.rows
        )
        return (
            f"<p>{html.escape(self.title)}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )


def progress(message: str) -> None:
    """Progress while waiting for servers: one line each, on stdout (stderr
    would look like an error in JupyterLab)."""
    print(f"casa-kernel: {message}", flush=True)
