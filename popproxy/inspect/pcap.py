"""``export --pcap``: the client leg re-enacted as IPv4/TCP packets in a classic pcap file.

The file shows what the *client* exchanged, as if it had talked to a POP3 server on port
110 directly: client bytes as the client sent them, and as server bytes everything the
client received, including the lines popproxy made itself (``"p": 1`` records; classic
pcap has no comments, so the text and HTML exports are where those are marked).  TCP is
synthesized: a three-way handshake, data split into segments of at most ``MAX_PAYLOAD``
octets, an ACK for each record, FIN/ACK both ways at the end, real checksums.

Addresses: the recorded client and upstream if they are IPv4 literals, else 10.0.0.1 and
10.0.0.2; the server port is always 110 (tshark's POP dissector needs it, see
docs/testing-notes), the client port is the recorded one when it parses.  ``PcapResult``
lists the real endpoints so the caller can say what stands for what.

STLS: once the client leg's TLS was decrypted (a ``tls`` record for direction ``c``, mode
``stls``, decrypted), the plaintext that follows goes on a second connection from the next
client port, because tshark treats everything after ``+OK`` to STLS as TLS records.
Passthrough TLS bytes (not decrypted) stay on the first connection, where they belong.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from popproxy import fsutil
from popproxy.capture import format as fmt
from popproxy.capture.reader import CaptureReader
from popproxy.core import Direction
from popproxy.inspect import Progress, metered_records

C, S = Direction.CLIENT, Direction.SERVER

LINKTYPE_ETHERNET = 1
SNAPLEN = 262144
MAX_PAYLOAD = 65000  # RFC 791 §3.1: Total Length is 16 bits; 20 + 20 + 65000 fits
POP3_PORT = 110  # RFC 1939 §3
DEFAULT_CLIENT_PORT = 50000
CLIENT_IP, SERVER_IP = "10.0.0.1", "10.0.0.2"
CLIENT_MAC, SERVER_MAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
CLIENT_ISN, SERVER_ISN = 0x10000000, 0x20000000
WINDOW = 65535
MAX_SECONDS = float(0xFFFFFFFF)

FIN, SYN, PSH, ACK = 0x01, 0x02, 0x08, 0x10


def ones_sum(data: bytes) -> int:
    """The 16-bit one's-complement sum of ``data`` (RFC 1071 §2), padded to even length.

    Since 2**16 ≡ 1 (mod 0xFFFF), the sum of the words equals the whole buffer read as one
    big-endian integer, modulo 0xFFFF: one C-speed pass instead of a Python loop per word.
    """
    if len(data) % 2:
        data += b"\x00"
    rest = int.from_bytes(data, "big") % 0xFFFF
    return rest if rest or not any(data) else 0xFFFF


def checksum(*parts: bytes) -> int:
    """The Internet checksum over ``parts`` (each of even length but the last)."""
    total = sum(ones_sum(p) for p in parts) % 0xFFFF
    return ~(total or 0xFFFF) & 0xFFFF


@dataclass
class PcapResult:
    """What ``export_pcap`` wrote, and which real endpoints the addresses stand for."""

    packets: int = 0
    connections: int = 0
    endpoints: list[str] = field(default_factory=list)


def _endpoint(text: object, fallback_ip: str) -> tuple[str, int | None, bool]:
    """(IPv4 address, port, real) from ``host:port``; the fallback when not IPv4."""
    host, _, port_text = str(text or "").rpartition(":")
    host = host.strip("[]")
    port = int(port_text) if port_text.isdigit() and 0 < int(port_text) < 65536 else None
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address):
            return host, port, True
    except ValueError:
        pass
    return fallback_ip, port, False


class PcapWriter:
    """Classic pcap (microsecond timestamps) of Ethernet II frames, written as they come."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.packets = 0
        self._ident = 0
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))

    def tcp(
        self,
        ts: float,
        src: tuple[str, int, bytes],
        dst: tuple[str, int, bytes],
        seq: int,
        ack: int,
        flags: int,
        payload: bytes = b"",
    ) -> None:
        src_ip, dst_ip = ipaddress.IPv4Address(src[0]).packed, ipaddress.IPv4Address(dst[0]).packed
        tcp_len = 20 + len(payload)
        # RFC 9293 §3.1: the checksum covers a pseudo-header, the TCP header and the data.
        pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, 6, tcp_len)
        head = struct.pack(
            "!HHIIBBHHH",
            src[1],
            dst[1],
            seq & 0xFFFFFFFF,
            ack & 0xFFFFFFFF,
            5 << 4,
            flags,
            WINDOW,
            0,
            0,
        )
        head = head[:16] + struct.pack("!H", checksum(pseudo + head, payload)) + head[18:]
        self._ident = (self._ident + 1) & 0xFFFF
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, self._ident, 0x4000, 64, 6, 0, src_ip, dst_ip
        )
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]  # RFC 791 §3.1
        frame_len = 14 + 20 + tcp_len
        ts = min(max(ts, 0.0), MAX_SECONDS)  # classic pcap: unsigned 32-bit seconds
        sec = int(ts)
        usec = min(round((ts - sec) * 1_000_000), 999_999)
        self.out.write(struct.pack("<IIII", sec, usec, frame_len, frame_len))
        self.out.write(dst[2] + src[2] + b"\x08\x00" + ip + head)
        self.out.write(payload)
        self.packets += 1


class _Connection:
    """One synthetic TCP connection between the client and port 110."""

    def __init__(self, pcap: PcapWriter, client: tuple[str, int], server: tuple[str, int]) -> None:
        self.pcap = pcap
        self.ends = {
            C: (client[0], client[1], CLIENT_MAC),
            S: (server[0], server[1], SERVER_MAC),
        }
        self.next = {C: CLIENT_ISN, S: SERVER_ISN}  # next sequence number each side sends
        self.closed: set[Direction] = set()

    def _send(self, ts: float, sender: Direction, flags: int, payload: bytes = b"") -> None:
        other = sender.other
        ack = self.next[other] if flags & ACK else 0
        self.pcap.tcp(
            ts, self.ends[sender], self.ends[other], self.next[sender], ack, flags, payload
        )
        self.next[sender] += len(payload) + (1 if flags & (SYN | FIN) else 0)

    def open(self, ts: float) -> None:
        # RFC 9293 §3.5: the three-way handshake.
        self._send(ts, C, SYN)
        self._send(ts, S, SYN | ACK)
        self._send(ts, C, ACK)

    def data(self, ts: float, sender: Direction, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(data), MAX_PAYLOAD):
            self._send(ts, sender, PSH | ACK, bytes(view[start : start + MAX_PAYLOAD]))
        self._send(ts, sender.other, ACK)

    def fin(self, ts: float, sender: Direction) -> None:
        if sender in self.closed:
            return
        self.closed.add(sender)
        self._send(ts, sender, FIN | ACK)
        self._send(ts, sender.other, ACK)

    def close(self, ts: float) -> None:
        for sender in (C, S):
            self.fin(ts, sender)


def export_pcap(
    reader: CaptureReader,
    path: Path,
    *,
    replace: bool = False,
    progress: Progress | None = None,
) -> PcapResult:
    """Write the capture's client leg to ``path`` as a pcap file tshark dissects as POP."""
    h = reader.header
    t0 = h.get("t0")
    base = float(t0) if isinstance(t0, int | float) and not isinstance(t0, bool) else 0.0
    if not 0.0 <= base <= MAX_SECONDS - 1e9:  # leave room for the session's own times
        base = 0.0  # a start pcap cannot hold: times count from 1970 instead
    client_ip, client_port, client_real = _endpoint(h.get("client"), CLIENT_IP)
    server_ip, server_port, server_real = _endpoint(h.get("upstream"), SERVER_IP)
    port = (
        client_port if client_port is not None and client_port != POP3_PORT else DEFAULT_CLIENT_PORT
    )
    result = PcapResult()
    result.endpoints.append(
        f"client {h.get('client', '?')} is {client_ip}:{port}"
        + ("" if client_real and port == client_port else " (synthetic)")
    )
    result.endpoints.append(
        f"upstream {h.get('upstream', '?')} is {server_ip}:{POP3_PORT}"
        + ("" if server_real else " (synthetic address)")
        + ("" if server_port == POP3_PORT else " (port 110, so POP dissectors apply)")
    )
    with fsutil.output_file(path, replace=replace) as out:
        pcap = PcapWriter(out)
        conn = _Connection(pcap, (client_ip, port), (server_ip, POP3_PORT))
        conn.open(base)
        result.connections = 1
        switched = False
        ts = base
        for record in metered_records(reader, progress):
            if "t" in record.fields:
                ts = max(ts, base + record.t)  # pcap readers expect time to run forwards
            direction = record.direction
            if direction is None:
                continue
            if record.kind == fmt.DATA and record.data:
                conn.data(ts, direction, record.data)
            elif record.kind == fmt.EOF:
                conn.fin(ts, direction)
            elif (
                record.kind == fmt.TLS
                and direction is C
                and not switched
                and record.fields.get("mode") == "stls"
                and record.decrypted
            ):
                # RFC 2595 §4: after STLS's +OK the connection carries TLS; give the
                # decrypted plaintext a connection of its own so it dissects as POP.
                switched = True
                conn.close(ts)
                port2 = port + 1 if port < 65535 else DEFAULT_CLIENT_PORT + 1
                conn = _Connection(pcap, (client_ip, port2), (server_ip, POP3_PORT))
                conn.open(ts)
                result.connections += 1
                result.endpoints.append(
                    f"after STLS: decrypted plaintext on {client_ip}:{port2} → "
                    f"{server_ip}:{POP3_PORT}"
                )
        conn.close(ts)
        result.packets = pcap.packets
    return result
