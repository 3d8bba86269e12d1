"""Fault rules inside the relay controller: the same bytes whatever the reads, in every mode."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popproxy.core import Direction
from popproxy.faults import FaultSet, parse_rule
from popproxy.faults.shape import Close, Forward, Hang, Originate, shape_whole
from popproxy.proxy.controller import (
    Controller,
    Drop,
    EndSession,
    HoldReads,
    Leg,
    Note,
    Reserve,
    ResumeReads,
    Send,
    StlsMode,
    Tick,
)
from popproxy.proxy.controller import Forward as Fwd
from tests.test_controller import Case, Run

C, S = Direction.CLIENT, Direction.SERVER
GREETING = b"+OK ready\r\n"
BODY = b"+OK 30 octets\r\nSubject: x\r\n..dotted\r\n\r\n" + b"y" * 40 + b"\r\n.\r\n"
NEXT = b"+OK 2 100\r\n"
CAPA = b"+OK\r\nTOP\r\nSTLS\r\nSASL PLAIN\r\nUIDL\r\n.\r\n"

RULES = [
    "RETR 1: cut after 20",
    "RETR 1: cut after",
    "RETR 1: cut",
    "RETR 1: stall after 30",
    "RETR 1: delay 1ms after 5",
    "RETR 1: delay 2ms",
    "RETR 1: throttle 64KiB/s after 7",
    "RETR 1: corrupt bare-lf",
    "RETR 1: corrupt unstuffed",
    "RETR 1: corrupt no-terminator",
    "RETR 2: cut",  # never matches: every byte goes through
]


@dataclass
class FaultRun(Run):
    """The pump's part, plus the clock: a ``Tick`` at every deadline a pause sets."""

    rules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        case = self.case
        faults = FaultSet([parse_rule(r) for r in self.rules], seed=1).session(1)
        self.ctl = Controller(
            case.mode,
            client_tls=case.client_tls,
            upstream_tls=case.upstream_tls,
            hide_plus=case.hide_plus,
            faults=faults,
        )

    def settle_time(self) -> None:
        """Let every pause end (the pump's watchdog)."""
        for _ in range(100_000):
            deadline = self.ctl.deadline
            if self.ctl.ended is not None or deadline > self.t + 60:
                return
            self.t = max(self.t, deadline)
            self.feed(Tick(self.t))


def drive(
    rules: list[str], steps: list[tuple[str, bytes]], splits: list[int], **case: object
) -> FaultRun:
    run = FaultRun(Case("faults", [], [], **case), rules=rules)  # type: ignore[arg-type]
    run.out.extend(run.ctl.start())
    for kind, data in steps:
        if run.ctl.ended is not None:
            break
        bounds = sorted({0, len(data), *(min(s, len(data)) for s in splits)})
        for lo, hi in itertools.pairwise(bounds):
            if run.ctl.ended is None:
                run.data(Direction(kind), data[lo:hi])
        run.handshake()
        run.settle_time()
    return run


def to_client(run: Run) -> bytes:
    """What the client received, in the order the pump sends it."""
    return b"".join(
        c.data
        for c in run.out
        if (isinstance(c, Fwd) and c.direction is S)
        or (isinstance(c, Send) and c.leg is Leg.CLIENT)
    )


def to_server(run: Run) -> bytes:
    return b"".join(
        c.data
        for c in run.out
        if (isinstance(c, Fwd) and c.direction is C)
        or (isinstance(c, Send) and c.leg is Leg.UPSTREAM)
    )


def accounted(run: Run, direction: Direction) -> list[tuple[int, int]]:
    """Every byte of ``direction`` forwarded or dropped, as sorted spans."""
    spans = [
        (c.offset, c.offset + len(c.data))
        for c in run.out
        if isinstance(c, Fwd) and c.direction is direction
    ]
    spans += [
        (c.offset, c.offset + c.length)
        for c in run.out
        if isinstance(c, Drop) and c.direction is direction
    ]
    return sorted(spans)


def assert_each_byte_once(run: Run, direction: Direction, total: int) -> None:
    spans = accounted(run, direction)
    own = run.ctl.own_spans(direction)
    pos = 0
    for lo, hi in sorted(spans + own):
        assert lo == pos, (direction, spans, own)
        pos = hi
    assert pos == total


@given(st.sampled_from(RULES), st.lists(st.integers(0, len(BODY) + len(NEXT)), max_size=8))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_client_gets_the_same_bytes_whatever_the_reads(rule: str, splits: list[int]) -> None:
    steps = [("s", GREETING), ("c", b"RETR 1\r\nSTAT\r\n"), ("s", BODY + NEXT)]
    run = drive([rule], steps, splits)
    inj = FaultSet([parse_rule(rule)]).session(1).command("RETR", "1", None, None)
    got = to_client(run)
    assert to_server(run) == b"RETR 1\r\nSTAT\r\n"
    ended = isinstance(run.ctl.ended, EndSession)
    if inj is None:
        assert got == GREETING + BODY + NEXT and not ended
        assert_each_byte_once(run, S, len(GREETING + BODY + NEXT))
        return
    shaped_steps = shape_whole(inj, BODY, multiline=True)
    shaped = b"".join(s.data for s in shaped_steps if isinstance(s, Forward | Originate))
    stopped = any(isinstance(s, Close | Hang) for s in shaped_steps)
    assert got == GREETING + shaped + (b"" if stopped else NEXT)
    assert ended == any(isinstance(s, Close) for s in shaped_steps)
    if not ended:  # after a cut the session is over: the rest is never read
        assert_each_byte_once(run, S, len(GREETING + BODY + NEXT))
    kinds = [c.kind for c in run.out if isinstance(c, Note)]
    assert kinds.count("fault") == 1


def test_a_pause_holds_every_later_command_until_its_tick() -> None:
    run = FaultRun(Case("pause", [], []), rules=["STAT: delay 500ms"])
    run.data(S, GREETING)
    run.data(C, b"STAT\r\nNOOP\r\n")
    run.data(S, b"+OK 1 2\r\n+OK\r\n")
    assert to_client(run) == GREETING  # both replies wait: NOOP's may not overtake STAT's
    assert run.ctl.deadline == pytest.approx(run.t + 0.5, abs=0.01)
    run.feed(Tick(run.t + 0.1))
    assert to_client(run) == GREETING
    run.feed(Tick(run.t + 0.6))
    assert to_client(run) == GREETING + b"+OK 1 2\r\n+OK\r\n"
    notes = [c for c in run.out if isinstance(c, Note)]
    assert notes[0].kind == "fault" and ("verb", "STAT") in notes[0].fields


def test_answers_keep_their_place_among_pipelined_replies() -> None:
    rules = ["LIST: -ERR [SYS/TEMP] later", "UIDL: -ERR [IN-USE] locked"]
    run = FaultRun(Case("answers", [], []), rules=rules)
    run.data(S, GREETING)
    run.data(C, b"STAT\r\nLIST\r\nNOOP\r\nUIDL\r\nQUIT\r\n")
    assert to_server(run) == b"STAT\r\n"  # nothing after LIST goes before its answer
    assert HoldReads(Leg.CLIENT) in run.out
    run.data(S, b"+OK 2 300\r\n")
    assert to_server(run) == b"STAT\r\nNOOP\r\n"
    run.data(S, b"+OK\r\n")
    run.data(S, b"+OK bye\r\n")
    assert to_server(run) == b"STAT\r\nNOOP\r\nQUIT\r\n"
    assert to_client(run) == (
        GREETING
        + b"+OK 2 300\r\n-ERR [SYS/TEMP] later\r\n+OK\r\n-ERR [IN-USE] locked\r\n+OK bye\r\n"
    )
    dropped = [(c.offset, c.length) for c in run.out if isinstance(c, Drop)]
    assert dropped == [(6, 6), (18, 6)]
    assert run.out.count(ResumeReads(Leg.CLIENT)) >= 1
    assert_each_byte_once(run, C, len(b"STAT\r\nLIST\r\nNOOP\r\nUIDL\r\nQUIT\r\n"))


@pytest.mark.parametrize(
    ("reply", "answered"),
    [(b"-ERR [AUTH] unknown mechanism\r\n", True), (b"+ \r\n", False)],
    ids=["refused-auth-makes-it-a-command", "challenge-makes-it-a-sasl-response"],
)
def test_a_command_behind_an_undecided_auth_is_answered(reply: bytes, answered: bool) -> None:
    run = FaultRun(Case("auth", [], []), rules=["STAT: -ERR [SYS/TEMP] try later"])
    run.data(S, GREETING)
    run.data(C, b"AUTH X\r\nSTAT\r\n")
    assert to_server(run) == b"AUTH X\r\n"  # STAT's role waits for the server's answer
    run.data(S, reply)
    if answered:
        assert to_server(run) == b"AUTH X\r\n"
        assert to_client(run) == GREETING + reply + b"-ERR [SYS/TEMP] try later\r\n"
    else:
        assert to_server(run) == b"AUTH X\r\nSTAT\r\n"  # the SASL response goes on
        assert to_client(run) == GREETING + reply


@pytest.mark.parametrize("split", [[], list(range(1, 80))], ids=["whole", "byte-at-a-time"])
def test_faults_apply_in_strip_mode(split: list[int]) -> None:
    steps = [
        ("s", GREETING),
        ("c", b"CAPA\r\n"),
        ("s", CAPA),
        ("c", b"STLS\r\n"),
        ("c", b"RETR 1\r\n"),
        ("s", BODY),
    ]
    run = drive(["RETR 1: cut after 20", "CAPA: delay 5ms"], steps, split, mode=StlsMode.STRIP)
    got = to_client(run)
    capa = CAPA.replace(b"STLS\r\n", b"")
    assert got == GREETING + capa + b"-ERR STLS not available.\r\n" + BODY[:20]
    assert isinstance(run.ctl.ended, EndSession) and run.ctl.ended.how == "fault"
    assert to_server(run) == b"CAPA\r\nRETR 1\r\n"


def test_faults_apply_after_an_intercepted_stls() -> None:
    steps = [
        ("s", GREETING),
        ("c", b"STLS\r\n"),
        ("s", b"+OK Begin TLS\r\n"),
        ("c", b"RETR 1\r\n"),
        ("s", BODY),
    ]
    run = drive(["RETR 1: stall after 10"], steps, [])
    assert to_client(run) == GREETING + b"+OK Begin TLS\r\n" + BODY[:10]
    assert run.ctl.ended is None
    stalls = [c for c in run.out if isinstance(c, Note) and c.kind == "fault-stall"]
    assert len(stalls) == 1


def test_a_fault_may_answer_stls_itself() -> None:
    run = FaultRun(Case("stls", [], []), rules=["STLS: -ERR [SYS/TEMP] no TLS today"])
    run.data(S, GREETING)
    run.data(C, b"STLS\r\nCAPA\r\n")
    assert to_client(run) == GREETING + b"-ERR [SYS/TEMP] no TLS today\r\n"
    assert to_server(run) == b"CAPA\r\n"  # the session goes on in plaintext


def test_own_bytes_behind_a_pause_are_reserved_in_order() -> None:
    run = FaultRun(Case("reserve", [], [], mode=StlsMode.STRIP), rules=["CAPA: delay 1s"])
    run.data(S, GREETING)
    run.data(C, b"CAPA\r\n")
    run.data(S, CAPA[:10])
    run.data(C, b"STLS\r\n")  # held: the client waits for CAPA in real life, not here
    run.data(S, CAPA[10:])
    reserves = [c for c in run.out if isinstance(c, Reserve)]
    sends = [c for c in run.out if isinstance(c, Send)]
    assert reserves and not sends  # recorded in order now, sent when the pause is over
    run.settle_time()
    assert to_client(run).endswith(b"-ERR STLS not available.\r\n")
    assert next(c for c in run.out if isinstance(c, Send)).reserved


def test_an_idle_limit_closes_with_a_line() -> None:
    run = FaultRun(Case("idle", [], []), rules=["NOOP: inactivity 2s"])
    run.data(S, GREETING)
    run.data(C, b"NOOP\r\n")
    run.data(S, b"+OK\r\n")
    assert run.ctl.deadline == pytest.approx(run.t + 2, abs=0.01)
    run.feed(Tick(run.t + 2.5))
    assert isinstance(run.ctl.ended, EndSession) and run.ctl.ended.how == "fault"
    assert to_client(run).endswith(b"-ERR Disconnected for inactivity.\r\n")
    assert [c.kind for c in run.out if isinstance(c, Note)][-1] == "fault-close"


@pytest.mark.parametrize("split", [[], list(range(1, 60, 3))], ids=["whole", "3-byte-reads"])
def test_advertise_rewrites_the_listing_and_refuses_the_mechanism(split: list[int]) -> None:
    steps = [
        ("s", GREETING),
        ("c", b"CAPA\r\nAUTH XOAUTH2\r\n"),
        ("s", CAPA),
    ]
    run = drive(["CAPA: advertise XOAUTH2"], steps, split)
    capa = CAPA.replace(b"SASL PLAIN", b"SASL PLAIN XOAUTH2")
    refusal = b"-ERR Unsupported authentication mechanism.\r\n"
    assert to_client(run) == GREETING + capa + refusal
    assert to_server(run) == b"CAPA\r\n"  # AUTH never reached the server
    drops = [c for c in run.out if isinstance(c, Drop) and c.direction is S]
    assert sum(d.length for d in drops) == len(CAPA)  # the server's listing, withheld whole
    assert_each_byte_once(run, S, len(GREETING + CAPA + capa + refusal))
