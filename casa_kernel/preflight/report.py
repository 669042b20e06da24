"""Preflight: the report, a host x requirement table, and ONE error naming what fails."""

from __future__ import annotations

import html
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from casa_kernel import variables
from casa_kernel.display import html_table
from casa_kernel.errors import PreflightError
from casa_kernel.preflight.judge import REQUIREMENTS, Check


@dataclass
class Report:
    """The preflight's answer: every requirement on every host, and how long it took."""

    client_host: str
    hosts: list[str]
    checks: list[Check]
    seconds: float = 0.0
    agent: str = ""
    note: str = ""  # why nothing was checked, when nothing was

    @property
    def requirements(self) -> list[str]:
        seen = {c.requirement for c in self.checks}
        return [r for r in REQUIREMENTS if r in seen]

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    @property
    def ok(self) -> bool:
        return not self.failures()

    def title(self) -> str:
        if not self.hosts:
            return f"casa-kernel preflight: {self.note or 'no other host to check'}"
        failed = self.failures()
        verdict = (
            "all pass"
            if not failed
            else f"{len(failed)} failed on {', '.join(dict.fromkeys(c.host for c in failed))}"
        )
        return (
            f"casa-kernel preflight from {self.client_host}: {len(self.hosts)} "
            f"host{'s' if len(self.hosts) != 1 else ''} in {self.seconds:.2f} s "
            f"via {self.agent}: {verdict}"
        )

    def table(self) -> Any:
        """The host x requirement table (text and HTML, see :class:`CheckTable`)."""
        cells = {(c.host, c.requirement): c for c in self.checks}
        rows = [(host, [cells.get((host, r)) for r in self.requirements]) for host in self.hosts]
        notes = [
            f"{c.host} {c.requirement}: {c.reason}" + (f" -> {c.fix}" if c.fix else "")
            for c in self.checks
            if c.ok is False
        ]
        return CheckTable(self.title(), self.requirements, rows, notes)

    def error(self) -> PreflightError:
        """ONE error naming each failing host, requirement and what to do."""
        failed = self.failures()
        hosts = ", ".join(dict.fromkeys(c.host for c in failed))
        lines = [
            f"the servers cannot be launched on {hosts}: the preflight found "
            f"{len(failed)} problem{'s' if len(failed) != 1 else ''}"
        ]
        lines += [f"  {c.host}: {c.requirement}: {c.reason}\n    do: {c.fix}" for c in failed]
        lines.append(
            f"(%casa_cluster check shows every host and requirement; {variables.PREFLIGHT}=0 "
            "skips this check)"
        )
        return PreflightError("\n".join(lines), report=self)


_CHECK_MARKS = {True: ("ok", "#2e7d32"), False: ("FAIL", "#c62828"), None: ("-", "#9e9e9e")}


class CheckTable:
    """``%casa_cluster check``: one row per host, one column per requirement.

    ``rows`` are (host, cells), each cell anything with ``ok`` (True, False or
    None for not checked) and ``reason``, or None for a requirement not asked;
    ``notes`` (why each failure, what to do) follow the table.
    """

    def __init__(
        self, title: str, columns: Iterable[str], rows: Iterable[Any], notes: Iterable[str] = ()
    ):
        self.title = title
        self.columns = list(columns)
        self.rows = [(host, list(cells)) for host, cells in rows]
        self.notes = list(notes)

    @staticmethod
    def _mark(cell: Any) -> str:
        return _CHECK_MARKS[None][0] if cell is None else _CHECK_MARKS[cell.ok][0]

    def __repr__(self) -> str:
        head = ["host", *self.columns]
        body = [[host, *(self._mark(c) for c in cells)] for host, cells in self.rows]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        lines = [self.title]
        for row in [head, *body]:
            lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        lines += self.notes
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        def cell_html(cell: Any) -> str:
            if cell is None:
                return ""
            mark, colour = _CHECK_MARKS[cell.ok]
            reason = html.escape(cell.reason or "")
            # the reason in full on hover, shortened in the cell
            short = html.escape(_shorten(cell.reason or "", 40))
            return (
                f'<span title="{reason}"><span style="color:{colour};font-weight:bold">'
                f"{mark}</span> <small>{short}</small></span>"
            )

        rows = [[html.escape(host), *(cell_html(c) for c in cells)] for host, cells in self.rows]
        notes = "".join(f"<li>{html.escape(note)}</li>" for note in self.notes)
        return (
            f"<p>{html.escape(self.title)}</p>"
            + (html_table(["host", *self.columns], rows) if rows else "")
            + (f'<ul style="color:#c62828">{notes}</ul>' if notes else "")
        )


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
