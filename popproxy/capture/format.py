"""Capture format v1: record types, the header, and the helpers both writer and reader share."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from popproxy.core.events import Direction
from popproxy.errors import PopproxyError

if TYPE_CHECKING:
    from popproxy.core.transcript import SessionSummary

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


_DIRECTIONS = {d.value: d for d in Direction}
_LETTER = {d: d.value.encode() for d in Direction}


@dataclass(frozen=True, slots=True)
class Record:
    """One record as read back: its JSON fields and, for data records, the raw bytes.

    The accessors read the fields the format gives each kind (validate.py has checked
    their types); a field a record does not have reads as the neutral value.
    """

    kind: str
    fields: dict[str, Any]
    data: bytes | None = None

    @property
    def t(self) -> float:
        return float(self.fields.get("t", 0.0))

    @property
    def direction(self) -> Direction | None:
        """Whose stream the record is about (``d``); None for kinds without one."""
        d = self.fields.get("d")
        return _DIRECTIONS.get(d) if isinstance(d, str) else None

    @property
    def proxy(self) -> bool:
        """popproxy's own act: bytes it sent (``p: 1``) or a direction it closed
        (``by: "popproxy"``), never the peer's."""
        if self.kind == EOF:
            return self.fields.get("by") == "popproxy"
        return bool(self.fields.get("p"))

    @property
    def why(self) -> str | None:
        """What popproxy did it for (its own bytes, a drop, a close, an opaque stream)."""
        why = self.fields.get("why")
        return why if isinstance(why, str) else None

    @property
    def offset(self) -> int:
        """Where in the direction's stream a redact, tls, drop or opaque record applies."""
        off = self.fields.get("off")
        return off if isinstance(off, int) else 0

    @property
    def length(self) -> int:
        """Octets: a data record's, or the span of a redact or drop record."""
        if self.data is not None:
            return len(self.data)
        n = self.fields.get("n" if self.kind == DATA else "len")
        return n if isinstance(n, int) else 0

    @property
    def decrypted(self) -> bool:
        """A tls record: the data after it is the decrypted plaintext (not passthrough)."""
        return self.fields.get("decrypted") is not False


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """What the end record says about the session.

    The writer adds what it counted itself: the octets of each stream, the legs that went
    TLS, the redactions and, after a write failure, the octets that never reached the file.
    """

    t: float
    how: str
    error: str | None = None
    commands: int = 0
    user: str | None = None
    mechanism: str | None = None
    anomaly_kinds: Mapping[str, int] = field(default_factory=dict)
    errors: int = 0  # -ERR replies
    verbs: Mapping[str, int] = field(default_factory=dict)
    observer_error: str | None = None

    @classmethod
    def of(
        cls,
        t: float,
        how: str,
        error: str | None,
        session: SessionSummary,
        *,
        observer_error: str | None = None,
    ) -> SessionEnd:
        """The end of a session whose transcript summed it up as ``session``."""
        kinds: dict[str, int] = {}
        for anomaly in session.anomalies:
            kinds[anomaly["kind"]] = kinds.get(anomaly["kind"], 0) + 1
        return cls(
            t,
            how,
            error,
            commands=session.commands,
            user=session.user,
            mechanism=session.mechanism,
            anomaly_kinds=kinds,
            errors=session.errors,
            verbs=session.verbs,
            observer_error=observer_error,
        )


# ------------------------------------------------------------ the record layout
# One encoder per record kind: the writer's named methods and the scrubber use these, so
# no other code lays out a record.  Times are rounded to the microsecond.


def encode_meta(fields: dict[str, Any]) -> bytes:
    """One record line: compact JSON, ASCII only, then LF."""
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def encode_header(fields: Mapping[str, Any]) -> bytes:
    return encode_meta({"r": HEADER, "v": VERSION, **fields})


def encode_data(
    direction: Direction, t: float, data: bytes, *, proxy: bool = False, why: str | None = None
) -> list[bytes]:
    """A data record as pieces for ``os.writev``: the raw bytes are not copied."""
    # Formatted by hand: this runs once per relayed chunk, and json.dumps costs more.
    flag = b',"p":1' if proxy else b""
    if why is not None:
        flag += b',"why":' + json.dumps(why, ensure_ascii=True).encode()
    head = b'{"r":"d","d":"%s","t":%.6f,"n":%d%s}\n' % (_LETTER[direction], t, len(data), flag)
    return [head, data, b"\n"]


def encode_redact(
    direction: Direction,
    offset: int,
    length: int,
    kind: str,
    *,
    masked: bool,
    rule: str | None = None,
) -> bytes:
    fields = {"r": REDACT, "d": direction.value, "off": offset, "len": length, "kind": kind}
    fields["masked"] = masked
    if rule is not None:
        fields["rule"] = rule
    return encode_meta(fields)


def tls_fields(
    direction: Direction, t: float, offset: int, facts: Mapping[str, Any], *, decrypted: bool
) -> dict[str, Any]:
    """A tls record's fields (the live view shows the same): ``facts`` as given, in order."""
    return {
        "r": TLS,
        "d": direction.value,
        "t": round(t, 6),
        "off": offset,
        "decrypted": decrypted,
        **facts,
    }


def encode_identity(
    seq: int, mechanism: str, identity: str, details: Sequence[tuple[str, str]]
) -> bytes:
    fields: dict[str, Any] = {"r": IDENTITY, "seq": seq, "mech": mechanism, "identity": identity}
    if details:
        fields["details"] = dict(details)
    return encode_meta(fields)


def encode_drop(direction: Direction, offset: int, length: int, why: str) -> bytes:
    return encode_meta({"r": DROP, "d": direction.value, "off": offset, "len": length, "why": why})


def encode_opaque(direction: Direction, offset: int, why: str) -> bytes:
    return encode_meta({"r": OPAQUE, "d": direction.value, "off": offset, "why": why})


def encode_event(t: float | None, kind: str, fields: Mapping[str, str | int | None]) -> bytes:
    head: dict[str, Any] = {"r": EVENT} if t is None else {"r": EVENT, "t": round(t, 6)}
    return encode_meta({**head, "kind": kind, **fields})


def encode_eof(direction: Direction, t: float, *, proxy: bool, why: str | None) -> bytes:
    fields: dict[str, Any] = {"r": EOF, "d": direction.value, "t": round(t, 6)}
    if proxy:
        fields.update(by="popproxy", why=why or "popproxy closed")
    return encode_meta(fields)


def encode_end(
    end: SessionEnd,
    *,
    octets: Mapping[Direction, int],
    tls: Sequence[str],
    redactions: int,
    late_redactions: int = 0,
    unrecorded: int | None = None,
) -> bytes:
    fields: dict[str, Any] = {
        "r": END,
        "t": round(end.t, 6),
        "how": end.how,
        "error": end.error,
        "octets": {d.value: octets[d] for d in Direction},
        "commands": end.commands,
        "user": end.user,
        "mechanism": end.mechanism,
        "anomalies": sum(end.anomaly_kinds.values()),
        "anomaly_kinds": dict(end.anomaly_kinds),
        "errors": end.errors,
        "verbs": dict(end.verbs),
        "tls": list(tls),
        "redactions": redactions,
        "observer_error": end.observer_error,
    }
    if late_redactions:
        fields["late_redactions"] = late_redactions
    if unrecorded is not None:
        fields["unrecorded"] = unrecorded
    return encode_meta(fields)


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
