"""The observer's state machine: everything that affects state transitions lives here.

Two machines run side by side (docs/observer.md, "State machine"):

- the *session state* (``State``, RFC 1939 §3): AUTHORIZATION, then TRANSACTION once a
  login is accepted, then UPDATE once QUIT is answered ``+OK`` in TRANSACTION;
- each side's *read mode* (``Mode``): how that direction's next bytes are framed (lines,
  a body, the tail of an over-long line, opaque bytes, ...).

Both are tables of ``(current, trigger) -> next``.  The observer decides which trigger
happened and asks ``next_state`` or ``next_mode``; it never assigns a state or a mode
itself.  A trigger the table does not list for the current mode is a bug in the observer,
never peer input, and raises ``ObserverError``: every transition that bytes from a peer
can cause is listed, including the odd ones a hostile peer can provoke.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

from popproxy.core.events import Direction, State


class ObserverError(Exception):
    """The one error the observer raises: the caller misused the API (never bad input)."""


# --------------------------------------------------------------------------- session state


class SessionEvent(enum.StrEnum):
    """What happened, as far as the session state is concerned."""

    LOGIN_ACCEPTED = "login-accepted"  # +OK to PASS, APOP, or AUTH with a mechanism
    QUIT_ACCEPTED = "quit-accepted"  # +OK to QUIT


SESSION_TRANSITIONS: Mapping[tuple[State, SessionEvent], State] = {
    # RFC 1939 §4: a successful PASS or APOP (or AUTH, RFC 5034 §4) enters TRANSACTION.
    (State.AUTHORIZATION, SessionEvent.LOGIN_ACCEPTED): State.TRANSACTION,
    (State.TRANSACTION, SessionEvent.LOGIN_ACCEPTED): State.TRANSACTION,
    # A server that accepts a login after QUIT is followed as it says.
    (State.UPDATE, SessionEvent.LOGIN_ACCEPTED): State.TRANSACTION,
    # RFC 1939 §6: QUIT in AUTHORIZATION closes without entering UPDATE.
    (State.AUTHORIZATION, SessionEvent.QUIT_ACCEPTED): State.AUTHORIZATION,
    (State.TRANSACTION, SessionEvent.QUIT_ACCEPTED): State.UPDATE,
    (State.UPDATE, SessionEvent.QUIT_ACCEPTED): State.UPDATE,
}


# The +OK replies that move the session state, by (verb, has-argument): AUTH alone lists
# the mechanisms (docs/protocol-notes.md §2), AUTH with one logs in (RFC 5034 §4).
OK_REPLY_EVENTS: Mapping[tuple[str, bool], SessionEvent] = {
    ("PASS", True): SessionEvent.LOGIN_ACCEPTED,
    ("PASS", False): SessionEvent.LOGIN_ACCEPTED,
    ("APOP", True): SessionEvent.LOGIN_ACCEPTED,
    ("APOP", False): SessionEvent.LOGIN_ACCEPTED,
    ("AUTH", True): SessionEvent.LOGIN_ACCEPTED,
    ("QUIT", True): SessionEvent.QUIT_ACCEPTED,
    ("QUIT", False): SessionEvent.QUIT_ACCEPTED,
}


def next_state(state: State, event: SessionEvent) -> State:
    """The session state after ``event``; ``ObserverError`` if the table has no such row."""
    try:
        return SESSION_TRANSITIONS[state, event]
    except KeyError:
        raise ObserverError(f"no session transition for {event.name} in {state}") from None


# --------------------------------------------------------------------------- read modes


class Mode(enum.StrEnum):
    """How a side's next bytes are read (a StrEnum: its members hash as fast as strings)."""

    GREETING = "greeting"  # the server's first line
    LINES = "lines"  # client commands, or server status lines
    BODY = "body"  # a multi-line body, up to its "." line (RFC 1939 §3)
    TAIL = "tail"  # inside an over-long line whose head was emitted
    TLS_WAIT = "tls-wait"  # after STLS's +OK, before the handshake (RFC 2595 §4)
    OPAQUE = "opaque"  # not interpreted: passthrough TLS, go_opaque
    SCAN = "scan"  # lost sync: lines are only scanned for credentials
    CLOSED = "closed"  # after EOF


class Trigger(enum.StrEnum):
    """What happened, as far as a side's read mode is concerned."""

    GREETING_READ = "greeting-read"  # the server's first line was read
    BODY_OPENED = "body-opened"  # +OK opening a body, or listing lines after a one-line +OK
    BODY_ENDED = "body-ended"  # the "." line, or a close inside the body
    STLS_ACCEPTED = "stls-accepted"  # the server's +OK to STLS
    LINE_OVERLONG = "line-overlong"  # the head of a line with no LF in sight was read
    TAIL_ENDED = "tail-ended"  # the over-long line's LF: back to the mode it interrupted
    PIPELINE_OVERFLOW = "pipeline-overflow"  # more than max_pending commands outstanding
    TLS_DECRYPTED = "tls-decrypted"  # start_tls(decrypted=True)
    TLS_PASSTHROUGH = "tls-passthrough"  # start_tls(decrypted=False)
    OPAQUE_REQUESTED = "opaque-requested"  # go_opaque
    EOF = "eof"  # the side closed


INITIAL_MODE: Mapping[Direction, Mode] = {
    Direction.CLIENT: Mode.LINES,
    Direction.SERVER: Mode.GREETING,
}

MODES: Mapping[Direction, frozenset[Mode]] = {
    Direction.CLIENT: frozenset(Mode) - {Mode.GREETING, Mode.BODY},  # bodies come from servers
    Direction.SERVER: frozenset(Mode),
}

# The modes an over-long line's head can leave a side in, so the modes its tail interrupts;
# TAIL_ENDED resumes that mode.  A server's head can open a body or accept STLS; a pipeline
# overflow while a head is read leaves the side scanning.
INTERRUPTIBLE: Mapping[Direction, frozenset[Mode]] = {
    Direction.CLIENT: frozenset({Mode.LINES, Mode.SCAN}),
    Direction.SERVER: frozenset({Mode.LINES, Mode.SCAN, Mode.BODY, Mode.TLS_WAIT}),
}


def _each(modes: Iterable[Mode], new: Mode | None = None) -> dict[Mode, Mode]:
    """Every mode of ``modes`` goes to ``new``, or keeps its mode when ``new`` is None."""
    return {mode: mode if new is None else new for mode in modes}


def _rows(direction: Direction) -> dict[Trigger, dict[Mode, Mode]]:
    """The transitions of one side: trigger -> {current mode: next mode}."""
    every, open_ = MODES[direction], MODES[direction] - {Mode.CLOSED}
    rows = {
        Trigger.LINE_OVERLONG: _each(INTERRUPTIBLE[direction], Mode.TAIL),
        # Redaction never switches off: from any mode, even after a close (the other side
        # may still be sending commands), both sides go on being scanned line by line.
        Trigger.PIPELINE_OVERFLOW: _each(every, Mode.SCAN),
        # RFC 2595 §4: TLS starts where STLS's +OK (or the connection) left the lines; a
        # side reading anything else (a greeting, a body, a tail) keeps reading it.
        Trigger.TLS_DECRYPTED: {**_each(every), Mode.TLS_WAIT: Mode.LINES},
        Trigger.TLS_PASSTHROUGH: _each(every, Mode.OPAQUE),
        Trigger.OPAQUE_REQUESTED: {**_each(open_, Mode.OPAQUE), Mode.CLOSED: Mode.CLOSED},
        Trigger.EOF: _each(open_, Mode.CLOSED),
    }
    if direction is Direction.CLIENT:
        # RFC 2595 §4: after the server's +OK to STLS the client's next bytes must be its
        # handshake; a client in any other mode keeps it.
        rows[Trigger.STLS_ACCEPTED] = {**_each(every), Mode.LINES: Mode.TLS_WAIT}
    else:
        rows[Trigger.GREETING_READ] = {Mode.GREETING: Mode.LINES}
        rows[Trigger.BODY_OPENED] = {Mode.LINES: Mode.BODY}  # RFC 1939 §3
        rows[Trigger.BODY_ENDED] = {Mode.BODY: Mode.LINES}
        rows[Trigger.STLS_ACCEPTED] = {Mode.LINES: Mode.TLS_WAIT}
    return rows


# direction -> trigger -> {current mode: next mode}; TAIL_ENDED is INTERRUPTIBLE's.
MODE_TRANSITIONS: Mapping[Direction, Mapping[Trigger, Mapping[Mode, Mode]]] = {
    direction: _rows(direction) for direction in Direction
}
# next_mode runs on every mode change: it neither hashes a Direction nor reads an Enum
# member off its class (about 150 ns each in Python 3.11).
_CLIENT, _TAIL, _TAIL_ENDED = Direction.CLIENT, Mode.TAIL, Trigger.TAIL_ENDED
_CLIENT_ROWS, _SERVER_ROWS = MODE_TRANSITIONS[Direction.CLIENT], MODE_TRANSITIONS[Direction.SERVER]
_CLIENT_TAIL, _SERVER_TAIL = INTERRUPTIBLE[Direction.CLIENT], INTERRUPTIBLE[Direction.SERVER]


def next_mode(
    direction: Direction, mode: Mode, trigger: Trigger, interrupted: Mode = Mode.LINES
) -> Mode:
    """The mode ``direction`` reads in after ``trigger``; ``ObserverError`` if impossible.

    ``interrupted``: for ``TAIL_ENDED``, the mode the over-long line interrupted.
    """
    client = direction is _CLIENT
    if trigger is _TAIL_ENDED:
        if mode is _TAIL and interrupted in (_CLIENT_TAIL if client else _SERVER_TAIL):
            return interrupted
    else:
        row = (_CLIENT_ROWS if client else _SERVER_ROWS).get(trigger)
        new = None if row is None else row.get(mode)
        if new is not None:
            return new
    raise ObserverError(f"no {direction} mode transition for {trigger.name} in {mode.name}")
