"""The observer's transition tables (core/state.py): complete, consistent, and all it follows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import popproxy.core.observer as observer_module
from popproxy.core import Direction, Observer, ObserverError, State, StateChanged
from popproxy.core.state import (
    INITIAL_MODE,
    INTERRUPTIBLE,
    MODE_TRANSITIONS,
    MODES,
    OK_REPLY_EVENTS,
    SESSION_TRANSITIONS,
    Mode,
    SessionEvent,
    Trigger,
    next_mode,
    next_state,
)
from tests.test_observer import CASES, GREETING, Step, Tls, bytewise, feed, whole
from tests.test_observer_props import fuzz_step

C = Direction.CLIENT
S = Direction.SERVER

Row = tuple[Direction, Mode, Trigger, Mode]

# Triggers the IO layer (start_tls, go_opaque, EOF) or the other side (a pipeline overflow)
# can cause whatever a side is reading: their rows must cover every mode.
TOTAL = (Trigger.TLS_DECRYPTED, Trigger.TLS_PASSTHROUGH, Trigger.PIPELINE_OVERFLOW)
TOTAL_WHILE_OPEN = (Trigger.OPAQUE_REQUESTED, Trigger.EOF)


def rows() -> Iterator[Row]:
    """Every transition the tables allow, TAIL_ENDED's included."""
    for direction in Direction:
        for trigger, row in MODE_TRANSITIONS[direction].items():
            for mode, new in row.items():
                yield direction, mode, trigger, new
        for mode in INTERRUPTIBLE[direction]:
            yield direction, Mode.TAIL, Trigger.TAIL_ENDED, mode


# --------------------------------------------------------------------------- the tables


def test_rows_stay_within_each_sides_modes() -> None:
    for direction, mode, _, new in rows():
        assert mode in MODES[direction] and new in MODES[direction]
    for direction in Direction:
        assert INITIAL_MODE[direction] in MODES[direction]
        assert INTERRUPTIBLE[direction] <= MODES[direction] - {Mode.TAIL, Mode.CLOSED}


def test_every_mode_is_reachable_from_the_initial_one() -> None:
    for direction in Direction:
        seen, todo = {INITIAL_MODE[direction]}, [INITIAL_MODE[direction]]
        while todo:
            mode = todo.pop()
            for d, m, _, new in rows():
                if d is direction and m is mode and new not in seen:
                    seen.add(new)
                    todo.append(new)
        assert seen == MODES[direction], direction


def test_io_triggers_are_allowed_in_every_mode() -> None:
    for direction in Direction:
        for mode in MODES[direction]:
            for trigger in TOTAL:
                next_mode(direction, mode, trigger)
            closed = mode is Mode.CLOSED
            opaque = next_mode(direction, mode, Trigger.OPAQUE_REQUESTED)
            assert opaque is (Mode.CLOSED if closed else Mode.OPAQUE)
            if not closed:
                assert next_mode(direction, mode, Trigger.EOF) is Mode.CLOSED


def test_a_closed_side_stays_closed_unless_scanned_or_passed_through() -> None:
    for direction, mode, trigger, new in rows():
        if mode is Mode.CLOSED and new is not Mode.CLOSED:
            assert (trigger, new) in {
                (Trigger.PIPELINE_OVERFLOW, Mode.SCAN),
                (Trigger.TLS_PASSTHROUGH, Mode.OPAQUE),
            }, direction


@pytest.mark.parametrize(
    ("direction", "mode", "trigger"),
    [
        (C, Mode.LINES, Trigger.BODY_OPENED),  # clients send no bodies
        (C, Mode.LINES, Trigger.GREETING_READ),
        (S, Mode.LINES, Trigger.GREETING_READ),  # one greeting per session
        (S, Mode.GREETING, Trigger.BODY_OPENED),
        (S, Mode.LINES, Trigger.BODY_ENDED),
        (S, Mode.CLOSED, Trigger.EOF),
        (S, Mode.GREETING, Trigger.LINE_OVERLONG),  # the greeting's head is read first
        (S, Mode.TAIL, Trigger.LINE_OVERLONG),
        (C, Mode.LINES, Trigger.TAIL_ENDED),
        (S, Mode.TLS_WAIT, Trigger.STLS_ACCEPTED),
    ],
)
def test_an_impossible_transition_raises(
    direction: Direction, mode: Mode, trigger: Trigger
) -> None:
    with pytest.raises(ObserverError):
        next_mode(direction, mode, trigger)


def test_a_tail_resumes_only_what_it_can_interrupt() -> None:
    assert next_mode(S, Mode.TAIL, Trigger.TAIL_ENDED, interrupted=Mode.BODY) is Mode.BODY
    with pytest.raises(ObserverError):
        next_mode(C, Mode.TAIL, Trigger.TAIL_ENDED, interrupted=Mode.BODY)
    with pytest.raises(ObserverError):
        next_mode(S, Mode.TAIL, Trigger.TAIL_ENDED, interrupted=Mode.GREETING)


def test_session_table_is_total_and_reaches_every_state() -> None:
    assert set(SESSION_TRANSITIONS) == {(s, e) for s in State for e in SessionEvent}
    seen, todo = {State.AUTHORIZATION}, [State.AUTHORIZATION]
    while todo:
        state = todo.pop()
        for event in SessionEvent:
            new = next_state(state, event)
            if new not in seen:
                seen.add(new)
                todo.append(new)
    assert seen == set(State)
    assert next_state(State.AUTHORIZATION, SessionEvent.QUIT_ACCEPTED) is State.AUTHORIZATION


@pytest.mark.parametrize(
    ("verb", "has_arg", "event"),
    [
        ("PASS", True, SessionEvent.LOGIN_ACCEPTED),
        ("APOP", True, SessionEvent.LOGIN_ACCEPTED),
        ("AUTH", True, SessionEvent.LOGIN_ACCEPTED),
        ("AUTH", False, None),  # AUTH alone lists mechanisms
        ("QUIT", False, SessionEvent.QUIT_ACCEPTED),
        ("USER", True, None),
        ("STLS", False, None),
    ],
)
def test_ok_reply_events(verb: str, has_arg: bool, event: SessionEvent | None) -> None:
    assert OK_REPLY_EVENTS.get((verb, has_arg)) is event


# --------------------------------------------------------------------------- the observer

# Scripts that reach the transitions no table-driven case in test_observer.py needs.
HEAD = 16
DIRECTED: list[tuple[str, list[Step], dict[str, Any]]] = [
    (  # an over-long +OK to RETR: its tail interrupts the body it opened
        "tail-in-body",
        [(S, GREETING), (C, b"RETR 1\r\n"), (S, b"+OK " + b"x" * 40 + b"\r\nhi\r\n.\r\n")],
        {"max_line": HEAD},
    ),
    (  # an over-long +OK to STLS: its tail comes before the handshake
        "tail-before-tls",
        [(S, GREETING), (C, b"STLS\r\n"), (S, b"+OK " + b"x" * 40 + b"\r\n"), Tls(S), Tls(C)],
        {"max_line": HEAD},
    ),
    (  # the -ERR to AUTH releases held lines that overflow the pipeline: its tail is scanned
        "tail-in-scan-server",
        [
            (S, GREETING),
            (C, b"AUTH PLAIN\r\nNOOP\r\nNOOP\r\n"),
            (S, b"-ERR " + b"x" * 40 + b"\r\n"),
        ],
        {"max_line": HEAD, "max_pending": 1},
    ),
    (  # an over-long command overflows the pipeline: its tail is scanned
        "tail-in-scan-client",
        [(S, GREETING), (C, b"NOOP\r\nNOOP " + b"x" * 40 + b"\r\nNOOP\r\n")],
        {"max_line": HEAD, "max_pending": 1},
    ),
    (  # held lines released after the client closed overflow the pipeline
        "overflow-after-client-close",
        [(S, GREETING), (C, b"AUTH PLAIN\r\nNOOP\r\nNOOP\r\n"), (C, b""), (S, b"-ERR\r\n")],
        {"max_pending": 1},
    ),
    (  # commands sent after the server closed overflow the pipeline
        "overflow-after-server-close",
        [(S, GREETING), (S, b""), (C, b"NOOP\r\nNOOP\r\n")],
        {"max_pending": 1},
    ),
    (  # the server accepts STLS while the client is inside an over-long line
        "stls-during-client-tail",
        [(S, GREETING), (C, b"STLS\r\n" + b"x" * 40), (S, b"+OK\r\n"), (C, b"\r\n")],
        {"max_line": HEAD},
    ),
    (  # a login accepted after QUIT
        "login-after-quit",
        [(S, GREETING), (C, b"USER a\r\nPASS b\r\nQUIT\r\nPASS c\r\n"), (S, b"+OK\r\n" * 4)],
        {},
    ),
]


def record(monkeypatch: pytest.MonkeyPatch, taken: set[Row]) -> None:
    """Note every mode transition the observer takes."""
    real = next_mode

    def noting(direction: Direction, mode: Mode, trigger: Trigger, interrupted: Mode) -> Mode:
        new = real(direction, mode, trigger, interrupted)
        taken.add((direction, mode, trigger, new))
        return new

    monkeypatch.setattr(observer_module, "next_mode", noting)


def test_every_peer_driven_transition_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows not marked total, and that change the mode, are each needed by some script."""
    taken: set[Row] = set()
    record(monkeypatch, taken)
    scripts = [(c.steps, c.options) for c in CASES if c.name != "pipelining-10000"]
    scripts += [(steps, options) for _, steps, options in DIRECTED]
    for steps, options in scripts:
        for split in (whole, bytewise):
            feed([*steps, (C, b""), (S, b"")], split, Observer(**options))
    expected = {
        row for row in rows() if row[2] not in TOTAL + TOTAL_WHILE_OPEN and row[1] is not row[3]
    }
    assert expected - taken == set()
    assert {(C, Mode.CLOSED, Trigger.PIPELINE_OVERFLOW, Mode.SCAN)} <= taken
    assert {(S, Mode.CLOSED, Trigger.PIPELINE_OVERFLOW, Mode.SCAN)} <= taken
    assert {(C, Mode.TAIL, Trigger.STLS_ACCEPTED, Mode.TAIL)} <= taken


def test_login_after_quit_follows_the_server() -> None:
    steps, options = next((s, o) for name, s, o in DIRECTED if name == "login-after-quit")
    events, obs = feed(steps, whole, Observer(**options))
    changes = [(e.old, e.new) for e in events if isinstance(e, StateChanged)]
    assert changes == [
        (State.AUTHORIZATION, State.TRANSACTION),
        (State.TRANSACTION, State.UPDATE),
        (State.UPDATE, State.TRANSACTION),
    ]
    assert obs.state is State.TRANSACTION


def _check_invariants(obs: Observer, events: Sequence[object]) -> None:
    for side, direction in ((obs._client, C), (obs._server, S)):
        assert side.mode in MODES[direction]
        if side.mode is Mode.TAIL:
            assert side.after_tail in INTERRUPTIBLE[direction]
    state = State.AUTHORIZATION
    for event in events:
        if isinstance(event, StateChanged):
            assert event.old is state
            assert event.new in {next_state(state, e) for e in SessionEvent}
            state = event.new
    assert obs.state is state


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(fuzz_step, max_size=40),
    max_line=st.sampled_from([4, 16, 8192]),
    max_pending=st.sampled_from([1, 2, 100_000]),
)
def test_any_input_leaves_the_observer_where_the_tables_allow(
    steps: list[Step], max_line: int, max_pending: int
) -> None:
    obs = Observer(max_line=max_line, max_pending=max_pending)
    events: list[object] = []
    for step in [*steps, (C, b""), (S, b"")]:
        got, _ = feed([step], whole, obs)
        events += got
        _check_invariants(obs, events)
