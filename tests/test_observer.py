"""Table-driven scripts for the sans-IO observer: every command, every protocol-notes §6 case."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import pytest

from popproxy.core import (
    Anomaly,
    AuthIdentity,
    BodyChunk,
    BodyEnd,
    Command,
    ConnectionClosed,
    Direction,
    Event,
    Greeting,
    Injected,
    LineTail,
    Observer,
    ObserverError,
    Opaque,
    RawEvent,
    Reply,
    SaslChallenge,
    SaslResponse,
    Secret,
    SecretKind,
    State,
    StateChanged,
    TlsStarted,
    Unsolicited,
)

C = Direction.CLIENT
S = Direction.SERVER


# --------------------------------------------------------------------------- script machinery


@dataclass(frozen=True)
class Tls:
    """A script step: the IO layer calls ``start_tls(direction)``."""

    direction: Direction
    decrypted: bool = True


@dataclass(frozen=True)
class GoOpaque:
    """A script step: the IO layer calls ``go_opaque(direction, reason)``."""

    direction: Direction
    reason: str = "test"


Step = tuple[Direction, bytes] | Tls | GoOpaque
Splitter = Callable[[bytes], Iterable[bytes]]


def whole(data: bytes) -> Iterable[bytes]:
    return [data]


def bytewise(data: bytes) -> Iterable[bytes]:
    return [data[i : i + 1] for i in range(len(data))] if data else [data]


def random_splitter(rng: random.Random, max_cuts: int = 8) -> Splitter:
    def split(data: bytes) -> Iterable[bytes]:
        if len(data) < 2:
            return [data]
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, max_cuts))))
        bounds = [0, *cuts, len(data)]
        return [data[a:b] for a, b in itertools.pairwise(bounds)]

    return split


def feed(
    steps: Sequence[Step], split: Splitter = whole, observer: Observer | None = None
) -> tuple[list[Event], Observer]:
    """Run a script through one observer, cutting every data step with ``split``."""
    obs = observer if observer is not None else Observer()
    events: list[Event] = []
    for step in steps:
        if isinstance(step, Tls):
            events += obs.start_tls(step.direction, decrypted=step.decrypted)
        elif isinstance(step, GoOpaque):
            events += obs.go_opaque(step.direction, step.reason)
        else:
            direction, data = step
            for piece in split(data):
                events += obs.receive_data(direction, piece)
    return events, obs


def script_input(steps: Sequence[Step]) -> dict[Direction, bytes]:
    out = {C: b"", S: b""}
    for step in steps:
        if isinstance(step, tuple):
            out[step[0]] += step[1]
    return out


def rebuild(events: Iterable[Event]) -> dict[Direction, bytes]:
    """Concatenate the ``raw`` of every RawEvent per direction, in event order."""
    parts: dict[Direction, list[bytes]] = {C: [], S: []}
    for event in events:
        if isinstance(event, RawEvent):
            parts[event.direction].append(event.raw)
    return {d: b"".join(p) for d, p in parts.items()}


def assert_contiguous(events: Iterable[Event]) -> None:
    """Every RawEvent starts where the previous one of its direction ended."""
    at = {C: 0, S: 0}
    for event in events:
        if isinstance(event, RawEvent):
            assert event.offset == at[event.direction], event
            at[event.direction] += len(event.raw)


T = TypeVar("T", bound=Event)

_MERGE_RAW = (BodyChunk, LineTail, Opaque, Injected)


def _mergeable(prev: Event, event: RawEvent) -> bool:
    if type(prev) is not type(event) or not isinstance(prev, RawEvent):
        return False
    if prev.direction is not event.direction or prev.offset + len(prev.raw) != event.offset:
        return False
    return not isinstance(prev, BodyChunk) or prev.seq == event.seq  # type: ignore[attr-defined]


def canonical(events: Iterable[Event]) -> list[Event]:
    """Events with segmentation artefacts merged away.

    Adjacent pieces of one body (same seq), of one over-long line's tail, of opaque or
    injected bytes are joined; Secret spans of one kind that touch are joined.  Pieces are
    "adjacent" across Secret events, which a tail emits between its pieces.
    """
    out: list[Event] = []
    for event in events:
        if isinstance(event, _MERGE_RAW):
            i = len(out) - 1
            while i >= 0 and isinstance(out[i], Secret):
                i -= 1
            if i >= 0 and _mergeable(out[i], event):
                prev = out[i]
                assert isinstance(prev, RawEvent)
                if isinstance(prev, BodyChunk):
                    assert isinstance(event, BodyChunk)
                    out[i] = replace(prev, raw=prev.raw + event.raw, data=prev.data + event.data)
                else:
                    out[i] = replace(prev, raw=prev.raw + event.raw)
                continue
        elif isinstance(event, Secret):
            i = len(out) - 1
            while i >= 0 and isinstance(out[i], _MERGE_RAW):
                i -= 1
            prev_s = out[i] if i >= 0 else None
            if (
                isinstance(prev_s, Secret)
                and prev_s.direction is event.direction
                and prev_s.kind is event.kind
                and prev_s.offset + prev_s.length == event.offset
            ):
                out[i] = replace(prev_s, length=prev_s.length + event.length)
                continue
        out.append(event)
    return out


def of(events: Iterable[Event], cls: type[T]) -> list[T]:
    return [e for e in events if isinstance(e, cls)]


def anomaly_kinds(events: Iterable[Event]) -> list[str]:
    return [a.kind for a in of(events, Anomaly)]


def verbs(events: Iterable[Event]) -> list[str]:
    return [c.verb for c in of(events, Command)]


def replies(events: Iterable[Event]) -> list[tuple[str, str, bool]]:
    return [(r.verb, r.status, r.multiline) for r in of(events, Reply)]


def body_data(events: Iterable[Event], seq: int) -> bytes:
    return b"".join(b.data for b in of(events, BodyChunk) if b.seq == seq)


def covered(events: Iterable[Event], direction: Direction) -> set[int]:
    """Stream offsets of ``direction`` that some Secret span covers."""
    out: set[int] = set()
    for s in of(events, Secret):
        if s.direction is direction:
            out.update(range(s.offset, s.offset + s.length))
    return out


def span_of(stream: bytes, needle: bytes, start: int = 0) -> set[int]:
    at = stream.index(needle, start)
    return set(range(at, at + len(needle)))


# --------------------------------------------------------------------------- the table

GREETING = b"+OK Dovecot ready. <1234.5.1700000000.AbCd+/eF9Q==@mail.example>\r\n"
LOGIN_C = b"USER bob\r\nPASS hunter2 secret\r\n"
LOGIN_S = b"+OK\r\n+OK Logged in.\r\n"
PLAIN_IR = base64.b64encode(b"\x00bob\x00hunter2 secret")
MESSAGE = (
    b"From: a@example.org\r\nSubject: dots\r\n\r\n"
    b"..leading dot\r\n..\r\n...\r\n+OK not a status\r\n-ERR not a status\r\n+ nor this\r\n"
    b"last\r\n"
)
UNSTUFFED = (
    b"From: a@example.org\r\nSubject: dots\r\n\r\n"
    b".leading dot\r\n.\r\n..\r\n+OK not a status\r\n-ERR not a status\r\n+ nor this\r\n"
    b"last\r\n"
)


def _login(*more: Step) -> list[Step]:
    return [(S, GREETING), (C, LOGIN_C), (S, LOGIN_S), *more]


Check = Callable[[list[Event], Observer, dict[Direction, bytes]], None]


@dataclass
class Case:
    name: str
    steps: list[Step]
    check: Check
    options: dict[str, Any] = field(default_factory=dict)


CASES: list[Case] = []


def case(name: str, steps: list[Step], **options: Any) -> Callable[[Check], Check]:
    def register(check: Check) -> Check:
        CASES.append(Case(name, steps, check, options))
        return check

    return register


@case(
    "userpass-states",
    _login(
        (C, b"STAT\r\n"),
        (S, b"+OK 2 320\r\n"),
        (C, b"QUIT\r\n"),
        (S, b"+OK Logging out.\r\n"),
        (S, b""),
        (C, b""),
    ),
)
def _userpass(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert verbs(ev) == ["USER", "PASS", "STAT", "QUIT"]
    assert replies(ev) == [
        ("USER", "+OK", False),
        ("PASS", "+OK", False),
        ("STAT", "+OK", False),
        ("QUIT", "+OK", False),
    ]
    assert [(s.old, s.new) for s in of(ev, StateChanged)] == [
        (State.AUTHORIZATION, State.TRANSACTION),
        (State.TRANSACTION, State.UPDATE),
    ]
    assert obs.state is State.UPDATE
    assert of(ev, Reply)[2].value == (2, 320)
    assert of(ev, Greeting)[0].apop_timestamp == "<1234.5.1700000000.AbCd+/eF9Q==@mail.example>"
    pass_cmd = of(ev, Command)[1]
    assert pass_cmd.args == "#" * len("hunter2 secret")
    assert covered(ev, C) == span_of(raw[C], b"hunter2 secret")
    assert [s.kind for s in of(ev, Secret)] == [SecretKind.PASS]
    assert anomaly_kinds(ev) == []
    assert len(of(ev, ConnectionClosed)) == 2


_DIGEST = hashlib.md5(b"<1234.5.1700000000.AbCd+/eF9Q==@mail.example>pw").hexdigest().encode()


@case("apop", [(S, GREETING), (C, b"APOP bob " + _DIGEST + b"\r\n"), (S, b"+OK\r\n")])
def _apop(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert covered(ev, C) == span_of(raw[C], _DIGEST)
    assert of(ev, Secret)[0].kind is SecretKind.APOP
    assert of(ev, Command)[0].args == "bob " + "#" * 32
    assert obs.state is State.TRANSACTION


@case("rpop", [(S, GREETING), (C, b"USER bob\r\nRPOP s3cret\r\n"), (S, b"+OK\r\n-ERR no\r\n")])
def _rpop(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert covered(ev, C) == span_of(raw[C], b"s3cret")
    assert of(ev, Secret)[0].kind is SecretKind.RPOP
    assert obs.state is State.AUTHORIZATION


@case(
    "greetings-exchange-trailer",
    [(S, b"+OK The Microsoft Exchange POP3 service is ready. [SABFADEAUABS]\r\n")],
)
def _exchange(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    g = of(ev, Greeting)[0]
    assert (g.status, g.code, g.apop_timestamp) == ("+OK", None, None)


@case("greeting-code", [(S, b"+OK [XCLIENT] Dovecot ready.\r\n")])
def _xclient(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    g = of(ev, Greeting)[0]
    assert (g.code, g.text) == ("XCLIENT", "Dovecot ready.")


@case("greeting-err", [(S, b"-ERR [SYS/TEMP] go away\r\n"), (S, b"")])
def _greet_err(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    g = of(ev, Greeting)[0]
    assert (g.status, g.code) == ("-ERR", "SYS/TEMP")


@case(
    "transaction-commands",
    _login(
        (C, b"LIST\r\nLIST 2\r\nUIDL\r\nUIDL 1\r\nNOOP\r\nDELE 1\r\nRSET\r\nLAST\r\nTOP 1 0\r\n"),
        (
            S,
            b"+OK 2 messages (320 octets)\r\n1 120\r\n2\t200\r\n.\r\n+OK 2 200\r\n"
            b"+OK\r\n1  uid-1\r\n2 uid-2\r\n.\r\n+OK 1 uid-1\r\n+OK\r\n+OK deleted\r\n"
            b"+OK\r\n+OK 0\r\n+OK\r\nSubject: x\r\n\r\n.\r\n",
        ),
    ),
)
def _transaction(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert replies(ev)[2:] == [
        ("LIST", "+OK", True),
        ("LIST", "+OK", False),
        ("UIDL", "+OK", True),
        ("UIDL", "+OK", False),
        ("NOOP", "+OK", False),
        ("DELE", "+OK", False),
        ("RSET", "+OK", False),
        ("LAST", "+OK", False),
        ("TOP", "+OK", True),
    ]
    ends = of(ev, BodyEnd)
    assert ends[0].listing == (("1", "120"), ("2", "200"))
    assert ends[1].listing == (("1", "uid-1"), ("2", "uid-2"))
    assert ends[2].listing is None and ends[2].lines == 2
    assert [r.value for r in of(ev, Reply) if r.verb in ("LIST", "UIDL") and not r.multiline] == [
        (2, 200),
        (1, "uid-1"),
    ]
    assert body_data(ev, of(ev, Reply)[-1].seq) == b"Subject: x\r\n\r\n"
    assert anomaly_kinds(ev) == []


@case(
    "capa-utf8-lang",
    [
        (S, GREETING),
        (C, b"CAPA\r\n"),
        (S, b"+OK\r\nTOP\r\nSASL PLAIN LOGIN\r\nLANG\r\nUTF8 USER\r\n.\r\n"),
        (C, b"UTF8\r\nLANG\r\nLANG fr\r\nLANG *\r\n"),
        (
            S,
            b"+OK UTF8 enabled\r\n+OK\r\nen English\r\nfr Fran\xc3\xa7ais\r\n.\r\n"
            b"+OK Langue chang\xc3\xa9e\r\n+OK en\r\n",
        ),
    ],
)
def _capa(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert obs.capabilities == (("TOP",), ("SASL", "PLAIN", "LOGIN"), ("LANG",), ("UTF8", "USER"))
    assert replies(ev) == [
        ("CAPA", "+OK", True),
        ("UTF8", "+OK", False),
        ("LANG", "+OK", True),
        ("LANG", "+OK", False),
        ("LANG", "+OK", False),
    ]
    assert of(ev, BodyEnd)[1].listing == (("en", "English"), ("fr", "Français"))
    assert of(ev, Reply)[3].text == "Langue changée"


@case(
    "xtnd-xlst-and-unknown",
    _login(
        (C, b"XTND XLST Message-Id\r\nXYZZY plugh\r\nXSENDER 1\r\nNOOP\r\n"),
        (S, b"+OK\r\n1 Message-Id: <a@b>\r\n.\r\n-ERR unknown\r\n+OK x@y\r\n+OK\r\n"),
    ),
)
def _xtnd(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert replies(ev)[2:] == [
        ("XTND", "+OK", True),
        ("XYZZY", "-ERR", False),
        ("XSENDER", "+OK", False),
        ("NOOP", "+OK", False),
    ]
    assert of(ev, BodyEnd)[0].listing == (("1", "Message-Id:", "<a@b>"),)
    assert anomaly_kinds(ev) == []


@case("empty-multiline", _login((C, b"LIST\r\n"), (S, b"+OK 0 messages:\r\n.\r\n")))
def _empty(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    end = of(ev, BodyEnd)[0]
    assert (end.raw, end.lines, end.octets, end.listing, end.truncated) == (
        b".\r\n",
        0,
        0,
        (),
        False,
    )
    assert of(ev, BodyChunk) == []


@case(
    "bare-lf",
    [
        (S, b"+OK hi\n"),
        (C, b"USER bob\nPASS pw\n"),
        (S, b"+OK\n+OK\n"),
        (C, b"RETR 1\nNOOP\n"),
        (S, b"+OK\nline one\n.\n+OK\n"),
    ],
)
def _bare_lf(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert replies(ev)[-2:] == [("RETR", "+OK", True), ("NOOP", "+OK", False)]
    assert body_data(ev, 3) == b"line one\n"
    assert of(ev, BodyEnd)[0].raw == b".\n"
    assert sorted(anomaly_kinds(ev)) == ["bare-lf", "bare-lf"]  # once per side
    assert covered(ev, C) == span_of(raw[C], b"pw\n") - {raw[C].index(b"pw\n") + 2}


@case("dot-stuffing", _login((C, b"RETR 1\r\n"), (S, b"+OK\r\n" + MESSAGE + b".\r\n")))
def _dots(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert body_data(ev, 3) == UNSTUFFED
    end = of(ev, BodyEnd)[0]
    assert (end.lines, end.octets) == (MESSAGE.count(b"\n"), len(UNSTUFFED))
    assert of(ev, Reply)[-1].multiline and len(of(ev, Reply)) == 3
    assert anomaly_kinds(ev) == []


@case(
    "unstuffed-dot-line",
    _login((C, b"RETR 1\r\n"), (S, b"+OK\r\n.x\r\n.\r\n")),
)
def _unstuffed(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert body_data(ev, 3) == b"x\r\n"  # RFC 1939 §3 view; raw keeps the dot
    assert anomaly_kinds(ev) == ["unstuffed-dot"]


@case(
    "err-never-multiline",
    _login((C, b"RETR 9\r\nLIST\r\n"), (S, b"-ERR no such message\r\n+OK\r\n1 5\r\n.\r\n")),
)
def _err(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert replies(ev)[2:] == [("RETR", "-ERR", False), ("LIST", "+OK", True)]


@case(
    "status-variants",
    _login(
        (C, b"NOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n"), (S, b"+OK\r\n+ERR bad\r\n+ok fine\r\n-ERR\r\n")
    ),
)
def _status(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert [(r.status, r.text) for r in of(ev, Reply)][2:] == [
        ("+OK", ""),
        ("-ERR", "bad"),
        ("+OK", "fine"),
        ("-ERR", ""),
    ]
    assert anomaly_kinds(ev) == ["nonstandard-status", "status-case"]


def _sasl(mech: bytes, *exchange: Step) -> list[Step]:
    return [(S, GREETING), (C, b"AUTH " + mech + b"\r\n"), *exchange]


@case(
    "auth-plain-bare-plus",
    _sasl(b"PLAIN", (S, b"+\r\n"), (C, PLAIN_IR + b"\r\n"), (S, b"+OK Logged in.\r\n")),
)
@case(
    "auth-plain-plus-space",
    _sasl(b"PLAIN", (S, b"+ \r\n"), (C, PLAIN_IR + b"\r\n"), (S, b"+OK Logged in.\r\n")),
)
def _plain_cont(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert of(ev, SaslChallenge)[0].data == b""
    assert of(ev, AuthIdentity) == [AuthIdentity(1, "PLAIN", "bob")]
    assert covered(ev, C) == span_of(raw[C], PLAIN_IR)
    assert [s.kind for s in of(ev, Secret)] == [SecretKind.SASL]
    assert obs.state is State.TRANSACTION
    assert anomaly_kinds(ev) == []


@case(
    "auth-plain-ir",
    [(S, GREETING), (C, b"AUTH PLAIN " + PLAIN_IR + b"\r\n"), (S, b"+OK Logged in.\r\n")],
)
def _plain_ir(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert of(ev, AuthIdentity) == [AuthIdentity(1, "PLAIN", "bob")]
    assert covered(ev, C) == span_of(raw[C], PLAIN_IR)
    assert of(ev, Secret)[0].kind is SecretKind.AUTH_IR
    assert of(ev, Command)[0].args == "PLAIN " + "#" * len(PLAIN_IR)
    assert obs.state is State.TRANSACTION


@case("auth-empty-ir", [(S, GREETING), (C, b"AUTH EXTERNAL =\r\n"), (S, b"+OK\r\n")])
def _empty_ir(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert of(ev, Secret) == [] and of(ev, Command)[0].args == "EXTERNAL ="
    assert obs.state is State.TRANSACTION


_LOGIN_PW = base64.b64encode(b"secret login pw")


@case(
    "auth-login",
    _sasl(
        b"LOGIN",
        (S, b"+ VXNlcm5hbWU6\r\n"),
        (C, b"Ym9i\r\n"),
        (S, b"+ UGFzc3dvcmQ6\r\n"),
        (C, _LOGIN_PW + b"\r\n"),
        (S, b"+OK Logged in.\r\n"),
    ),
)
def _login_mech(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert [c.data for c in of(ev, SaslChallenge)] == [b"Username:", b"Password:"]
    assert len(of(ev, SaslResponse)) == 2
    assert of(ev, AuthIdentity) == [AuthIdentity(1, "LOGIN", "bob")]
    assert covered(ev, C) == span_of(raw[C], b"Ym9i") | span_of(raw[C], _LOGIN_PW)
    assert obs.state is State.TRANSACTION


_CRAM_CHALLENGE = b"<1896.697170952@postoffice.example.net>"
_CRAM = base64.b64encode(b"bob " + hmac.new(b"pw", _CRAM_CHALLENGE, "md5").hexdigest().encode())


@case(
    "auth-cram-md5",
    _sasl(
        b"CRAM-MD5",
        (S, b"+ " + base64.b64encode(_CRAM_CHALLENGE) + b"\r\n"),
        (C, _CRAM + b"\r\n"),
        (S, b"+OK\r\n"),
    ),
)
def _cram(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert of(ev, SaslChallenge)[0].data == _CRAM_CHALLENGE
    assert of(ev, AuthIdentity) == [AuthIdentity(1, "CRAM-MD5", "bob")]
    assert covered(ev, C) == span_of(raw[C], _CRAM)


@case(
    "auth-cancel",
    _sasl(
        b"LOGIN",
        (S, b"+ VXNlcm5hbWU6\r\n"),
        (C, b"*\r\n"),
        (S, b"-ERR Authentication aborted by client.\r\n"),
        (C, b"USER bob\r\n"),
        (S, b"+OK\r\n"),
    ),
)
def _cancel(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    (resp,) = of(ev, SaslResponse)
    assert resp.cancel and resp.raw == b"*\r\n"
    assert of(ev, Secret) == [] and obs.state is State.AUTHORIZATION
    assert verbs(ev) == ["AUTH", "USER"] and replies(ev)[-1] == ("USER", "+OK", False)


_SCRAM_FIRST = base64.b64encode(b"n,,n=bob,r=abc")
_SCRAM_FINAL = base64.b64encode(b"c=biws,r=abcdef,p=proofproof")


@case(
    "auth-final-data",
    [
        (S, GREETING),
        (C, b"AUTH SCRAM-SHA-1 " + _SCRAM_FIRST + b"\r\n"),
        (S, b"+ " + base64.b64encode(b"r=abcdef,s=c2FsdA==,i=4096") + b"\r\n"),
        (C, _SCRAM_FINAL + b"\r\n"),
        (S, b"+ " + base64.b64encode(b"v=sig") + b"\r\n"),
        (C, b"\r\n"),
        (S, b"+OK Logged in.\r\n"),
    ],
)
def _final(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert [r.raw for r in of(ev, SaslResponse)] == [_SCRAM_FINAL + b"\r\n", b"\r\n"]
    assert of(ev, SaslChallenge)[1].data == b"v=sig"
    # RFC 5802 §5.1: the client-first carries no credential; the proof and the server's
    # signature (a password verifier) do.
    assert covered(ev, C) == span_of(raw[C], _SCRAM_FINAL)
    assert covered(ev, S) == span_of(raw[S], base64.b64encode(b"v=sig"))
    assert obs.state is State.TRANSACTION and anomaly_kinds(ev) == []


@case(
    "auth-followers-ok",
    [
        (S, GREETING),
        (C, b"AUTH PLAIN " + PLAIN_IR + b"\r\nSTAT\r\n"),
        (S, b"+OK Logged in.\r\n"),
        (S, b"+OK 0 0\r\n"),
    ],
)
def _followers_ok(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert verbs(ev) == ["AUTH", "STAT"] and of(ev, SaslResponse) == []
    assert replies(ev) == [("AUTH", "+OK", False), ("STAT", "+OK", False)]
    assert of(ev, Reply)[1].value == (0, 0)
    assert covered(ev, C) == span_of(raw[C], PLAIN_IR)


@case(
    "auth-followers-challenge",
    [
        (S, GREETING),
        (C, b"AUTH PLAIN " + PLAIN_IR + b"\r\nSTAT\r\nNOOP\r\n"),
        (S, b"+ \r\n"),
        (S, b"-ERR [AUTH] bad\r\n+OK\r\n"),
    ],
)
def _followers_challenge(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    # docs/protocol-notes.md §6.9: the server consumed STAT as the SASL response.
    assert verbs(ev) == ["AUTH", "NOOP"]
    (resp,) = of(ev, SaslResponse)
    assert resp.raw == b"STAT\r\n" and not resp.cancel
    assert covered(ev, C) == span_of(raw[C], PLAIN_IR) | span_of(raw[C], b"STAT")
    assert replies(ev) == [("AUTH", "-ERR", False), ("NOOP", "+OK", False)]
    assert obs.state is State.AUTHORIZATION


@case(
    "auth-bare-list",
    [(S, GREETING), (C, b"AUTH\r\nAUTH \r\n"), (S, b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n-ERR no\r\n")],
)
def _bare_auth(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert replies(ev) == [("AUTH", "+OK", True), ("AUTH", "-ERR", False)]
    assert of(ev, BodyEnd)[0].listing == (("PLAIN",), ("LOGIN",))
    assert obs.state is State.AUTHORIZATION and of(ev, SaslChallenge) == []


@case(
    "stls-ok-injection",
    [
        (S, GREETING),
        (C, b"STLS\r\nUSER evil\r\n"),
        (S, b"+OK Begin TLS negotiation now.\r\n+OK injected\r\n"),
        Tls(C),
        Tls(S),
        (C, b"CAPA\r\n"),
        (S, b"+OK\r\nUSER\r\n.\r\n"),
    ],
)
def _stls(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    inj = of(ev, Injected)
    assert [(i.direction, i.raw) for i in inj] == [(C, b"USER evil\r\n"), (S, b"+OK injected\r\n")]
    assert sorted(a.direction.value for a in of(ev, Anomaly)) == ["c", "s"]
    assert set(anomaly_kinds(ev)) == {"plaintext-after-stls"}
    assert [t.offset for t in of(ev, TlsStarted)] == [len(raw[C]) - 6, len(GREETING) + 32 + 14]
    assert verbs(ev) == ["STLS", "CAPA"] and replies(ev)[-1] == ("CAPA", "+OK", True)
    assert obs.capabilities == (("USER",),) and obs.state is State.AUTHORIZATION


@case(
    "stls-err",
    [
        (S, GREETING),
        (C, b"STLS\r\nCAPA\r\n"),
        (S, b"-ERR TLS support isn't enabled.\r\n+OK\r\nTOP\r\n.\r\n"),
    ],
)
def _stls_err(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert verbs(ev) == ["STLS", "CAPA"] and of(ev, Injected) == []
    assert replies(ev) == [("STLS", "-ERR", False), ("CAPA", "+OK", True)]


@case("implicit-tls", [Tls(S), Tls(C), (S, GREETING), (C, b"QUIT\r\n"), (S, b"+OK\r\n")])
def _implicit(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert [(t.direction, t.offset) for t in of(ev, TlsStarted)] == [(S, 0), (C, 0)]
    assert len(of(ev, Greeting)) == 1 and replies(ev) == [("QUIT", "+OK", False)]


@case(
    "passthrough-tls",
    [
        (S, GREETING),
        (C, b"STLS\r\n"),
        (S, b"+OK\r\n"),
        Tls(C, False),
        Tls(S, False),
        (C, b"\x16\x03\x01binary\n"),
        (S, b"\x16\x03\x03x"),
    ],
)
def _passthrough(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert [(o.direction, o.raw) for o in of(ev, Opaque)] == [
        (C, b"\x16\x03\x01binary\n"),
        (S, b"\x16\x03\x03x"),
    ]
    assert anomaly_kinds(ev) == []


@case(
    "go-opaque",
    _login(
        GoOpaque(C, "sasl security layer"),
        GoOpaque(S, "sasl security layer"),
        (C, b"\x00\x00\x00\x04abcd"),
        (S, b"\x00\x00\x00\x02ok"),
    ),
)
def _go_opaque(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert len(of(ev, Opaque)) == 2 and anomaly_kinds(ev) == ["opaque", "opaque"]


_PIPE_CMDS = [b"STAT\r\n", b"LIST %d\r\n", b"NOOP\r\n", b"UIDL %d\r\n"]


def _pipeline(n: int) -> tuple[bytes, bytes]:
    cmds, reps = [], []
    for i in range(n):
        cmd = _PIPE_CMDS[i % 4]
        cmds.append(cmd % i if b"%d" in cmd else cmd)
        reps.append(
            [b"+OK 3 %d\r\n" % i, b"+OK %d 77\r\n" % i, b"+OK\r\n", b"+OK %d uid%d\r\n" % (i, i)][
                i % 4
            ]
        )
    return b"".join(cmds), b"".join(reps)


_P_C, _P_S = _pipeline(10_000)


@case("pipelining-10000", _login((C, _P_C), (S, _P_S)))
def _pipelining(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    cmds = {c.seq: c for c in of(ev, Command)}
    reps = of(ev, Reply)[2:]
    assert len(reps) == 10_000
    for i, rep in enumerate(reps):
        assert cmds[rep.seq].verb == rep.verb and rep.seq == i + 3
        if rep.verb in ("LIST", "UIDL"):
            assert rep.value is not None and rep.value[0] == i
        if rep.verb == "STAT":
            assert rep.value == (3, i)
    assert anomaly_kinds(ev) == [] and obs.pending_count == 0


@case("pipeline-overflow", _login((C, b"NOOP\r\n" * 10), (S, b"+OK\r\n" * 10)), max_pending=4)
def _overflow(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert "pipeline-overflow" in anomaly_kinds(ev)
    assert {o.direction for o in of(ev, Opaque)} == {C, S}


@case("unsolicited", _login((S, b"-ERR Disconnected for inactivity.\r\n"), (S, b"")))
def _unsolicited(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    (u,) = of(ev, Unsolicited)
    assert (u.status, u.text) == ("-ERR", "Disconnected for inactivity.")
    assert anomaly_kinds(ev) == ["unsolicited"]


@case(
    "data-after-quit",
    _login(
        (C, b"QUIT\r\n"), (S, b"+OK bye\r\n+OK more\r\n"), (C, b"NOOP\r\n"), (S, b""), (S, b"late")
    ),
)
def _after_quit(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert anomaly_kinds(ev) == [
        "data-after-quit",
        "command-after-quit",
        "no-reply",
        "data-after-close",
    ]
    assert of(ev, Opaque)[0].raw == b"late"


@case("server-closes-instead", [(S, GREETING), (C, b"CAPA\r\n"), (S, b"")])
def _closes(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert anomaly_kinds(ev) == ["no-reply"] and of(ev, Reply) == []


@case("truncated-body", _login((C, b"RETR 1\r\n"), (S, b"+OK\r\nline\r\npart"), (S, b"")))
def _truncated(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    end = of(ev, BodyEnd)[0]
    assert end.truncated and end.raw == b""
    assert body_data(ev, 3) == b"line\r\npart"
    assert anomaly_kinds(ev) == ["truncated-body"]


@case("truncated-at-dot", _login((C, b"RETR 1\r\n"), (S, b"+OK\r\nline\r\n."), (S, b"")))
def _truncated_dot(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert of(ev, BodyEnd)[0].truncated


@case(
    "list-n-resync",
    _login(
        (C, b"LIST 1\r\n"),
        (S, b"+OK 2 messages\r\n1 100\r\n2 200\r\n.\r\n"),
        (C, b"NOOP\r\n"),
        (S, b"+OK\r\n"),
    ),
)
def _resync(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert "multiline-reply-to-single" in anomaly_kinds(ev)
    assert of(ev, BodyEnd)[0].listing == (("1", "100"), ("2", "200"))
    assert replies(ev)[-1] == ("NOOP", "+OK", False)


@case("unknown-verb-resync", _login((C, b"XFOO\r\n"), (S, b"+OK here\r\nsome text\r\n.\r\n")))
def _unknown_resync(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert anomaly_kinds(ev) == ["multiline-reply-to-single"]
    assert body_data(ev, 3) == b"some text\r\n"


@case("continuation-outside-auth", _login((C, b"NOOP\r\n"), (S, b"+ what\r\n")))
def _cont_outside(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert anomaly_kinds(ev) == ["continuation-outside-auth"]


_LONG_ARG = b"a" * 300


@case(
    "overlong-command-and-status",
    _login((C, b"NOOP " + _LONG_ARG + b"\r\n"), (S, b"-ERR " + b"x" * 600 + b"\r\n")),
)
def _overlong(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert anomaly_kinds(ev) == ["command-too-long", "status-too-long"]
    assert of(ev, Command)[-1].overlong and of(ev, Reply)[-1].overlong


_BIG_IR = base64.b64encode(b"\x00bob\x00" + b"p" * 400)
_BIG_CHALLENGE = base64.b64encode(b"c" * 600)


@case(
    "sasl-exempt-from-limits",
    [
        (S, GREETING),
        (C, b"AUTH PLAIN\r\n"),
        (S, b"+ " + _BIG_CHALLENGE + b"\r\n"),
        (C, _BIG_IR + b"\r\n"),
        (S, b"+OK\r\n"),
    ],
)
def _sasl_exempt(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert anomaly_kinds(ev) == []
    assert of(ev, AuthIdentity)[0].identity == "bob"


_HUGE = bytes(random.Random(7).choice(b"abcdefXYZ 0123") for _ in range(100_000))


@case(
    "huge-pass-line",
    [
        (S, GREETING),
        (C, b"USER bob\r\nPASS " + _HUGE),
        (C, b"\r\nNOOP\r\n"),
        (S, b"+OK\r\n-ERR [AUTH] no\r\n+OK\r\n"),
    ],
)
def _huge_pass(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    start = raw[C].index(b"PASS ") + 5
    assert covered(ev, C) == set(range(start, start + len(_HUGE)))
    cmd = of(ev, Command)[1]
    assert cmd.verb == "PASS" and cmd.overlong and len(cmd.raw) == 8192
    assert b"".join(t.raw for t in of(ev, LineTail)) == raw[C][10 + 8192 : -6]
    assert verbs(ev) == ["USER", "PASS", "NOOP"]
    assert replies(ev)[-1] == ("NOOP", "+OK", False)
    assert anomaly_kinds(ev) == ["line-too-long", "command-too-long"]


@case("huge-server-line", _login((C, b"NOOP\r\n"), (S, b"+OK " + _HUGE), (S, b"\r\n")))
def _huge_server(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert of(ev, Reply)[-1].overlong
    assert len(of(ev, LineTail)) == 1 and of(ev, LineTail)[0].raw.endswith(b"\r\n")
    assert anomaly_kinds(ev) == ["line-too-long", "status-too-long"]


@case("line-at-limit", [(S, GREETING), (C, b"NOOP " + b"b" * 8186 + b"\r\n"), (S, b"+OK\r\n")])
def _at_limit(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    # 8193 octets incl. CRLF: the LF is within max_line + 1 octets, so the line is whole.
    assert of(ev, LineTail) == [] and "line-too-long" not in anomaly_kinds(ev)


@case(
    "line-just-over-limit", [(S, GREETING), (C, b"NOOP " + b"b" * 8187 + b"\r\n"), (S, b"+OK\r\n")]
)
def _over_limit(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert [t.raw for t in of(ev, LineTail)] == [b"\r\n"]


_ECHO_PW = base64.b64encode(b"desync-secret")


@case(
    "server-echo-of-secret",
    [
        (S, GREETING),
        (C, b"AUTH LOGIN\r\n"),
        (S, b"+ VXNlcm5hbWU6\r\n"),
        (C, _ECHO_PW + b"\r\n"),
        (S, b"-ERR [AUTH] failed\r\n"),
        (C, b"NOOP\r\n"),
        (S, b"-ERR Unknown command: " + _ECHO_PW.upper() + b"\r\n"),
    ],
)
def _echo(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    echo = [s for s in of(ev, Secret) if s.direction is S]
    assert [(s.kind, s.length) for s in echo] == [(SecretKind.ECHO, len(_ECHO_PW))]
    assert covered(ev, S) == span_of(raw[S], _ECHO_PW.upper())
    assert of(ev, Reply)[-1].text == "Unknown command: " + "#" * len(_ECHO_PW)


@case("unterminated-client-line", [(S, GREETING), (C, b"QUIT"), (C, b""), (S, b"+OK\r\n")])
def _unterminated(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    assert verbs(ev) == ["QUIT"] and anomaly_kinds(ev) == ["unterminated-line"]


@case("close-during-auth", [(S, GREETING), (C, b"AUTH PLAIN\r\n" + PLAIN_IR + b"\r\n"), (S, b"")])
def _close_auth(ev: list[Event], obs: Observer, raw: dict[Direction, bytes]) -> None:
    # The role of the line after AUTH was never decided: it stays a credential.
    assert covered(ev, C) == span_of(raw[C], PLAIN_IR + b"\r\n")
    assert verbs(ev) == ["AUTH"]


CASE_IDS = [c.name for c in CASES]


# --------------------------------------------------------------------------- the tests


def run_case(c: Case, split: Splitter = whole) -> tuple[list[Event], Observer]:
    return feed(c.steps, split, Observer(**c.options))


@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_script(c: Case) -> None:
    events, obs = run_case(c)
    assert rebuild(events) == script_input(c.steps)
    assert_contiguous(events)
    c.check(canonical(events), obs, script_input(c.steps))


@pytest.mark.parametrize("c", CASES, ids=CASE_IDS)
def test_script_bytewise_matches_whole(c: Case) -> None:
    whole_events, _ = run_case(c)
    byte_events, obs = run_case(c, bytewise)
    assert rebuild(byte_events) == script_input(c.steps)
    assert_contiguous(byte_events)
    assert canonical(byte_events) == canonical(whole_events)
    c.check(canonical(byte_events), obs, script_input(c.steps))


def test_settled_waits_for_undecided_sasl_lines() -> None:
    obs = Observer()
    obs.receive_data(S, GREETING)
    auth = b"AUTH PLAIN " + PLAIN_IR + b"\r\n"
    events = obs.receive_data(C, auth + b"STAT\r\n")
    assert obs.settled(C) == len(auth)  # STAT may yet be a SASL response
    assert verbs(events) == ["AUTH"]
    events = obs.receive_data(S, b"+OK\r\n")
    assert obs.settled(C) == len(auth) + 6 and verbs(events) == ["STAT"]
    assert obs.settled(S) == len(GREETING) + 5


def test_settled_holds_lines_after_stls() -> None:
    obs = Observer()
    obs.receive_data(S, GREETING)
    obs.receive_data(C, b"STLS\r\nCAPA\r\nCA")
    assert obs.settled(C) == 6
    events = obs.receive_data(S, b"-ERR no\r\n")
    assert verbs(events) == ["CAPA"] and obs.settled(C) == 12


def test_api_misuse_raises_observer_error() -> None:
    obs = Observer()
    with pytest.raises(ObserverError):
        obs.receive_data("c", b"x")  # type: ignore[arg-type]
    with pytest.raises(ObserverError):
        obs.receive_data(C, "text")  # type: ignore[arg-type]
    with pytest.raises(ObserverError):
        obs.settled("s")  # type: ignore[arg-type]
    events = obs.receive_data(S, bytearray(b"+OK\r\n"))  # type: ignore[arg-type]
    assert rebuild(events) == {C: b"", S: b"+OK\r\n"}


def test_canonical_merges_segmentation_artefacts() -> None:
    pieces: list[Event] = [
        BodyChunk(S, 0, b"ab", 1, b"ab"),
        BodyChunk(S, 2, b"c", 1, b"c"),
        Secret(C, 0, 2, SecretKind.PASS),
        LineTail(C, 0, b"xy"),
        Secret(C, 2, 1, SecretKind.PASS),
        LineTail(C, 2, b"z"),
    ]
    assert canonical(pieces) == [
        BodyChunk(S, 0, b"abc", 1, b"abc"),
        Secret(C, 0, 3, SecretKind.PASS),
        LineTail(C, 0, b"xyz"),
    ]
