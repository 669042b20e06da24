"""Hostfile parsing and mpicasa-style placement (casa_kernel.config.hostfile)."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casa_kernel.config import hostfile
from casa_kernel.config.hostfile import (
    DEFAULT_SLOTS,
    HostEntry,
    Placement,
    is_local_host,
    parse_hostfile,
    place,
    read_hostfile,
)
from casa_kernel.errors import HostfileError, PlacementError

PATH = "conf/hosts.txt"
STARS = "orion slots=5\nantares slots=4\nsirius slots=4\n"


def rows(entries: list[HostEntry]) -> list[tuple[str, int, int | None, int]]:
    return [(e.host, e.slots, e.max_slots, e.line) for e in entries]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            STARS,
            [("orion", 5, None, 1), ("antares", 4, None, 2), ("sirius", 4, None, 3)],
            id="mpicasa-example",
        ),
        pytest.param(
            "# cluster\n\n   orion slots=2   # the head node\n\t\n  # end\n",
            [("orion", 2, None, 3)],
            id="comments-and-blanks",
        ),
        pytest.param("orion slots=2#no space", [("orion", 2, None, 1)], id="comment-glued"),
        pytest.param("orion#slots=9", [("orion", DEFAULT_SLOTS, None, 1)], id="comment-hides-key"),
        pytest.param("orion", [("orion", DEFAULT_SLOTS, None, 1)], id="bare-host"),
        pytest.param("orion\nantares", [("orion", 1, None, 1), ("antares", 1, None, 2)], id="bare"),
        pytest.param("orion max_slots=3", [("orion", 3, 3, 1)], id="max-slots-alone"),
        pytest.param("orion slots=2 max_slots=4", [("orion", 2, 4, 1)], id="slots-and-max"),
        pytest.param("orion max-slots=4 slots=2", [("orion", 2, 4, 1)], id="dash-spelling"),
        pytest.param("orion slots=4 max_slots=4", [("orion", 4, 4, 1)], id="slots-equal-max"),
        pytest.param("orion  slots = 3", [("orion", 3, None, 1)], id="spaces-around-equals"),
        pytest.param("orion slots=007", [("orion", 7, None, 1)], id="leading-zeros"),
        pytest.param(
            "orion slots=2\nantares\norion slots=3\n",
            [("orion", 5, None, 1), ("antares", 1, None, 2)],
            id="duplicate-adds-up-keeps-first-place",
        ),
        pytest.param("orion\norion\norion", [("orion", 3, None, 1)], id="duplicate-bare"),
        pytest.param(
            "a slots=1 max_slots=2\na slots=2 max_slots=3",
            [("a", 3, 5, 1)],
            id="duplicate-adds-max",
        ),
        pytest.param(
            "a slots=1 max_slots=2\na slots=2", [("a", 3, None, 1)], id="duplicate-uncapped"
        ),
        pytest.param("a slots=2\r\n\r\nb\r\n", [("a", 2, None, 1), ("b", 1, None, 3)], id="crlf"),
        pytest.param(
            "127.0.0.1 slots=2\n::1\nfe80::1%eth0\nnode-01.example.org\nnode_2\n",
            [
                ("127.0.0.1", 2, None, 1),
                ("::1", 1, None, 2),
                ("fe80::1%eth0", 1, None, 3),
                ("node-01.example.org", 1, None, 4),
                ("node_2", 1, None, 5),
            ],
            id="addresses-and-names",
        ),
    ],
)
def test_parse(text: str, expected: list[tuple[str, int, int | None, int]]) -> None:
    assert rows(parse_hostfile(text, PATH)) == expected


@pytest.mark.parametrize(
    ("text", "line", "token"),
    [
        ("orion slots=0", 1, "slots=0"),
        ("# c\n\norion slots=-1", 3, "slots=-1"),
        ("orion\nantares slots=abc", 2, "slots=abc"),
        ("orion slots=", 1, "slots="),
        ("orion slots= # forgot", 1, "slots="),
        ("orion slots=2.0", 1, "slots=2.0"),
        ("orion slots=+3", 1, "slots=+3"),
        ("orion slots=1e3", 1, "slots=1e3"),
        ("orion slots=\u0663", 1, "slots=\u0663"),  # Arabic-Indic 3: int() would take it
        ("orion slots=99999999999", 1, "slots=99999999999"),
        ("orion max_slots=0", 1, "max_slots=0"),
        ("orion slots=2 slots=3", 1, "slots=3"),
        ("orion max_slots=2 max-slots=3", 1, "max-slots=3"),
        ("a\nb\norion slots=5 max_slots=4", 3, "max_slots=4"),
        ("orion max_slots=4 slots=5", 1, "slots=5"),
        ("orion cpu=4", 1, "cpu"),
        ("orion slot=4", 1, "slot"),
        ("orion count=4", 1, "count"),
        ("orion slots_max=4", 1, "slots_max"),
        ("orion Slots=4", 1, "Slots"),
        ("orion 4", 1, "4"),
        ("orion slots", 1, "slots"),
        ("orion antares", 1, "antares"),
        ("orion slots=4 extra", 1, "extra"),
        ("orion!", 1, "orion!"),
        ("ok\n-orion", 2, "-orion"),
        ("or/ion slots=2", 1, "or/ion"),
        ("or\u00a0ion slots=2", 1, "or\u00a0ion"),  # no-break space is not a separator
        ("slots=4", 1, "slots=4"),
        ("=", 1, "="),
        ("fe80::zz", 1, "fe80::zz"),
        ("fe80::1%et/h0", 1, "fe80::1%et/h0"),
        ("a\r\nb\r\nc slots=x\r\n", 3, "slots=x"),
        ("a\x0bb", 1, "b"),  # \v is a blank, not a line break: "b" is a bare token
    ],
)
def test_parse_error_names_file_line_and_token(text: str, line: int, token: str) -> None:
    with pytest.raises(HostfileError) as info:
        parse_hostfile(text, PATH)
    assert info.value.line == line
    assert info.value.path == PATH
    assert str(info.value).startswith(f"{PATH}:{line}: ")
    assert repr(token) in str(info.value)


def test_vertical_tab_is_a_blank() -> None:
    # The error above must come from the bare token, not from \v inside the host.
    assert rows(parse_hostfile("a\x0bslots=2")) == [("a", 2, None, 1)]


@pytest.mark.parametrize("text", ["", "\n\n", "# only\n   # comments\n\t\n", "#orion slots=2"])
def test_no_hosts_is_an_error_naming_the_file(text: str) -> None:
    with pytest.raises(HostfileError) as info:
        parse_hostfile(text, PATH)
    assert info.value.line is None
    assert str(info.value).startswith(f"{PATH}: ")
    assert "no hosts" in str(info.value)


# --------------------------------------------------------------------------- reading


def test_read_hostfile(tmp_path) -> None:
    path = tmp_path / "hosts.txt"
    path.write_text(STARS)
    assert rows(read_hostfile(path)) == rows(parse_hostfile(STARS))
    assert rows(read_hostfile(str(path))) == rows(parse_hostfile(STARS))


def test_read_hostfile_skips_byte_order_mark(tmp_path) -> None:
    path = tmp_path / "hosts.txt"
    path.write_bytes(b"\xef\xbb\xbforion slots=2\n")
    assert rows(read_hostfile(path)) == [("orion", 2, None, 1)]


def test_read_hostfile_errors_name_the_file_and_line(tmp_path) -> None:
    path = tmp_path / "hosts.txt"
    path.write_text("orion\nantares slots=x\n")
    with pytest.raises(HostfileError) as info:
        read_hostfile(path)
    assert str(info.value).startswith(f"{path}:2: ")


@pytest.mark.parametrize(
    ("make", "line", "words"),
    [
        pytest.param(lambda p: None, None, "not found", id="missing"),
        pytest.param(lambda p: p.mkdir(), None, "directory", id="directory"),
        pytest.param(lambda p: p.write_bytes(b"orion\n\xff\xfe\n"), 2, "UTF-8", id="not-utf8"),
    ],
)
def test_read_hostfile_unreadable(tmp_path, make, line: int | None, words: str) -> None:
    path = tmp_path / "hosts.txt"
    make(path)
    with pytest.raises(HostfileError) as info:
        read_hostfile(path)
    assert info.value.path == str(path)
    assert info.value.line == line
    assert str(path) in str(info.value)
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (PermissionError(13, "Permission denied"), "permission denied"),
        (OSError(5, "Input/output error"), "Input/output error"),
    ],
)
def test_read_hostfile_os_errors(monkeypatch, tmp_path, error: OSError, words: str) -> None:
    # Faked: chmod 000 does not stop root, and an I/O error cannot be staged.
    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(hostfile, "open", refuse, raising=False)
    path = tmp_path / "hosts.txt"
    with pytest.raises(HostfileError) as info:
        read_hostfile(path)
    assert info.value.path == str(path)
    assert words in str(info.value)


# --------------------------------------------------------------------------- placement

STAR_HOSTS = parse_hostfile(STARS, "hosts.txt")


@pytest.mark.parametrize(
    ("text", "nprocs", "client", "slots"),
    [
        (STARS, 13, "orion", [("orion", 4), ("antares", 4), ("sirius", 4)]),
        (STARS, 7, "orion", [("orion", 4), ("antares", 2)]),
        (STARS, 2, "orion", [("orion", 1)]),
        (STARS, None, "orion", [("orion", 4), ("antares", 4), ("sirius", 4)]),
        (STARS, 5, "orion", [("orion", 4)]),
        (STARS, 6, "orion", [("orion", 4), ("antares", 1)]),
        ("head slots=1\nw1 slots=2\nw2 slots=2", 3, "head", [("w1", 2)]),
        ("head slots=1\nw1 slots=2\nw2 slots=2", None, "head", [("w1", 2), ("w2", 2)]),
        ("head\nw1 max_slots=3", None, "head", [("w1", 3)]),
        ("solo slots=2", None, "solo", [("solo", 1)]),
    ],
)
def test_place_with_hostfile(
    text: str, nprocs: int | None, client: str, slots: list[tuple[str, int]]
) -> None:
    placement = place(nprocs, parse_hostfile(text, "hosts.txt"), "hosts.txt")
    assert placement.client_host == client
    assert placement.server_slots() == slots
    assert placement.servers == tuple(h for h, k in slots for _ in range(k))
    assert placement.nprocs == 1 + sum(k for _, k in slots)
    assert placement.hostfile == "hosts.txt"


def test_place_rank_order() -> None:
    placement = place(7, STAR_HOSTS, "hosts.txt")
    assert placement.servers == ("orion",) * 4 + ("antares",) * 2
    assert placement.nprocs == 7


@pytest.mark.parametrize("nprocs", [2, 3, 8])
def test_place_without_hostfile_is_localhost(nprocs: int) -> None:
    placement = place(nprocs)
    assert placement == Placement("localhost", ("localhost",) * (nprocs - 1), None)
    assert placement.nprocs == nprocs
    assert placement.server_slots() == [("localhost", nprocs - 1)]


def test_place_without_path_still_names_a_source() -> None:
    assert place(2, STAR_HOSTS).hostfile == "<hostfile>"


@pytest.mark.parametrize(
    ("nprocs", "hosts", "path", "message"),
    [
        (
            5,
            "localhost slots=3",
            "hosts.txt",
            "N=5 processes requested but hosts.txt has 3 slots (localhost 3)",
        ),
        (
            14,
            STARS,
            "hosts.txt",
            "N=14 processes requested but hosts.txt has 13 slots (orion 5, antares 4, sirius 4)",
        ),
        (1, STARS, "hosts.txt", "N=1 processes requested (hostfile hosts.txt)"),
        (0, STARS, "hosts.txt", "N=0 "),
        (-3, None, None, "N=-3 "),
        (1, None, None, "at least 2"),
        (None, "solo slots=1", "solo.txt", "solo.txt has only 1 slot"),
        (None, None, None, "no process count and no hostfile"),
        ("4", None, None, "whole number, got '4'"),
        (4.0, None, None, "whole number, got 4.0"),
        (True, None, None, "whole number, got True"),
        ("4", STARS, "hosts.txt", "(hostfile hosts.txt)"),
    ],
)
def test_place_errors(nprocs, hosts: str | None, path: str | None, message: str) -> None:
    entries = parse_hostfile(hosts, path or "<hostfile>") if hosts is not None else None
    with pytest.raises(PlacementError) as info:
        place(nprocs, entries, path)
    assert message in str(info.value)


def test_place_empty_host_list() -> None:
    with pytest.raises(PlacementError, match="hosts.txt has no hosts"):
        place(3, [], "hosts.txt")


def test_place_accepts_integer_like() -> None:
    class Index:  # like numpy.int64: an integer, though not an int
        def __index__(self) -> int:
            return 3

    assert place(Index()).nprocs == 3  # type: ignore[arg-type]


def test_placement_refuses_interleaved_hosts() -> None:
    with pytest.raises(ValueError, match="consecutive"):
        Placement("a", ("a", "b", "a"))


# --------------------------------------------------------------------------- derived hostfile


@pytest.mark.parametrize("nprocs", [2, 5, 7, 13])
def test_server_hostfile_round_trips(nprocs: int) -> None:
    placement = place(nprocs, STAR_HOSTS, "hosts.txt")
    text = placement.server_hostfile_text()
    assert [(e.host, e.slots) for e in parse_hostfile(text)] == placement.server_slots()


def test_server_hostfile_text_exact() -> None:
    text = place(7, STAR_HOSTS, "conf/hosts.txt").server_hostfile_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert body == ["orion slots=4", "antares slots=2"]
    assert "derived" in header[0].lower()
    assert "conf/hosts.txt" in header[0]
    assert text.endswith("\n")


def test_server_hostfile_text_without_hostfile() -> None:
    text = place(4).server_hostfile_text()
    assert "localhost slots=3\n" in text
    assert "process count of 4" in text
    assert [(e.host, e.slots) for e in parse_hostfile(text)] == [("localhost", 3)]


@pytest.mark.parametrize(
    ("nprocs", "body"),
    [
        # the client's slot on orion is the cube client's (world rank 0), then servers
        (7, ["orion slots=5", "antares slots=2"]),
        (13, ["orion slots=5", "antares slots=4", "sirius slots=4"]),
    ],
)
def test_server_hostfile_gives_the_clients_slot_to_the_cube_client(nprocs, body) -> None:
    placement = place(nprocs, STAR_HOSTS, "hosts.txt")
    text = placement.server_hostfile_text(cube_client=True)
    assert [line for line in text.splitlines() if not line.startswith("#")] == body
    # mpiexec -n servers+1 fills exactly these slots: the cube client first
    assert sum(e.slots for e in parse_hostfile(text)) == len(placement.servers) + 1


def test_cube_client_slot_on_a_client_host_without_servers() -> None:
    placement = Placement("orion", ("antares", "antares"))
    text = placement.server_hostfile_text(cube_client=True)
    assert [(e.host, e.slots) for e in parse_hostfile(text)] == [("orion", 1), ("antares", 2)]


def test_server_hostfile_header_survives_a_newline_in_the_path() -> None:
    placement = place(3, STAR_HOSTS, "odd\nevil slots=99")
    assert [(e.host, e.slots) for e in parse_hostfile(placement.server_hostfile_text())] == [
        ("orion", 2)
    ]


# --------------------------------------------------------------------------- local hosts


@pytest.fixture
def on_orion(monkeypatch):
    """Pretend this machine is orion.example.org; count DNS lookups."""
    calls: list[int] = []

    def getfqdn(name: str = "") -> str:
        calls.append(1)
        return "orion.example.org"

    monkeypatch.setattr(socket, "gethostname", lambda: "Orion")
    monkeypatch.setattr(socket, "getfqdn", getfqdn)
    hostfile._fqdn.cache_clear()
    yield calls
    hostfile._fqdn.cache_clear()


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("localhost", True),
        ("LOCALHOST", True),
        ("localhost.localdomain", True),
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("orion", True),
        ("ORION.", True),
        ("orion.example.org", True),
        ("antares", False),
        ("orion.other.org", False),
        ("10.0.0.1", False),
        ("::2", False),
        ("", False),
    ],
)
def test_is_local_host(on_orion, name: str, local: bool) -> None:
    assert is_local_host(name) is local


def test_is_local_host_asks_dns_late_and_once(on_orion) -> None:
    assert is_local_host("localhost") and is_local_host("orion")
    assert on_orion == []  # the cheap checks answered
    assert not is_local_host("antares")
    assert not is_local_host("sirius")
    assert on_orion == [1]


def test_is_local_host_short_name_of_a_qualified_hostname(monkeypatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "sirius.example.org")
    assert is_local_host("sirius")
    assert is_local_host("sirius.example.org")


@pytest.mark.parametrize(
    ("text", "nprocs", "local"),
    [
        (None, 4, True),
        ("localhost slots=2\n127.0.0.1 slots=2\norion", 5, True),
        (STARS, 5, True),  # everything on orion
        (STARS, 6, False),  # one server on antares
        ("antares slots=1\nlocalhost slots=2", 3, False),  # the client is remote
    ],
)
def test_placement_is_local(on_orion, text: str | None, nprocs: int, local: bool) -> None:
    hosts = parse_hostfile(text) if text is not None else None
    assert place(nprocs, hosts).is_local is local


# --------------------------------------------------------------------------- properties

PROPERTY = settings(max_examples=200, deadline=None)


def check_parse_outcome(text: str) -> None:
    """parse_hostfile returns hosts or raises HostfileError with a line in the text.

    An error at line L must come from that line alone: the line by itself fails
    too, and the lines before it parse (or only lack a host).
    """
    lines = text.split("\n")
    try:
        entries = parse_hostfile(text, PATH)
    except HostfileError as exc:
        assert str(exc).startswith(PATH)
        if exc.line is None:
            assert "no hosts" in str(exc)
            return
        assert isinstance(exc.line, int)
        assert 1 <= exc.line <= len(lines)
        with pytest.raises(HostfileError) as alone:
            parse_hostfile(lines[exc.line - 1])
        assert alone.value.line == 1
        try:
            parse_hostfile("\n".join(lines[: exc.line - 1]))
        except HostfileError as before:
            assert before.line is None
    else:
        assert entries
        assert all(e.slots >= 1 and 1 <= e.line <= len(lines) for e in entries)
        assert len({e.host for e in entries}) == len(entries)


@PROPERTY
@given(st.text())
def test_parse_arbitrary_text(text: str) -> None:
    check_parse_outcome(text)


BLANK = st.sampled_from(["", " ", "\t", "  ", "\r", "\x0b", "\u00a0"])
HOSTISH = st.sampled_from(
    ["orion", "antares", "node-1.example.org", "127.0.0.1", "::1", "fe80::1%eth0", "fe80::zz"]
    + ["bad!host", "-x", "x=", "slots=2", "h\u00e9", "", "#orion", "a#b"]
)
KEYISH = st.sampled_from(["slots", "max_slots", "max-slots", "slot", "cpu", "Slots", ""])
EQUALS = st.sampled_from(["=", " = ", "", "==", "=\t"])
VALUE = st.sampled_from(["1", "4", "12", "007", "0", "-1", "abc", "", "2.5", "\u0663", "9" * 12])
COMMENT = st.sampled_from(["", "# c", "#", " # slots=0", "#\u00a0"])


@st.composite
def plausible_lines(draw) -> str:
    fields = draw(st.lists(st.tuples(KEYISH, EQUALS, VALUE), max_size=3))
    parts = [draw(HOSTISH)] + ["".join(f) for f in fields]
    sep = draw(BLANK.filter(bool))
    return draw(BLANK) + sep.join(parts) + draw(BLANK) + draw(COMMENT)


@PROPERTY
@given(st.lists(plausible_lines(), max_size=8), st.sampled_from(["\n", "\r\n"]))
def test_parse_plausible_text(lines: list[str], newline: str) -> None:
    check_parse_outcome(newline.join(lines))


NAMES = st.from_regex(r"[a-z][a-z0-9-]{0,6}", fullmatch=True)
VALID_LINE = st.tuples(
    NAMES, st.none() | st.integers(1, 9), st.none() | st.integers(0, 5), st.booleans()
)


@PROPERTY
@given(st.lists(VALID_LINE, min_size=1, max_size=10))
def test_parse_valid_lines_matches_model(spec: list) -> None:
    """Rendered valid lines parse to the sums a simple model predicts."""
    text_lines = []
    model: dict[str, list] = {}  # host -> [slots, max_slots, first line]
    for number, (host, slots, extra, dash) in enumerate(spec, start=1):
        words = [host]
        cap = None if extra is None else (slots or 1) + extra
        if slots is not None:
            words.append(f"slots={slots}")
        if cap is not None:
            words.append(f"{'max-slots' if dash else 'max_slots'}={cap}")
        text_lines.append(" ".join(words))
        got = slots if slots is not None else cap if cap is not None else DEFAULT_SLOTS
        if host not in model:
            model[host] = [got, cap, number]
        else:
            model[host][0] += got
            old = model[host][1]
            model[host][1] = None if old is None or cap is None else old + cap
    assert rows(parse_hostfile("\n".join(text_lines))) == [
        (host, s, m, line) for host, (s, m, line) in model.items()
    ]


@st.composite
def host_lists(draw) -> list[HostEntry]:
    names = draw(st.lists(NAMES, min_size=1, max_size=6, unique=True))
    return [HostEntry(name, draw(st.integers(1, 6)), None, i + 1) for i, name in enumerate(names)]


@PROPERTY
@given(host_lists(), st.data())
def test_place_fills_slots_in_file_order(hosts: list[HostEntry], data) -> None:
    total = sum(h.slots for h in hosts)
    if total < 2:
        with pytest.raises(PlacementError):
            place(None, hosts, "hosts.txt")
        return
    nprocs = data.draw(st.none() | st.integers(2, total))
    placement = place(nprocs, hosts, "hosts.txt")
    n = total if nprocs is None else nprocs

    assert placement.client_host == hosts[0].host
    assert len(placement.servers) == n - 1
    assert placement.nprocs == n
    counts = dict(placement.server_slots())
    capacity = [h.slots - (1 if i == 0 else 0) for i, h in enumerate(hosts)]
    used = [counts.get(h.host, 0) for h in hosts]
    assert all(0 <= u <= c for u, c in zip(used, capacity, strict=True))
    for i, u in enumerate(used):
        if u:  # a host only gets servers once every earlier host is full
            assert used[:i] == capacity[:i]
    # rank order is file order
    assert placement.servers == tuple(
        h.host for h, u in zip(hosts, used, strict=True) for _ in range(u)
    )
    derived = parse_hostfile(placement.server_hostfile_text())
    assert [(e.host, e.slots) for e in derived] == placement.server_slots()
    assert all(e.max_slots is None for e in derived)


@PROPERTY
@given(host_lists(), st.integers(1, 50))
def test_place_refuses_more_than_the_slots(hosts: list[HostEntry], excess: int) -> None:
    total = sum(h.slots for h in hosts)
    with pytest.raises(PlacementError) as info:
        place(max(2, total + excess), hosts, "hosts.txt")
    assert f"N={max(2, total + excess)} processes requested" in str(info.value)
    assert f"hosts.txt has {total} slot" in str(info.value)


# -- sanity of a local cluster: servers per core without a hostfile ----------------


@pytest.mark.parametrize(
    "nprocs, cores, oversubscribe, refused",
    [
        (3, 2, False, False),
        (17, 2, False, False),  # 16 servers: 8 per core, the limit
        (18, 2, False, True),  # 17 servers on 2 cores
        (10000, 2, False, True),
        (10000, 2, True, False),  # forced
        (9, 1, False, False),
        (10, 1, False, True),
        (10, 0, False, True),  # a machine reporting no cores counts as one
        (257, 32, False, False),
        (258, 32, False, True),
        (10000, None, False, False),  # cores unknown: no check (kernelspec install)
        (100_001, None, True, True),  # beyond any cluster, forced or not
    ],
)
def test_local_servers_per_core(nprocs, cores, oversubscribe, refused):
    if not refused:
        placement = place(nprocs, cores=cores, oversubscribe=oversubscribe)
        assert len(placement.servers) == nprocs - 1
        return
    with pytest.raises(PlacementError) as info:
        place(nprocs, cores=cores, oversubscribe=oversubscribe)
    message = str(info.value)
    if nprocs > hostfile.MAX_PROCS:
        assert f"N={nprocs} processes" in message and "at most 100000" in message
        return
    assert f"N={nprocs}" in message and f"{nprocs - 1} servers" in message
    assert f"({8 * max(1, cores)})" in message
    assert "--oversubscribe" in message and "CASA_KERNEL_OVERSUBSCRIBE=1" in message


def test_hostfile_is_not_capped_per_local_core_but_has_a_ceiling():
    hosts = parse_hostfile("localhost slots=40\n", "hosts.txt")
    assert len(place(40, hosts, "hosts.txt", cores=2).servers) == 39
    huge = parse_hostfile("orion slots=999999999\n", "hosts.txt")
    with pytest.raises(PlacementError, match=r"N=999999999 processes \(hostfile hosts.txt\)"):
        place(None, huge, "hosts.txt")


def test_cluster_config_refuses_before_launching(monkeypatch):
    from casa_kernel.config.settings import ClusterConfig

    monkeypatch.setattr("casa_kernel.config.settings.local_cores", lambda: 2)
    with pytest.raises(PlacementError, match="9999 servers"):
        ClusterConfig.from_env({"CASA_KERNEL_NPROCS": "10000"})
    forced = {"CASA_KERNEL_NPROCS": "100", "CASA_KERNEL_OVERSUBSCRIBE": "1"}
    assert ClusterConfig.from_env(forced).nservers == 99
    assert ClusterConfig.from_options(nprocs=100, oversubscribe=True).nservers == 99
