"""Applies one fault to one reply's bytes as they arrive: steps out, sans IO.

Every byte fed comes out exactly once, as ``Forward`` (sent unchanged) or ``Withhold``
(never sent); everything else a step describes is popproxy's own doing (bytes it makes,
pauses, closes).  The fake server and the live proxy execute the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from popproxy.faults.matcher import Injection
from popproxy.faults.rules import (
    Advertise,
    Answer,
    Corrupt,
    Corruption,
    Cut,
    Delay,
    Idle,
    Inactivity,
    Stall,
    Throttle,
)

PACE = 0.05  # a throttled reply goes out in pieces of this many seconds' worth


@dataclass(frozen=True, slots=True)
class Forward:
    """Reply bytes sent on unchanged."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Withhold:
    """Reply bytes popproxy never sends."""

    data: bytes
    why: str


@dataclass(frozen=True, slots=True)
class Originate:
    """Bytes popproxy makes itself and sends in the reply's place."""

    data: bytes
    why: str


@dataclass(frozen=True, slots=True)
class Pause:
    """Send nothing for a while."""

    seconds: float
    why: str


@dataclass(frozen=True, slots=True)
class Close:
    """End the connection: ``fin`` (orderly) or ``rst`` (reset)."""

    how: str
    why: str


@dataclass(frozen=True, slots=True)
class Hang:
    """Never send anything again; keep the connection open."""

    why: str


@dataclass(frozen=True, slots=True)
class Watch:
    """Once the client has been silent ``seconds``: send ``reply`` (if any), then close."""

    seconds: float
    reply: bytes | None
    why: str


Step = Forward | Withhold | Originate | Pause | Close | Hang | Watch


class ReplyShaper:
    """One reply under one fault: ``feed`` its bytes in order, then ``finish``."""

    def __init__(self, injection: Injection, *, multiline: bool) -> None:
        self.injection = injection
        self.action = injection.action
        self.multiline = multiline
        self.why = injection.describe()
        self.pos = 0  # reply bytes fed so far
        self.over = False  # after Close or Hang: everything else is withheld
        self._held = b""  # bytes kept back until the next byte shows what they are
        self._line_start = False  # in a body, at the start of a line
        self._in_body = False
        self._acted = False

    # ----------------------------------------------------------------- API

    def feed(self, data: bytes) -> list[Step]:
        out: list[Step] = []
        if not data:
            return out
        start = self.pos
        self.pos += len(data)
        if self.over:
            return [Withhold(data, self.why)]
        a = self.action
        if isinstance(a, Answer):
            if not self._acted:
                self._acted = True
                out.append(Originate(a.reply, f"{self.why}: answered by popproxy"))
            out.append(Withhold(data, f"{self.why}: reply withheld"))
            return out
        if isinstance(a, Cut | Delay | Stall | Throttle):
            return self._positioned(data, start)
        if isinstance(a, Corrupt):
            return self._corrupt(data)
        if isinstance(a, Advertise):
            self._held += data  # CAPA replies are small: rewritten whole at the end
            return out
        return [Forward(data)]  # Inactivity, Idle: the reply itself passes

    def finish(self) -> list[Step]:
        """The reply is complete (its terminator was fed, if it has one)."""
        out: list[Step] = []
        if self.over:
            return out
        a, held, self._held = self.action, self._held, b""
        if isinstance(a, Answer) and not self._acted:
            self._acted = True
            out.append(Originate(a.reply, f"{self.why}: answered by popproxy"))
        elif isinstance(a, Corrupt):
            if a.kind is Corruption.NO_TERMINATOR:
                out.extend(self._unterminated(held))
            elif held:
                out.append(Forward(held))
        elif isinstance(a, Advertise):
            out.extend(self._advertise(held))
        elif isinstance(a, Cut) and not self._acted:
            out.append(self._close(a, "after the reply"))
        elif isinstance(a, Delay) and not self._acted:
            out.append(Pause(self.injection.seconds or 0.0, f"{self.why}: after the reply"))
        elif isinstance(a, Stall) and not self._acted:
            self.over = True
            out.append(Hang(f"{self.why}: stalled after the reply"))
        elif isinstance(a, Inactivity):
            out.append(Watch(a.after, a.reply, f"{self.why}: inactivity"))
        elif isinstance(a, Idle):
            out.append(Watch(a.seconds, None, f"{self.why}: closed after {a.seconds:g} s idle"))
        return out

    def release(self) -> list[Forward]:
        """The bytes held back so far, unchanged: nothing shapes this reply any more."""
        held, self._held = self._held, b""
        return [Forward(held)] if held else []

    def begin(self) -> list[Step]:
        """Steps due before the first reply byte (a fake server calls this first)."""
        a = self.action
        if isinstance(a, Cut) and a.at == 0:
            self._acted = True
            return [self._close(a, "before the reply")]
        if isinstance(a, Stall) and a.at == 0:
            self._acted, self.over = True, True
            return [Hang(f"{self.why}: stalled before the reply")]
        if isinstance(a, Delay) and a.at == 0:
            self._acted = True
            return [Pause(self.injection.seconds or 0.0, f"{self.why}: before the reply")]
        return []

    # ----------------------------------------------------------------- positions

    def _positioned(self, data: bytes, start: int) -> list[Step]:
        a = self.action
        assert isinstance(a, Cut | Delay | Stall | Throttle)
        out: list[Step] = []
        if not self._acted and a.at is not None and a.at <= start + len(data):
            k = a.at - start  # the fault's position falls in this piece (or at its end)
            if k > 0:
                out.append(Forward(data[:k]))
            data = data[k:]
            self._acted = True
            if isinstance(a, Throttle):
                return out + self._paced(data)
            out.append(self._act_at(a, a.at))
        if not data:
            return out
        if self.over:
            out.append(Withhold(data, f"{self.why}: reply withheld"))
        elif isinstance(a, Throttle) and self._acted:
            out.extend(self._paced(data))
        else:
            out.append(Forward(data))
        return out

    def _act_at(self, a: Cut | Delay | Stall | Throttle, at: int) -> Step:
        where = f"{at} bytes into the reply" if at else "before the reply"
        if isinstance(a, Cut):
            return self._close(a, where)
        if isinstance(a, Stall):
            self.over = True
            return Hang(f"{self.why}: stalled {where}")
        assert isinstance(a, Delay)
        return Pause(self.injection.seconds or 0.0, f"{self.why}: {where}")

    def _close(self, a: Cut, where: str) -> Close:
        self.over = True
        return Close(a.how, f"{self.why}: cut {where} ({a.how.upper()})")

    def _paced(self, data: bytes) -> list[Step]:
        a = self.action
        assert isinstance(a, Throttle)
        piece = max(1, int(a.rate * PACE))
        out: list[Step] = []
        for i in range(0, len(data), piece):
            part = data[i : i + piece]
            out.append(Pause(len(part) / a.rate, f"{self.why}: throttled"))
            out.append(Forward(part))
        return out

    # ----------------------------------------------------------------- corruption

    def _corrupt(self, data: bytes) -> list[Step]:
        a = self.action
        assert isinstance(a, Corrupt)
        data, self._held = self._held + data, b""
        if a.kind is Corruption.BARE_LF:
            return self._bare_lf(data)
        if not self.multiline:
            return [Forward(data)]  # no body: nothing to unstuff or unterminate
        if a.kind is Corruption.NO_TERMINATOR:
            # Keep the last bytes back: at the end they may be the terminator line.
            keep = 3
            if len(data) > keep:
                head, self._held = data[:-keep], data[-keep:]
                self._line_start = head.endswith(b"\n")
                return [Forward(head)]
            self._held = data
            return []
        return self._unstuff(data)

    def _unterminated(self, held: bytes) -> list[Step]:
        term = b".\r\n" if held.endswith(b".\r\n") else b".\n" if held.endswith(b".\n") else b""
        before = held[: len(held) - len(term)]
        at_start = before.endswith(b"\n") if before else self._line_start
        if not term or not at_start:
            return [Forward(held)] if held else []
        out: list[Step] = [Forward(before)] if before else []
        out.append(Withhold(term, f"{self.why}: terminator withheld"))
        return out

    def _bare_lf(self, data: bytes) -> list[Step]:
        out: list[Step] = []
        if data.endswith(b"\r"):
            data, self._held = data[:-1], b"\r"
        prev = 0
        while True:
            cr = data.find(b"\r\n", prev)
            if cr < 0:
                break
            if cr > prev:
                out.append(Forward(data[prev:cr]))
            out.append(Withhold(b"\r", f"{self.why}: CR withheld (bare LF)"))
            prev = cr + 1
        if prev < len(data):
            out.append(Forward(data[prev:]))
        return out

    def _unstuff(self, data: bytes) -> list[Step]:
        """RFC 1939 §3: a body line starting with "." was sent as ".."; undo it."""
        out: list[Step] = []
        i, prev, n = 0, 0, len(data)
        if not self._in_body:
            lf = data.find(b"\n")
            if lf < 0:
                return [Forward(data)]
            self._in_body, self._line_start = True, True
            i = lf + 1
        while i < n:
            if self._line_start and data[i : i + 1] == b".":
                if i + 1 >= n:
                    if i > prev:
                        out.append(Forward(data[prev:i]))
                    self._held = b"."  # the next byte decides
                    return out
                if data[i + 1 : i + 2] == b".":
                    if i > prev:
                        out.append(Forward(data[prev:i]))
                    out.append(Withhold(b".", f"{self.why}: dot-stuffing undone"))
                    prev = i + 1
            lf = data.find(b"\n", i)
            if lf < 0:
                self._line_start = False
                break
            i = lf + 1
            self._line_start = True
        if prev < n:
            out.append(Forward(data[prev:]))
        return out

    # ----------------------------------------------------------------- SASL

    def _advertise(self, reply: bytes) -> list[Step]:
        a = self.action
        assert isinstance(a, Advertise)
        why = f"{self.why}: SASL {a.mechanism} advertised"
        if not (self.multiline and reply.startswith(b"+OK")):
            return [Forward(reply)] if reply else []
        offset = reply.find(b"\n") + 1
        for line in reply[offset:].split(b"\n"):
            words = line.rstrip(b"\r").split()
            if words and words[0].upper() == b"SASL":
                if a.mechanism.encode() in (w.upper() for w in words[1:]):
                    return [Forward(reply)]  # already there: only the refusal is ours
                end = offset + len(line.rstrip(b"\r"))
                insert = b" " + a.mechanism.encode()
                return [Forward(reply[:end]), Originate(insert, why), Forward(reply[end:])]
            offset += len(line) + 1
        dot = reply.rfind(b"\n.", 0, len(reply) - 1)
        cut = dot + 1 if dot >= 0 else len(reply)
        eol = b"\r\n" if reply.endswith(b"\r\n") else b"\n"
        line = b"SASL " + a.mechanism.encode() + eol
        return [Forward(reply[:cut]), Originate(line, why), Forward(reply[cut:])]


def shape_whole(injection: Injection, reply: bytes, *, multiline: bool) -> list[Step]:
    """Every step for a reply known in full (the fake server's case)."""
    shaper = ReplyShaper(injection, multiline=multiline)
    steps = shaper.begin()
    steps += shaper.feed(reply)
    steps += shaper.finish()
    return [s for s in steps if not (isinstance(s, Forward) and not s.data)]
