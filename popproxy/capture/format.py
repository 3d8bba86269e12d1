"""Capture format v1: record types, the header, and the helpers both writer and reader share."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from popproxy.errors import PopproxyError

FORMAT_NAME = "popproxy-capture"
MAJOR = 1
MINOR = 0
VERSION = f"{MAJOR}.{MINOR}"
SUFFIX = ".popcap"
_VERSION = re.compile(r"([0-9]{1,6})\.([0-9]{1,6})")
FILLER = b"#"

# Record kinds.  Data-bearing kinds ("d") are a JSON line with "n", then n raw bytes, then LF.
HEADER = FORMAT_NAME
DATA = "d"
REDACT = "redact"
TLS = "tls"
IDENTITY = "identity"
DROP = "drop"
EVENT = "event"
EOF = "eof"
OPAQUE = "opaque"  # from "off" on, direction "d" is not interpreted (not POP3)
END = "end"


class CaptureError(PopproxyError):
    """A capture cannot be read: not a capture, a newer major version, or corrupt."""


@dataclass(frozen=True, slots=True)
class Record:
    """One record as read back: its JSON fields and, for data records, the raw bytes."""

    kind: str
    fields: dict[str, Any]
    data: bytes | None = None

    @property
    def t(self) -> float:
        return float(self.fields.get("t", 0.0))


def encode_meta(fields: dict[str, Any]) -> bytes:
    """One record line: compact JSON, ASCII only, then LF."""
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def encode_data(
    direction: str, t: float, data: bytes, *, proxy: bool = False, why: str | None = None
) -> list[bytes]:
    """A data record as pieces for ``os.writev``: the raw bytes are not copied."""
    # Formatted by hand: this runs once per relayed chunk, and json.dumps costs more.
    flag = b',"p":1' if proxy else b""
    if why is not None:
        flag += b',"why":' + json.dumps(why, ensure_ascii=True).encode()
    head = b'{"r":"d","d":"%s","t":%.6f,"n":%d%s}\n' % (direction.encode(), t, len(data), flag)
    return [head, data, b"\n"]


def write_all(fd: int, pieces: list[bytes]) -> None:
    """Write every piece, in order, with as few system calls as ``writev`` allows."""
    limit = 512  # below IOV_MAX everywhere
    while pieces:
        batch = pieces[:limit]
        written = os.writev(fd, batch)
        total = sum(len(p) for p in batch)
        if written == total:
            pieces = pieces[limit:]
            continue
        # A short write: drop what went out and retry the rest.
        rest: list[bytes] = []
        for piece in batch:
            if written >= len(piece):
                written -= len(piece)
            else:
                rest.append(piece[written:])
                written = 0
        pieces = rest + pieces[limit:]


def check_header(fields: dict[str, Any]) -> None:
    """Refuse what is not a capture, or is from a newer major version (readers skip minors)."""
    if fields.get("r") != FORMAT_NAME:
        raise CaptureError("not a popproxy capture (no capture header)")
    version = fields.get("v")
    match = _VERSION.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        shown = repr(version) if len(repr(version)) <= 40 else repr(version)[:37] + "..."
        raise CaptureError(f"capture header has no valid version: {shown}")
    if int(match[1]) > MAJOR:
        raise CaptureError(
            f"capture format {version} is newer than this popproxy reads ({VERSION}); "
            "upgrade popproxy"
        )
