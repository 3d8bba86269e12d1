"""The relay controller on scripted sessions: the same commands whatever the segmentation."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popproxy.core import Direction, Observer
from popproxy.proxy.controller import (
    Controller,
    DataReceived,
    Drop,
    EndSession,
    EofReceived,
    Forward,
    ForwardEof,
    HoldReads,
    Input,
    Leg,
    Note,
    ObserverFailed,
    Parsed,
    RelayCommand,
    ResumeReads,
    Send,
    StartTls,
    StlsMode,
    Tick,
    TlsEstablished,
    TlsFact,
    TlsFailed,
)

C, S = Direction.CLIENT, Direction.SERVER
U, L = Leg.UPSTREAM, Leg.CLIENT
GREETING = b"+OK POP3 ready\r\n"
CAPA_BODY = b"+OK\r\nTOP\r\nSTLS\r\nUIDL\r\n.\r\n"
Splitter = Callable[[bytes], list[bytes]]


@dataclass
class Case:
    name: str
    steps: list[tuple[str, bytes]]  # ("c" | "s", bytes) or ("eof", b"c" | b"s")
    expected: list[RelayCommand]
    mode: StlsMode = StlsMode.INTERCEPT
    client_tls: bool = False
    upstream_tls: bool = False
    upstream_stls: bool = False
    hide_plus: bool = False
    tls: dict[Leg, str | None] = field(default_factory=dict)  # leg -> failure reason


@dataclass
class Run:
    """Drives an observer and a controller the way the pump does, recording commands."""

    case: Case
    ctl: Controller = field(init=False)
    obs: Observer = field(init=False)
    out: list[RelayCommand] = field(default_factory=list)
    queue: list[tuple[Direction, bytes]] = field(default_factory=list)
    handshakes: list[Leg] = field(default_factory=list)
    received: dict[Direction, int] = field(default_factory=lambda: {C: 0, S: 0})
    t: float = 0.0

    def __post_init__(self) -> None:
        case = self.case
        self.ctl = Controller(
            case.mode,
            client_tls=case.client_tls,
            upstream_tls=case.upstream_tls,
            upstream_stls=case.upstream_stls,
            hide_plus=case.hide_plus,
        )
        self.obs = Observer()

    def feed(self, event: Input) -> None:
        commands = self.ctl.handle(event)
        self.out.extend(commands)
        for command in commands:
            if isinstance(command, Send):
                # popproxy's bytes join the stream the leg's peer receives, in order.
                self.queue.append((command.leg.other.sender, command.data))
            elif isinstance(command, TlsFact):
                self.drain()
                events = self.obs.start_tls(command.direction, decrypted=command.decrypted)
                self.feed(Parsed(tuple(events)))
            elif isinstance(command, StartTls):
                self.handshakes.append(command.leg)
        self.drain()

    def handshake(self) -> None:
        """Handshakes finish after the bytes already in flight (those of the same step)."""
        while self.handshakes and self.ctl.ended is None:
            leg = self.handshakes.pop(0)
            failure = self.case.tls.get(leg)
            if failure is None:
                self.drain()
                self.feed(Parsed(tuple(self.obs.start_tls(leg.sender))))
                self.feed(TlsEstablished(leg))
            else:
                self.feed(TlsFailed(leg, failure))

    def drain(self) -> None:
        while self.queue:
            direction, data = self.queue.pop(0)
            self.feed(Parsed(tuple(self.obs.receive_data(direction, data))))

    def data(self, direction: Direction, data: bytes) -> None:
        self.t += 0.001
        self.received[direction] += len(data)
        self.queue.append((direction, data))  # queued for the observer in arrival order
        self.feed(DataReceived(direction, data, self.t))


def play(case: Case, split: Splitter) -> Run:
    run = Run(case)
    run.out.extend(run.ctl.start())
    for kind, data in case.steps:
        if run.ctl.ended is not None:
            break
        if kind == "eof":
            direction = Direction(data.decode())
            run.queue.append((direction, b""))
            run.feed(EofReceived(direction, run.t))
            run.handshake()
            continue
        for piece in split(data):
            if run.ctl.ended is None:
                run.data(Direction(kind), piece)
        run.handshake()
    return run


def canonical(commands: Iterable[RelayCommand]) -> list[RelayCommand]:
    """Merge what segmentation may split: adjacent forwards, contiguous drops."""
    out: list[RelayCommand] = []
    for command in commands:
        if isinstance(command, (HoldReads, ResumeReads)):
            continue
        last = out[-1] if out else None
        if (
            isinstance(command, Forward)
            and isinstance(last, Forward)
            and last.direction is command.direction
        ):
            out[-1] = Forward(command.direction, last.data + command.data)
        elif (
            isinstance(command, Drop)
            and isinstance(last, Drop)
            and (last.direction, last.why) == (command.direction, command.why)
            and last.offset + last.length == command.offset
        ):
            out[-1] = Drop(command.direction, last.offset, last.length + command.length, last.why)
        elif not (isinstance(command, Note) and command == last):
            out.append(command)
    return out


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def random_splitter(rng: random.Random) -> Splitter:
    def split(data: bytes) -> list[bytes]:
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 4))))
        bounds = [0, *cuts, len(data)]
        return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]

    return split


def fwd(direction: Direction, data: bytes) -> Forward:
    return Forward(direction, data)


STLS_OK = b"+OK Begin TLS negotiation now.\r\n"
LOGIN = b"USER joe\r\nPASS secret\r\n"
LOGIN_OK = b"+OK\r\n+OK logged in\r\n"
RETR = b"+OK 12 octets\r\nHello\r\n..x\r\n.\r\n"

CASES = [
    Case(
        "plain session, nothing decided",
        [("s", GREETING), ("c", LOGIN), ("s", LOGIN_OK), ("c", b"RETR 1\r\n"), ("s", RETR)],
        [
            fwd(S, GREETING),
            fwd(C, LOGIN),
            fwd(S, LOGIN_OK),
            fwd(C, b"RETR 1\r\n"),
            fwd(S, RETR),
        ],
    ),
    Case(
        "early data before the greeting",
        [("c", b"CAPA\r\n"), ("s", GREETING + CAPA_BODY)],
        [fwd(C, b"CAPA\r\n"), fwd(S, GREETING + CAPA_BODY)],
    ),
    Case(
        "STLS intercepted: +OK held until the upstream leg is TLS",
        [("s", GREETING), ("c", b"STLS\r\n"), ("s", STLS_OK), ("c", b"CAPA\r\n")],
        [
            fwd(S, GREETING),
            fwd(C, b"STLS\r\n"),
            StartTls(U, "stls"),
            fwd(S, STLS_OK),
            StartTls(L, "stls"),
            fwd(C, b"CAPA\r\n"),
        ],
    ),
    Case(
        "STLS in lower case with trailing space",
        [("s", GREETING), ("c", b"stls \r\n"), ("s", STLS_OK)],
        [
            fwd(S, GREETING),
            fwd(C, b"stls \r\n"),
            StartTls(U, "stls"),
            fwd(S, STLS_OK),
            StartTls(L, "stls"),
        ],
    ),
    Case(
        "STLS refused by the server: plaintext goes on",
        [("s", GREETING), ("c", b"STLS\r\n"), ("s", b"-ERR no\r\n"), ("c", b"NOOP\r\n")],
        [fwd(S, GREETING), fwd(C, b"STLS\r\n"), fwd(S, b"-ERR no\r\n"), fwd(C, b"NOOP\r\n")],
    ),
    Case(
        "client injection after STLS is dropped",
        [("s", GREETING), ("c", b"STLS\r\nUSER evil\r\n"), ("s", STLS_OK)],
        [
            fwd(S, GREETING),
            fwd(C, b"STLS\r\n"),
            Drop(S, len(GREETING) + len(STLS_OK), 0, "x"),  # placeholder, replaced below
        ],
    ),
    Case(
        "server injection after +OK is dropped",
        [("s", GREETING), ("c", b"STLS\r\n"), ("s", STLS_OK + b"-ERR evil\r\n")],
        [
            fwd(S, GREETING),
            fwd(C, b"STLS\r\n"),
            StartTls(U, "stls"),
            Drop(S, len(GREETING) + len(STLS_OK), 11, "plaintext after STLS +OK"),
            fwd(S, STLS_OK),
            StartTls(L, "stls"),
        ],
    ),
    Case(
        "passthrough: both directions opaque after +OK",
        [("s", GREETING), ("c", b"STLS\r\n"), ("s", STLS_OK), ("c", b"\x16\x03\x01hello")],
        [
            fwd(S, GREETING),
            fwd(C, b"STLS\r\n"),
            fwd(S, STLS_OK),
            TlsFact(S, decrypted=False, mode="passthrough"),
            TlsFact(C, decrypted=False, mode="passthrough"),
            fwd(C, b"\x16\x03\x01hello"),
        ],
        mode=StlsMode.PASSTHROUGH,
    ),
    Case(
        "strip: STLS hidden from CAPA and refused by popproxy",
        [("s", GREETING), ("c", b"CAPA\r\n"), ("s", CAPA_BODY), ("c", b"STLS\r\nNOOP\r\n")],
        [
            fwd(S, GREETING),
            fwd(C, b"CAPA\r\n"),
            fwd(S, b"+OK\r\nTOP\r\n"),
            Drop(S, len(GREETING) + 10, 6, "STLS capability hidden by popproxy"),
            Note("strip", "STLS hidden from CAPA"),
            fwd(S, b"UIDL\r\n.\r\n"),
            Drop(C, 6, 6, "STLS answered by popproxy"),
            Note("strip", "STLS refused by popproxy (strip mode)"),
            Send(L, b"-ERR STLS not available.\r\n", "strip mode: popproxy refuses STLS"),
            fwd(C, b"NOOP\r\n"),
        ],
        mode=StlsMode.STRIP,
    ),
    Case(
        "strip: STLS answered only after the reply pipelined before it",
        [("s", GREETING), ("c", b"RETR 1\r\nSTLS\r\n"), ("s", RETR)],
        [
            fwd(S, GREETING),
            fwd(C, b"RETR 1\r\n"),
            Drop(C, 8, 6, "STLS answered by popproxy"),
            fwd(S, RETR),
            Note("strip", "STLS refused by popproxy (strip mode)"),
            Send(L, b"-ERR STLS not available.\r\n", "strip mode: popproxy refuses STLS"),
        ],
        mode=StlsMode.STRIP,
    ),
    Case(
        "upstream already TLS: popproxy upgrades the client leg itself",
        [("s", GREETING), ("c", b"STLS\r\nINJECT\r\n"), ("c", b"NOOP\r\n")],
        [
            fwd(S, GREETING),
            Drop(C, 0, 6, "STLS answered by popproxy"),
            Send(L, STLS_OK, "the upstream leg is TLS already"),
            StartTls(L, "stls"),
            Drop(C, 6, 8, "plaintext after STLS"),
            TlsFact(S, decrypted=True, mode="already-tls"),
            fwd(C, b"NOOP\r\n"),
        ],
        upstream_tls=True,
    ),
    Case(
        "client leg TLS already: STLS refused",
        [("s", GREETING), ("c", b"STLS\r\n"), ("c", b"NOOP\r\n")],
        [
            fwd(S, GREETING),
            Drop(C, 0, 6, "STLS answered by popproxy"),
            Send(L, b"-ERR TLS is already active.\r\n", "TLS is already active on the client leg"),
            fwd(C, b"NOOP\r\n"),
        ],
        client_tls=True,
        upstream_tls=True,
    ),
    Case(
        "upstream TLS fails after +OK: the client gets popproxy's -ERR",
        [("s", GREETING), ("c", b"STLS\r\n"), ("s", STLS_OK)],
        [
            fwd(S, GREETING),
            fwd(C, b"STLS\r\n"),
            StartTls(U, "stls"),
            Drop(S, len(GREETING), len(STLS_OK), "upstream TLS failed"),
            Send(
                L,
                b"-ERR [SYS/TEMP] popproxy: TLS with upstream failed: bad cert\r\n",
                "TLS with upstream failed: bad cert",
            ),
            EndSession("upstream-tls-error", "TLS with upstream failed: bad cert"),
        ],
        tls={U: "bad cert"},
    ),
    Case(
        "client TLS fails after +OK",
        [("s", GREETING), ("c", b"STLS\r\n"), ("s", STLS_OK)],
        [
            fwd(S, GREETING),
            fwd(C, b"STLS\r\n"),
            StartTls(U, "stls"),
            fwd(S, STLS_OK),
            StartTls(L, "stls"),
            EndSession(
                "client-tls-error", "TLS handshake with the client failed: no shared cipher"
            ),
        ],
        tls={L: "no shared cipher"},
    ),
    Case(
        "--upstream-stls: popproxy's own STLS, its reply dropped",
        [("s", GREETING), ("s", STLS_OK), ("c", b"CAPA\r\n"), ("s", b"+OK\r\n.\r\n")],
        [
            fwd(S, GREETING),
            Send(U, b"STLS\r\n", "popproxy upgrades the upstream leg (--upstream-stls)"),
            Drop(S, len(GREETING), len(STLS_OK), "reply to popproxy's own STLS"),
            StartTls(U, "stls"),
            TlsFact(C, decrypted=True, mode="unchanged"),
            fwd(C, b"CAPA\r\n"),
            fwd(S, b"+OK\r\n.\r\n"),
        ],
        upstream_stls=True,
    ),
    Case(
        "--upstream-stls refused by the server",
        [("s", GREETING), ("s", b"-ERR no TLS\r\n")],
        [
            fwd(S, GREETING),
            Send(U, b"STLS\r\n", "popproxy upgrades the upstream leg (--upstream-stls)"),
            Drop(S, len(GREETING), 13, "reply to popproxy's own STLS"),
            Send(
                L, b"-ERR [SYS/TEMP] popproxy: upstream refused STLS\r\n", "upstream refused STLS"
            ),
            EndSession("upstream-tls-error", "upstream refused STLS"),
        ],
        upstream_stls=True,
    ),
    Case(
        "client closes while STLS awaits its reply",
        [("s", GREETING), ("c", b"STLS\r\n"), ("eof", b"c"), ("s", b"-ERR no\r\n")],
        [fwd(S, GREETING), fwd(C, b"STLS\r\n"), fwd(S, b"-ERR no\r\n"), ForwardEof(C)],
    ),
    Case(
        "server closes in the middle of a body",
        [("s", GREETING), ("c", b"RETR 1\r\n"), ("s", b"+OK\r\npart"), ("eof", b"s")],
        [fwd(S, GREETING), fwd(C, b"RETR 1\r\n"), fwd(S, b"+OK\r\npart"), ForwardEof(S)],
    ),
    Case(
        "server closes before its greeting",
        [("eof", b"s")],
        [ForwardEof(S)],
    ),
    Case(
        "client closes after QUIT",
        [("s", GREETING), ("c", b"QUIT\r\n"), ("s", b"+OK bye\r\n"), ("eof", b"s"), ("eof", b"c")],
        [
            fwd(S, GREETING),
            fwd(C, b"QUIT\r\n"),
            fwd(S, b"+OK bye\r\n"),
            ForwardEof(S),
            ForwardEof(C),
        ],
    ),
    Case(
        "client closes during the client handshake phase (strip mode partial line)",
        [("s", GREETING), ("c", b"ST"), ("eof", b"c")],
        [fwd(S, GREETING), fwd(C, b"ST"), ForwardEof(C)],
        mode=StlsMode.STRIP,
    ),
]
# The injection case's expectation, spelled out (offsets are easier computed).
CASES[5].expected = [
    fwd(S, GREETING),
    fwd(C, b"STLS\r\n"),
    StartTls(U, "stls"),
    Drop(C, 6, 11, "plaintext after STLS"),
    fwd(S, STLS_OK),
    StartTls(L, "stls"),
]
IDS = [case.name for case in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_whole_gives_the_expected_commands(case: Case) -> None:
    assert canonical(play(case, whole).out) == case.expected


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_byte_at_a_time_gives_the_same_commands(case: Case) -> None:
    assert canonical(play(case, bytewise).out) == case.expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(0, len(CASES) - 1), seed=st.integers(0, 2**32))
def test_random_splits_give_the_same_commands(index: int, seed: int) -> None:
    case = CASES[index]
    run = play(case, random_splitter(random.Random(seed)))
    assert canonical(run.out) == case.expected
    assert_accounted(run)
    assert_holds_respected(run.out)


def assert_accounted(run: Run) -> None:
    """Every byte received is forwarded, dropped, or still pending: none lost, none made."""
    for direction in (C, S):
        forwarded = sum(
            len(c.data) for c in run.out if isinstance(c, Forward) and c.direction is direction
        )
        dropped = sum(c.length for c in run.out if isinstance(c, Drop) and c.direction is direction)
        pending = run.ctl.pending(direction)
        assert forwarded + dropped + pending == run.received[direction]


def assert_holds_respected(commands: list[RelayCommand]) -> None:
    """While a leg's reads are held, none of its bytes is forwarded."""
    held: set[Leg] = set()
    for command in commands:
        if isinstance(command, HoldReads):
            held.add(command.leg)
        elif isinstance(command, ResumeReads):
            held.discard(command.leg)
        elif isinstance(command, Forward) and command.direction is C:
            assert L not in held


def test_an_stls_split_across_reads_is_intercepted() -> None:
    case = Case("split", [("s", GREETING), ("c", b"ST"), ("c", b"LS\r\n"), ("s", STLS_OK)], [])
    out = play(case, whole).out
    assert StartTls(U, "stls") in out and HoldReads(L) in out


def test_the_fast_path_forwards_before_parsing() -> None:
    ctl = Controller()
    assert ctl.handle(DataReceived(S, GREETING, 0.0)) == [Forward(S, GREETING)]
    assert ctl.handle(DataReceived(C, b"NOOP\r\n", 0.1)) == [Forward(C, b"NOOP\r\n")]
    assert ctl.pending(C) == ctl.pending(S) == 0


def test_an_observer_failure_releases_held_bytes_unchanged() -> None:
    ctl = Controller()
    obs = Observer()
    out = ctl.handle(DataReceived(S, GREETING, 0.0))
    ctl.handle(Parsed(tuple(obs.receive_data(S, GREETING))))
    out = ctl.handle(DataReceived(C, b"STLS\r\n", 0.1))
    out += ctl.handle(Parsed(tuple(obs.receive_data(C, b"STLS\r\n"))))
    assert HoldReads(L) in out
    ctl.handle(DataReceived(S, b"+O", 0.2))
    out = ctl.handle(ObserverFailed("boom"))
    assert Forward(S, b"+O") in out and ResumeReads(L) in out


def test_idle_timeout_and_linger_come_from_ticks() -> None:
    ctl = Controller(idle_timeout=10, linger=2)
    assert ctl.handle(Tick(9.9)) == []
    assert ctl.handle(Tick(10.0)) == [EndSession("idle-timeout", "no traffic for 10 s")]
    ctl = Controller(idle_timeout=10, linger=2)
    ctl.handle(EofReceived(S, 1.0))
    assert ctl.deadline == 3.0
    assert ctl.handle(Tick(3.0)) == [ForwardEof(S), EndSession("server-closed", None)][1:]


def test_nothing_comes_out_after_the_end() -> None:
    ctl = Controller(idle_timeout=1)
    ctl.handle(Tick(5))
    assert ctl.handle(DataReceived(C, b"NOOP\r\n", 6)) == []


@pytest.mark.parametrize("split", [whole, bytewise], ids=["whole", "bytewise"])
def test_strip_never_forwards_an_stls_behind_an_open_auth(split: Splitter) -> None:
    # Lines behind an AUTH were forwarded unplaced: an STLS among them reached the server.
    steps = [
        ("s", GREETING),
        ("c", b"AUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\nSTLS\r\n"),
        ("s", b"+ \r\n"),
        ("s", b"+OK logged in\r\n"),
    ]
    run = play(Case("auth-stls", steps, [], mode=StlsMode.STRIP), split)
    to_server = b"".join(c.data for c in run.out if isinstance(c, Forward) and c.direction is C)
    assert to_server == b"AUTH PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\n"
    assert any(isinstance(c, Send) and c.data == b"-ERR STLS not available.\r\n" for c in run.out)


def test_strip_never_forwards_an_stls_line_sent_just_before_the_client_closes() -> None:
    steps = [("s", GREETING), ("c", b"NOOP\r\nSTLS\r\n"), ("eof", b"c"), ("s", b"+OK\r\n")]
    run = play(Case("eof-stls", steps, [], mode=StlsMode.STRIP), whole)
    to_server = b"".join(c.data for c in run.out if isinstance(c, Forward) and c.direction is C)
    assert to_server == b"NOOP\r\n"
