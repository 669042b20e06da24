"""Capture every TCP byte inside a network namespace, as root, with no package.

An ``AF_PACKET`` raw socket sees the frames of every interface of the namespace
(``lo`` too: traffic to any local address, 127.0.1.1 included, goes over ``lo``).
Each frame is seen twice on ``lo`` (sent and received): only received copies are
kept. TCP payloads are put back in sequence order per direction of each
connection, so a marker split over two segments is still found.

The kernel's own Jupyter channels carry the cell text and its result in clear by
design (they are the Jupyter server's business): callers leave their ports out.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import defaultdict
from dataclasses import dataclass, field

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # sll_pkttype of a copy being sent (the received one is kept)
SOL_PACKET = 263
PACKET_STATISTICS = 6
BUFFER = 256 << 20  # the kernel queues this much before dropping frames

Flow = tuple[str, int, str, int]  # source address and port, destination address and port


@dataclass
class Capture:
    """Frames of every interface of this namespace, from start() to stop()."""

    frames: list[bytes] = field(default_factory=list)
    drops: int = -1  # frames the kernel dropped (read at stop; -1: not yet)

    def start(self) -> Capture:
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.setsockopt(socket.SOL_SOCKET, 33, BUFFER)  # SO_RCVBUFFORCE: root may
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="capture", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        while True:
            try:
                frame, address = self._sock.recvfrom(1 << 17)
            except TimeoutError:
                if self._stop.is_set():
                    return
                continue
            if address[2] != PACKET_OUTGOING:
                self.frames.append(frame)

    def stop(self) -> None:
        """Stop once everything queued so far is read; count the drops."""
        self._stop.set()
        self._thread.join()
        _, self.drops = struct.unpack("II", self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self._sock.close()


def tcp_streams(frames: list[bytes]) -> dict[Flow, bytes]:
    """The payload bytes of each direction of each TCP connection, in sequence order."""
    segments: dict[Flow, dict[int, bytes]] = defaultdict(dict)
    first: dict[Flow, int] = {}
    for frame in frames:
        parsed = _tcp_segment(frame)
        if parsed is None:
            continue
        flow, seq, payload = parsed
        if not payload:
            continue
        first.setdefault(flow, seq)
        segments[flow][seq] = payload  # a retransmission replaces its copy
    streams = {}
    for flow, parts in segments.items():
        start = first[flow]
        order = sorted(parts, key=lambda seq: (seq - start) % (1 << 32))
        streams[flow] = b"".join(parts[seq] for seq in order)
    return streams


def _tcp_segment(frame: bytes) -> tuple[Flow, int, bytes] | None:
    """(flow, sequence number, payload) of an Ethernet frame carrying TCP, else None."""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    ip = frame[14:]
    if ethertype == 0x0800 and len(ip) >= 20:
        header = (ip[0] & 0x0F) * 4
        total = struct.unpack_from("!H", ip, 2)[0]
        if ip[9] != socket.IPPROTO_TCP:
            return None
        src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        tcp = ip[header:total]
    elif ethertype == 0x86DD and len(ip) >= 40:
        if ip[6] != socket.IPPROTO_TCP:  # (no extension headers on these links)
            return None
        length = struct.unpack_from("!H", ip, 4)[0]
        src = socket.inet_ntop(socket.AF_INET6, ip[8:24])
        dst = socket.inet_ntop(socket.AF_INET6, ip[24:40])
        tcp = ip[40 : 40 + length]
    else:
        return None
    if len(tcp) < 20:
        return None
    sport, dport, seq = struct.unpack_from("!HHI", tcp, 0)
    offset = (tcp[12] >> 4) * 4
    return (src, sport, dst, dport), seq, tcp[offset:]


def flows_containing(streams: dict[Flow, bytes], needle: bytes) -> list[str]:
    """'127.0.1.1:5000 > 127.0.1.1:41234' for each stream holding ``needle``."""
    return [
        f"{src}:{sport} > {dst}:{dport}"
        for (src, sport, dst, dport), data in sorted(streams.items())
        if needle in data
    ]
