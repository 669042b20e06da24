"""Live progress, the rendering: ONE short line of text, a table of servers in HTML."""

from __future__ import annotations

from casa_kernel.display import Progress, ServerRow, StatusTable


def _rows() -> list[ServerRow]:
    return [
        ServerRow(0, "orion", "busy", "obs.mms.0000.ms", 1.25, busy=2.0, jobs=1, pid=11),
        ServerRow(1, "antares", "idle", busy=3.0, jobs=2, pid=12),
    ]


def test_text_is_one_short_line_and_html_has_each_server():
    view = Progress("flagdata", 4, "sub-MS")
    view.update(_rows(), 3, 4.0)
    text = repr(view)
    assert "\n" not in text and len(text) < 120
    assert "flagdata: 3/4 sub-MS" in text and "1/2 servers busy" in text
    page = view._repr_html_()
    for words in ("orion", "antares", "obs.mms.0000.ms", "1.2 s", ">busy</span>", "50%", "75%"):
        assert words in page, words


def test_summary_names_wall_time_and_each_servers_busy_share():
    view = Progress("flagdata", 4, "sub-MS")
    view.finish(_rows(), 4, 5.0)
    assert repr(view) == (
        "casa-kernel: flagdata: 4/4 sub-MS in 5.0 s; busy: rank 0@orion 40%, rank 1@antares 60%"
    )
    assert "rank 1@antares 60%" in view._repr_html_()
    view.finish(_rows(), 4, 5.0, "ready", shares=False)
    assert repr(view) == "casa-kernel: flagdata: 4/4 sub-MS in 5.0 s; ready"


def test_status_table_has_work_and_memory():
    rows = _rows()
    rows[0].memory = 300 * 1024 * 1024
    table = StatusTable("CASA cluster (running)", rows)
    lines = repr(table).splitlines()
    assert lines[1].split() == ["rank", "host", "pid", "state", "work", "memory"]
    assert lines[2].split()[:5] == ["0", "orion", "11", "busy", "obs.mms.0000.ms"]
    assert lines[2].endswith("300.0 MiB") and lines[3].endswith("?")
    assert "<th" in table._repr_html_() and "300.0 MiB" in table._repr_html_()
