"""The events the POP3 observer emits: small frozen dataclasses, one per protocol happening."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Direction(enum.Enum):
    """Who sent the bytes: ``CLIENT`` means client to server."""

    CLIENT = "c"
    SERVER = "s"

    # Members are singletons: identity hashing is correct and far cheaper than Enum's
    # Python-level __hash__ (directions key dicts on the relay's hot path).
    __hash__ = object.__hash__

    @property
    def other(self) -> Direction:
        return Direction.SERVER if self is Direction.CLIENT else Direction.CLIENT


class State(enum.StrEnum):
    """The POP3 session states of RFC 1939 §3."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


class AnomalyKind(enum.StrEnum):
    """What an ``Anomaly`` reports (docs/observer.md lists each with its meaning)."""

    BAD_GREETING = "bad-greeting"
    BARE_LF = "bare-lf"
    CHALLENGE_WITHOUT_RESPONSE = "challenge-without-response"
    CHANNEL_BINDING = "channel-binding"
    COMMAND_AFTER_QUIT = "command-after-quit"
    COMMAND_TOO_LONG = "command-too-long"
    CONTINUATION_OUTSIDE_AUTH = "continuation-outside-auth"
    DATA_AFTER_CLOSE = "data-after-close"
    DATA_AFTER_QUIT = "data-after-quit"
    HELD_OVERFLOW = "held-overflow"
    LINE_TOO_LONG = "line-too-long"
    MULTILINE_REPLY_TO_SINGLE = "multiline-reply-to-single"
    NO_REPLY = "no-reply"
    NONSTANDARD_STATUS = "nonstandard-status"
    OPAQUE = "opaque"
    PIPELINE_OVERFLOW = "pipeline-overflow"
    PLAINTEXT_AFTER_STLS = "plaintext-after-stls"
    STATUS_CASE = "status-case"
    STATUS_TOO_LONG = "status-too-long"
    TLS_ON_PLAINTEXT = "tls-on-plaintext"
    TRUNCATED_BODY = "truncated-body"
    UNEXPECTED_LINE = "unexpected-line"
    UNSOLICITED = "unsolicited"
    UNSTUFFED_DOT = "unstuffed-dot"
    UNTERMINATED_LINE = "unterminated-line"


class SecretKind(enum.Enum):
    """Why a byte span is a credential (docs/protocol-notes.md §7)."""

    PASS = "PASS"
    APOP = "APOP"
    AUTH_IR = "AUTH-IR"
    SASL = "SASL"
    RPOP = "RPOP"
    ECHO = "ECHO"
    OPAQUE = "OPAQUE"  # a client's bytes in a connection popproxy does not interpret


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every observer event."""


@dataclass(frozen=True, slots=True)
class RawEvent(Event):
    """An event that accounts for input bytes: ``raw`` starts at ``offset`` of ``direction``."""

    direction: Direction
    offset: int
    raw: bytes


@dataclass(frozen=True, slots=True)
class Greeting(RawEvent):
    """The server's first line (RFC 1939 §4); ``apop_timestamp`` is the ``<...@...>`` token."""

    status: str
    code: str | None
    text: str
    apop_timestamp: str | None


@dataclass(frozen=True, slots=True)
class Command(RawEvent):
    """A client command line; ``args`` has credential spans masked with ``#``."""

    seq: int
    verb: str
    args: str | None
    overlong: bool = False


@dataclass(frozen=True, slots=True)
class Reply(RawEvent):
    """The status line answering command ``seq``; ``multiline`` when a body follows."""

    seq: int
    verb: str
    status: str
    code: str | None
    text: str
    multiline: bool
    value: tuple[object, ...] | None = None
    overlong: bool = False


@dataclass(frozen=True, slots=True)
class BodyChunk(RawEvent):
    """Part of a multi-line body: ``raw`` as sent (dot-stuffed), ``data`` unstuffed."""

    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class BodyEnd(RawEvent):
    """The end of a body: ``raw`` is the terminator line, empty when cut off by a close."""

    seq: int
    lines: int
    octets: int
    truncated: bool
    listing: tuple[tuple[str, ...], ...] | None = None


@dataclass(frozen=True, slots=True)
class SaslChallenge(RawEvent):
    """A ``+`` continuation line inside AUTH (RFC 5034 §4); ``data`` is the decoded challenge."""

    seq: int
    data: bytes | None


@dataclass(frozen=True, slots=True)
class SaslResponse(RawEvent):
    """A client line answering a SASL challenge; ``cancel`` for ``*`` (RFC 5034 §4)."""

    seq: int
    cancel: bool


@dataclass(frozen=True, slots=True)
class Unsolicited(RawEvent):
    """A server line matched to no command (e.g. ``-ERR Disconnected for inactivity``)."""

    status: str | None
    code: str | None
    text: str


@dataclass(frozen=True, slots=True)
class LineTail(RawEvent):
    """The rest of an over-long line whose head was already emitted."""


@dataclass(frozen=True, slots=True)
class Injected(RawEvent):
    """Plaintext after STLS's ``+OK`` and before the TLS handshake (RFC 2595 §4)."""


@dataclass(frozen=True, slots=True)
class Opaque(RawEvent):
    """Bytes of a direction the observer no longer interprets (passthrough TLS, lost sync)."""


@dataclass(frozen=True, slots=True)
class AuthIdentity(Event):
    """The authentication identity decoded from SASL client data (docs/observer.md): not a
    secret.  ``details`` adds what else names the account: OAuth's host and port, an authzid."""

    seq: int
    mechanism: str
    identity: str
    details: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Secret(Event):
    """A credential byte span that recordings and views must redact."""

    direction: Direction
    offset: int
    length: int
    kind: SecretKind


@dataclass(frozen=True, slots=True)
class StateChanged(Event):
    """The session moved between AUTHORIZATION, TRANSACTION and UPDATE."""

    old: State
    new: State


@dataclass(frozen=True, slots=True)
class TlsStarted(Event):
    """From ``offset`` on, ``direction`` carries TLS (decrypted bytes follow, if any)."""

    direction: Direction
    offset: int


@dataclass(frozen=True, slots=True)
class Anomaly(Event):
    """Something a conforming peer would not do; never an exception."""

    kind: AnomalyKind
    direction: Direction
    seq: int | None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """``direction``'s sender closed (EOF)."""

    direction: Direction
    offset: int


@dataclass(frozen=True, slots=True)
class PopproxySent(Event):
    """The next ``length`` bytes of ``direction``'s stream from ``offset`` were made by
    popproxy itself (``why``), not by that direction's peer; not an observer event."""

    direction: Direction
    offset: int
    length: int
    why: str


@dataclass(frozen=True, slots=True)
class PopproxyClosed(Event):
    """popproxy, not the peer, ended ``direction`` (its own shutdown or an error); the
    ``ConnectionClosed`` that follows is popproxy's act; not an observer event."""

    direction: Direction
    why: str


@dataclass(frozen=True, slots=True)
class PopproxyDropped(Event):
    """``length`` bytes of ``direction``'s stream from ``offset`` were received but never
    forwarded by popproxy (``why``): the other side never got them; not an observer event."""

    direction: Direction
    offset: int
    length: int
    why: str
