"""Display: the only module that knows how things look in the notebook.

Servers' output is written with a ``[rank R@host]`` prefix on every line, to the
kernel's own stdout/stderr so it lands in the cell that asked for it.
"""

from __future__ import annotations

import html
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

_SURROGATES = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """``text`` without what UTF-8 cannot encode (lone surrogates become U+FFFD):
    the kernel's own messages to the front end would fail on them."""
    return _SURROGATES.sub("\ufffd", text)


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
        buf = self._pending.get(key, "") + clean_text(text)
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


def rank_text(rank: int | None) -> str:
    """A rank as tables show it; negative is CASA's cube client (casa/role.py)."""
    return "cube client" if rank is not None and rank < 0 else str(rank)


def server_label(rank: int | None, host: str | None) -> str:
    who = "cube client" if rank is not None and rank < 0 else f"rank {rank}"
    return f"{who}@{host}" if host else who


class StatusTable:
    """``%casa_cluster status``: one row per server, as text and as HTML.

    Rows are :class:`ServerRow` (or anything with rank, host, pid, state).
    """

    columns = ("rank", "host", "pid", "state", "work", "memory")

    def __init__(self, title: str, rows: Iterable[Any]):
        self.title = title
        self.rows = [self._cells(r) for r in rows]

    @staticmethod
    def _cells(row: Any) -> tuple[str, ...]:
        work = getattr(row, "work", "") or "-"
        elapsed = getattr(row, "elapsed", None)
        if elapsed is not None and work != "-":
            work += f" ({_seconds(elapsed)})"
        return (
            rank_text(row.rank),
            str(row.host),
            str(row.pid),
            str(row.state),
            work,
            _memory(getattr(row, "memory", None), getattr(row, "share", None)),
        )

    def __repr__(self) -> str:
        widths = [
            max([len(c)] + [len(row[i]) for row in self.rows]) for i, c in enumerate(self.columns)
        ]
        lines = [self.title]
        lines.append("  ".join(c.ljust(w) for c, w in zip(self.columns, widths)).rstrip())
        for row in self.rows:
            lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = [
            [html.escape(v) if i != 3 else _state_html(v) for i, v in enumerate(row)]
            for row in self.rows
        ]
        return f"<p>{html.escape(self.title)}</p>" + html_table(list(self.columns), rows)


# ------------------------------------------------------------------ live progress


@dataclass
class ServerRow:
    """One server in a progress or status table."""

    rank: int
    host: str
    state: str = "idle"  # starting | idle | busy | done | dead
    work: str = ""  # what it runs now: a sub-MS, a task
    elapsed: float | None = None  # seconds on the current work
    busy: float = 0.0  # seconds spent on finished work
    jobs: int = 0  # finished pieces of work
    pid: int | None = None
    memory: int | None = None  # resident set size, bytes
    share: int | None = None  # the memory CASA plans for on it (0: the whole host)


def _memory(rss: int | None, share: int | None) -> str:
    """'212 MiB of 11.7 GiB': a server's memory against its share for CASA."""
    text = _bytes(rss)
    if share and text:
        text += f" of {_bytes(share)}"
    return text


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f} s" if value < 60 else f"{int(value // 60)} min {int(value % 60):02d} s"


def _bytes(value: int | None) -> str:
    if value is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""


_STATE_COLOURS = {
    "busy": "#2e7d32",
    "starting": "#ef6c00",
    "dead": "#c62828",
    "done": "#616161",
    "idle": "#616161",
}

_TABLE_STYLE = (
    "border-collapse:collapse;font-family:var(--jp-code-font-family,monospace);"
    "font-size:var(--jp-code-font-size,12px)"
)
_CELL_STYLE = "padding:1px 10px;text-align:left;border-bottom:1px solid #ddd"


def html_table(columns: list[str], rows: list[list[str]]) -> str:
    head = "".join(f'<th style="{_CELL_STYLE}">{html.escape(c)}</th>' for c in columns)
    body = "".join(
        "<tr>" + "".join(f'<td style="{_CELL_STYLE}">{cell}</td>' for cell in row) + "</tr>"
        for row in rows
    )
    return (
        f'<table style="{_TABLE_STYLE}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )


def _state_html(state: str) -> str:
    colour = _STATE_COLOURS.get(state, "#616161")
    return f'<span style="color:{colour};font-weight:bold">{html.escape(state)}</span>'


def _bar_html(done: int, total: int) -> str:
    share = 100.0 * done / total if total else 100.0
    return (
        '<div style="width:240px;height:8px;background:#e0e0e0;border-radius:4px;'
        'display:inline-block;vertical-align:middle;margin-right:8px">'
        f'<div style="width:{share:.0f}%;height:8px;background:#1976d2;border-radius:4px">'
        "</div></div>"
    )


class Progress:
    """ONE display of a long parallel operation, updated in place.

    In JupyterLab it is an HTML table (per server: rank, host, state, current
    work, elapsed) under a bar with done/total; plain front ends get one short
    text line, replaced in place where the front end supports it (nbconvert,
    JupyterLab) and never more than the final line otherwise. Outside IPython
    (scripts, benchmarks) nothing is shown. ``show_after`` keeps quick work
    (a no-op cell) from flashing a display at all.
    """

    min_interval = 0.25  # seconds between two updates of the display

    def __init__(self, title: str, total: int, unit: str = "jobs", show_after: float = 0.0):
        self.title = title
        self.total = total
        self.unit = unit
        self.show_after = show_after
        self.rows: list[ServerRow] = []
        self.done = 0
        self.elapsed = 0.0
        self.message = ""
        self.summary: str | None = None
        self.shares = True
        self._handle: Any = None
        self._shown_at = -1.0
        self._last: tuple[str, str] | None = None

    # -- updating ----------------------------------------------------------------

    @property
    def shown(self) -> bool:
        """Has the display been put in the notebook?"""
        return self._handle is not None

    def due(self, elapsed: float) -> bool:
        """Would :meth:`update` show anything now? (so callers can skip building rows)"""
        if self.total == 0 or (self._handle is None and elapsed < self.show_after):
            return False
        return time.monotonic() - self._shown_at >= self.min_interval

    def update(
        self,
        rows: list[ServerRow],
        done: int,
        elapsed: float,
        message: str = "",
        force: bool = False,
    ) -> None:
        self.rows, self.done, self.elapsed, self.message = rows, done, elapsed, message
        if self.total == 0:
            return  # nothing to run, nothing to show
        if force or self.due(elapsed):
            self._publish(time.monotonic())

    def finish(
        self,
        rows: list[ServerRow],
        done: int,
        wall: float,
        message: str = "",
        shares: bool = True,
    ) -> None:
        """Replace the live table by its final state and one summary line
        (wall time and, with ``shares``, each server's busy share of it)."""
        self.rows, self.done, self.elapsed = rows, done, wall
        self.message = message
        self.shares = shares
        busy = ", ".join(
            f"{server_label(r.rank, r.host)} {100.0 * r.busy / wall:.0f}%"
            for r in rows
            if wall > 0 and shares
        )
        self.summary = (
            f"{self.title}: {done}/{self.total} {self.unit} in {_seconds(wall)}"
            + (f"; busy: {busy}" if busy else "")
            + (f"; {message}" if message else "")
        )
        if self._handle is None and (wall < self.show_after or self.total == 0):
            return  # quick work (or none): no display at all
        self._publish(time.monotonic())

    def _publish(self, now: float) -> None:
        key = (self._repr_html_(), repr(self))
        if key == self._last:
            return
        self._last = key
        self._shown_at = now
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            return
        if get_ipython() is None:
            return
        if self._handle is None:
            self._handle = display(self, display_id=True)
        else:
            self._handle.update(self)

    # -- rendering -----------------------------------------------------------------

    def __repr__(self) -> str:
        if self.summary is not None:
            return f"casa-kernel: {self.summary}"
        busy = sum(1 for r in self.rows if r.state == "busy")
        text = f"casa-kernel: {self.title}: {self.done}/{self.total} {self.unit}"
        if self.rows:
            text += f", {busy}/{len(self.rows)} servers busy"
        text += f", {_seconds(self.elapsed)}"
        return text + (f" ({self.message})" if self.message else "")

    def _repr_html_(self) -> str:
        title = html.escape(self.title)
        if self.summary is not None:
            head = f"<b>{title}</b>: {html.escape(self.summary.split(': ', 1)[1])}"
        else:
            head = (
                f"{_bar_html(self.done, self.total)}<b>{title}</b>: {self.done}/{self.total} "
                f"{html.escape(self.unit)} done, {_seconds(self.elapsed)}"
            )
            if self.message:
                head += f" <i>({html.escape(self.message)})</i>"
        if self.shares:
            columns = ["rank", "host", "state", "running", "elapsed", "done", "busy", "memory"]
            rows = [
                [
                    rank_text(r.rank),
                    html.escape(r.host),
                    _state_html(r.state),
                    html.escape(r.work),
                    _seconds(r.elapsed),
                    str(r.jobs),
                    f"{100.0 * r.busy / self.elapsed:.0f}%" if self.elapsed > 0 else "",
                    _memory(r.memory, r.share),
                ]
                for r in self.rows
            ]
        else:  # no work to share out (a cluster start): where each server is
            columns = ["rank", "host", "state", "pid"]
            rows = [
                [rank_text(r.rank), html.escape(r.host), _state_html(r.state), str(r.pid or "")]
                for r in self.rows
            ]
        table = html_table(columns, rows) if rows else ""
        return f'<div class="casa-kernel-progress"><div>{head}</div>{table}</div>'


class StartProgress:
    """``wait_ready``'s progress callback: the cluster start as one live display."""

    def __init__(self, placement: Any, show_after: float = 0.0):
        self.placement = placement
        self.started = time.monotonic()
        self.view = Progress(
            "starting the CASA cluster", len(placement.servers), "servers", show_after
        )
        self.view.shares = False  # a start has no work to share out
        self.waited = False  # called at all: the cluster was not ready yet

    def __call__(self, message: str) -> None:
        self.waited = True
        registered = 0
        # (a batch job's note starts with the job: "Slurm job 12 RUNNING; 1/4 servers ...")
        match = re.search(r"(\d+)/\d+ servers registered", message)
        if match:
            registered = int(match.group(1))
        elif message.startswith("servers registered") or message == "running":
            registered = len(self.placement.servers)
        rows = [
            ServerRow(rank, host, "idle" if rank < registered else "starting")
            for rank, host in enumerate(self.placement.servers)
        ]
        self.view.update(rows, registered, time.monotonic() - self.started, message)

    def finish(self, servers: Iterable[Any], ok: bool = True) -> None:
        if not self.waited:
            return  # it was running already: nothing to report
        rows = [ServerRow(s.rank, s.host, "idle", pid=s.pid) for s in servers]
        wall = time.monotonic() - self.started
        servers_up = sum(1 for row in rows if row.rank >= 0)  # not CASA's cube client
        self.view.finish(rows, servers_up, wall, "ready" if ok else "failed", shares=False)
