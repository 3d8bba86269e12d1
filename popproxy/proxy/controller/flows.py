"""What the relay controller keeps per direction and per STLS upgrade, and its modes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


def line_head(head: bytes | None, data: bytes | bytearray) -> bytes | None:
    """The start of the line left unfinished after ``data`` (``head``: before it), upper
    case and without leading blanks, or None once that line cannot be an STLS command."""
    newline = data.rfind(b"\n")
    if newline >= 0:
        head, rest = b"", bytes(data[newline + 1 :])
    elif head is None:
        return None
    else:
        rest = bytes(data[:8])
    head = (head + rest if head else rest.lstrip(b" \t"))[:5].upper()
    if head[:4] != b"STLS"[: len(head[:4])] or (len(head) == 5 and head[4:] not in b" \t\r"):
        return None
    return head


class StlsMode(enum.Enum):
    """What popproxy does when the client sends STLS (RFC 2595 §4) to a plaintext upstream."""

    INTERCEPT = "intercept"  # TLS on both legs, popproxy in the middle (decrypted)
    PASSTHROUGH = "passthrough"  # client and server do TLS end to end (opaque)
    STRIP = "strip"  # popproxy refuses STLS and hides it from CAPA


class Phase(enum.Enum):
    """Where an STLS upgrade stands; every phase but ``LOCAL`` holds the client's bytes."""

    GREETING = "greeting"  # --upstream-stls: waiting for the server's greeting
    OWN_REPLY = "own-reply"  # --upstream-stls: waiting for the reply to popproxy's STLS
    AWAIT_REPLY = "await-reply"  # the client's STLS went to the server: its reply decides
    LOCAL = "local"  # popproxy answers the client's STLS once earlier replies are done
    UPSTREAM_HANDSHAKE = "upstream-handshake"
    CLIENT_HANDSHAKE = "client-handshake"


@dataclass(slots=True)
class Upgrade:
    """An STLS upgrade under way."""

    seq: int
    phase: Phase
    ok_offset: int = 0  # the server's +OK, held back until the upstream leg is TLS
    ok_line: bytes = b""


@dataclass(slots=True)
class Flow:
    """One direction's stream as the controller sees it (popproxy's own bytes included)."""

    received: int = 0  # stream offset of the next byte
    decided: int = 0  # every byte below was forwarded, sent or dropped
    pending: bytearray = field(default_factory=bytearray)  # bytes [decided, received)
    head: bytes | None = b""  # the unfinished line's start, while it may still be STLS
    covered: int = 0  # the observer has accounted for every byte below
    own: list[tuple[int, int]] = field(default_factory=list)  # spans popproxy sent
    eof: bool = False
    eof_forwarded: bool = False

    def add_own(self, length: int) -> tuple[int, int]:
        """popproxy's bytes join the stream at its end, decided: their span."""
        span = (self.received, self.received + length)
        self.own.append(span)
        self.received = self.decided = span[1]
        return span
