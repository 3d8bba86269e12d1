"""Fault rules as typed values, and their canonical text (the grammar of docs/faults.md)."""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

from popproxy.core.events import State

ANY = "*"  # matches every client command
GREETING = "greeting"  # matches the server's greeting (RFC 1939 §4)
FIN, RST = "fin", "rst"
INACTIVITY_REPLY = b"-ERR Disconnected for inactivity.\r\n"
REFUSE_REPLY = b"-ERR Unsupported authentication mechanism.\r\n"

# Option keys, in canonical order: where they go (match or rule) is fixed.
MATCH_OPTIONS = ("nth", "session", "state", "user")
RULE_OPTIONS = ("p", "seed")
OPTIONS = MATCH_OPTIONS + RULE_OPTIONS
_OPTION_LIKE = re.compile(rb"(?:^|\s)(?:" + "|".join(OPTIONS).encode() + rb")=\S*\s*$")


# ------------------------------------------------------------------ durations


@dataclass(frozen=True, slots=True)
class Fixed:
    """Always the same number of seconds."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Uniform:
    """Drawn uniformly between ``low`` and ``high`` seconds."""

    low: float
    high: float


@dataclass(frozen=True, slots=True)
class Exponential:
    """Drawn from an exponential distribution with this mean (seconds)."""

    mean: float


@dataclass(frozen=True, slots=True)
class Normal:
    """Drawn from a normal distribution, clamped at zero."""

    mean: float
    sd: float


Duration = Fixed | Uniform | Exponential | Normal


# ------------------------------------------------------------------ actions


@dataclass(frozen=True, slots=True)
class Answer:
    """popproxy answers instead of the server; the command never reaches it."""

    reply: bytes  # exactly the bytes sent


@dataclass(frozen=True, slots=True)
class Delay:
    """Hold the reply back for a while, from byte ``at`` of it on."""

    duration: Duration
    at: int = 0


@dataclass(frozen=True, slots=True)
class Stall:
    """Send ``at`` bytes of the reply, then nothing ever again (the connection stays open)."""

    at: int = 0


@dataclass(frozen=True, slots=True)
class Cut:
    """Close the connection ``at`` bytes into the reply (0: before it, None: after it)."""

    at: int | None = 0
    how: str = FIN  # FIN (orderly close) or RST (reset)


@dataclass(frozen=True, slots=True)
class Throttle:
    """Send the reply at ``rate`` bytes per second, from byte ``at`` of it on."""

    rate: int
    at: int = 0


class Corruption(enum.Enum):
    """Ways to break a reply's framing (RFC 1939 §3)."""

    BARE_LF = "bare-lf"  # every CRLF becomes LF
    UNSTUFFED = "unstuffed"  # dot-stuffing undone: "..x" is sent as ".x"
    NO_TERMINATOR = "no-terminator"  # the final ".CRLF" is never sent


@dataclass(frozen=True, slots=True)
class Corrupt:
    """Break the reply's framing in one of the ``Corruption`` ways."""

    kind: Corruption


@dataclass(frozen=True, slots=True)
class Inactivity:
    """After the reply, once the client is silent ``after`` seconds: ``reply``, then close."""

    after: float = 0.0
    reply: bytes = INACTIVITY_REPLY


@dataclass(frozen=True, slots=True)
class Idle:
    """After the reply, once the client is silent ``seconds``: close without a word."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Advertise:
    """Add SASL ``mechanism`` to CAPA's reply (RFC 2449 §6.3); refuse ``AUTH`` with it."""

    mechanism: str
    reply: bytes = REFUSE_REPLY


Action = Answer | Delay | Stall | Cut | Throttle | Corrupt | Inactivity | Idle | Advertise


# ------------------------------------------------------------------ rules


@dataclass(frozen=True, slots=True)
class Match:
    """Where a rule applies: a command (or the greeting) and the conditions around it."""

    verb: str  # upper-case keyword, ANY or GREETING
    args: str | None = None  # glob over the argument text (words joined by one space)
    nth: int | None = None  # the nth matching command of the session (1-based)
    session: int | None = None  # the nth connection (1-based)
    state: State | None = None  # RFC 1939 §3 state when the command arrived
    user: str | None = None  # glob over the login user


@dataclass(frozen=True, slots=True)
class Rule:
    """One fault: where it applies, what happens, and how often."""

    match: Match
    action: Action
    p: float | None = None  # probability of firing when it matches
    seed: int | None = None  # makes the draws reproducible

    @property
    def text(self) -> str:
        return format_rule(self)

    def __str__(self) -> str:
        return format_rule(self)


# ------------------------------------------------------------------ canonical text


def format_rule(rule: Rule) -> str:
    """The rule in canonical grammar: ``parse_rule(format_rule(r)) == r``."""
    m = rule.match
    head = m.verb if m.args is None else f"{m.verb} {m.args}"
    opts: list[str] = []
    if m.nth is not None:
        opts.append(f"nth={m.nth}")
    if m.session is not None:
        opts.append(f"session={m.session}")
    if m.state is not None:
        opts.append(f"state={m.state.value}")
    if m.user is not None:
        opts.append(f"user={m.user}")
    if rule.p is not None:
        opts.append(f"p={format_number(rule.p)}")
    if rule.seed is not None:
        opts.append(f"seed={rule.seed}")
    body = format_action(rule.action)
    return f"{head}: {body}" + "".join(f" {o}" for o in opts)


def format_action(action: Action) -> str:
    match action:
        case Answer(reply):
            return format_reply(reply)
        case Delay(duration, at):
            return f"delay {format_duration(duration)}{_at(at)}"
        case Stall(at):
            return f"stall{_at(at)}"
        case Cut(at, how):
            where = "before" if at == 0 else "after" if at is None else f"after {format_size(at)}"
            return f"cut {where}" + (" rst" if how == RST else "")
        case Throttle(rate, at):
            return f"throttle {format_size(rate)}/s{_at(at)}"
        case Corrupt(kind):
            return f"corrupt {kind.value}"
        case Inactivity(after, reply):
            text = "inactivity"
            if after:
                text += f" {format_seconds(after)}"
            if reply != INACTIVITY_REPLY:
                text += f" {format_reply(reply)}"
            return text
        case Idle(seconds):
            return f"idle {format_seconds(seconds)}"
        case Advertise(mechanism, reply):
            text = f"advertise {mechanism}"
            if reply != REFUSE_REPLY:
                text += f" {format_reply(reply)}"
            return text
    raise AssertionError(action)  # pragma: no cover


def _at(at: int) -> str:
    return f" after {format_size(at)}" if at else ""


def format_size(n: int) -> str:
    """A byte count in the largest binary unit that states it exactly."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1024)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def format_duration(d: Duration) -> str:
    match d:
        case Fixed(s):
            return format_seconds(s)
        case Uniform(lo, hi):
            return f"uniform({format_seconds(lo)},{format_seconds(hi)})"
        case Exponential(mean):
            return f"exp({format_seconds(mean)})"
        case Normal(mean, sd):
            return f"normal({format_seconds(mean)},{format_seconds(sd)})"
    raise AssertionError(d)  # pragma: no cover


def format_seconds(seconds: float) -> str:
    """Whole seconds, else milliseconds when exact, else seconds (``repr`` round-trips)."""
    if seconds == int(seconds) and seconds < 1e15:
        return f"{int(seconds)}s"
    ms = seconds * 1000
    if ms == int(ms) and abs(ms) < 1e15 and float(int(ms)) / 1000 == seconds:
        return f"{int(ms)}ms"
    return f"{format_number(seconds)}s"


def format_number(x: float) -> str:
    assert math.isfinite(x)
    return repr(float(x)).removesuffix(".0") if x == int(x) else repr(float(x))


def format_reply(reply: bytes) -> str:
    """A reply bare (one printable line, CRLF implied) when that reads back the same."""
    line = reply[:-2]
    bare = (
        reply.endswith(b"\r\n")
        and line[:1] in (b"+", b"-")
        and all(0x20 <= b < 0x7F for b in line)
        and line == line.strip()
        and _OPTION_LIKE.search(line) is None
        and re.search(rb'(?:^|\s)"', line) is None
    )
    if bare:
        return line.decode("ascii")
    return quote(reply)


_ESCAPES = {0x0D: "\\r", 0x0A: "\\n", 0x09: "\\t", 0x5C: "\\\\", 0x22: '\\"'}


def quote(data: bytes) -> str:
    """A double-quoted string holding exactly ``data`` (escapes ``\\r \\n \\t \\\\ \\" \\xHH``)."""
    out = []
    for b in data:
        if b in _ESCAPES:
            out.append(_ESCAPES[b])
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    return '"' + "".join(out) + '"'
