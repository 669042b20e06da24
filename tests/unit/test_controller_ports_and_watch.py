"""Pure parts of the controller's ports and watch (cluster/ports.py, cluster/health.py)."""

from __future__ import annotations

import random
import socket

import pytest

from casa_kernel.cluster import health, ports


@pytest.mark.parametrize(
    ("ephemeral", "expected"),
    [
        ((32768, 60999), (12768, 32767)),  # Linux's default: below it
        ((49152, 65535), (29152, 49151)),  # IANA's
        ((1024, 65000), (65001, 65535)),  # a range that starts low: above it
        ((10000, 20000), (1024, 9999)),  # never below the privileged ports
        (None, ports.FALLBACK_RANGE),
    ],
)
def test_candidates_avoid_the_range_of_outgoing_connections(ephemeral, expected):
    assert ports.candidate_range(ephemeral) == expected


def test_ephemeral_range_is_read_from_the_kernel_file(tmp_path):
    path = tmp_path / "range"
    path.write_text("40000\t40120\n")
    assert ports.ephemeral_range(str(path)) == (40000, 40120)
    assert ports.ephemeral_range(str(tmp_path / "missing")) is None
    path.write_text("junk")
    assert ports.ephemeral_range(str(path)) is None


def test_free_ports_are_distinct_outside_the_range_and_skip_a_taken_port():
    first, last = ports.candidate_range(ports.ephemeral_range())
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    found = ports.free_ports(8, rng=random.Random(1))
    assert len(set(found)) == 8
    assert all(first <= port <= last for port in found)
    # a port held by someone is never chosen: seed the choice with it
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", found[0]))
        again = ports.free_ports(8, rng=random.Random(1))
    assert found[0] not in again and len(again) == 8
    taken.close()


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (-9, "was killed by signal 9 (SIGKILL)"),
        (-15, "was killed by signal 15 (SIGTERM)"),
        (1, "exited with code 1"),
        (None, "exited"),
        (-99, "was killed by signal 99"),
    ],
)
def test_exit_is_described_with_the_signal(code, words):
    assert health.describe_exit(code) == words


def test_watch_connects_to_the_hub_query_and_the_heart_monitor_pings():
    client = {
        "key": "k",
        "signature_scheme": "hmac-sha256",
        "interface": "tcp://127.0.0.1",
        "registration": 20001,
    }
    engine = {"interface": "tcp://*", "hb_ping": 20007, "registration": 20001}
    info = health.watch_info(client, engine)
    assert info["query"] == "tcp://127.0.0.1:20001"
    assert info["beats"] == "tcp://127.0.0.1:20007"  # bound everywhere: reached on loopback
    assert info["curve_serverkey"] == ""
