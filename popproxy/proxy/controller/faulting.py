"""Fault rules as relay-control decisions, at exact protocol positions (docs/faults.md).

The controller decides first (STLS, CAPA filtering, drops); this stage then reshapes what it
decided for the server's replies a rule selected: each ``Forward`` of those bytes goes
through a ``ReplyShaper`` and comes out as forwards, drops (withheld bytes), popproxy's own
bytes, a cut, a stall, or a pause.  A pause is a hold in time: every command after it waits
in order until a ``Tick`` at its end, so nothing overtakes the paused bytes on either leg.
Commands a rule answers itself never reach the server (docs/controller.md, "Faults").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from popproxy.core.events import (
    AuthIdentity,
    BodyEnd,
    Direction,
    Event,
    Greeting,
    RawEvent,
    Reply,
    SaslChallenge,
    State,
    StateChanged,
)
from popproxy.core.events import Command as PopCommand
from popproxy.faults.matcher import Injection, SessionFaults
from popproxy.faults.rules import Advertise, Answer
from popproxy.faults.shape import (
    Close,
    Hang,
    Originate,
    Pause,
    ReplyShaper,
    Step,
    Watch,
    Withhold,
)
from popproxy.faults.shape import Forward as Pass
from popproxy.proxy.controller.io import (
    Cut,
    Drop,
    EndSession,
    Forward,
    HoldReads,
    Leg,
    Note,
    RelayCommand,
    Reserve,
    ResumeReads,
    Send,
)

# How the stage sends bytes of popproxy's own to the client: the controller keeps the
# server stream's offsets (``Controller._own_reply``).
OwnBytes = Callable[[bytes, str, list[RelayCommand]], Send]
S = Direction.SERVER
GREETING_KEY = -1
HOLD_LIMIT = 1 << 20  # bytes waiting behind a pause above which the upstream's reads stop
AFTER_CUT = "after a fault ended the session"
STALLED = "withheld: the server's replies are stalled"


@dataclass(slots=True)
class Answering:
    """A command a rule answers: its bytes are dropped, popproxy's reply takes its turn."""

    seq: int
    offset: int
    length: int
    injection: Injection
    dropped: bool = False

    @property
    def why(self) -> str:
        return f"{self.injection.describe()}: answered by popproxy"


@dataclass(slots=True)
class _Segment:
    """Bytes of the server's stream that belong to a reply under a rule."""

    start: int
    end: int
    key: int
    done: bool  # the reply ends with these bytes
    multiline: bool


@dataclass(slots=True)
class _Open:
    shaper: ReplyShaper
    at: int  # the server-stream offset after the last byte that came out
    fed: deque[tuple[int, int]] = field(default_factory=deque)  # (offset, length) not out yet


@dataclass(frozen=True, slots=True)
class _Wait:
    seconds: float


class FaultStage:
    """One session's fault rules inside the controller: matching, shaping, time."""

    def __init__(self, faults: SessionFaults) -> None:
        self.faults = faults
        self.state = State.AUTHORIZATION
        self.user: str | None = None
        self.armed: dict[int, Injection] = {}  # replies a rule will shape (seq -> fault)
        greeting = faults.greeting()
        if greeting is not None:
            self.armed[GREETING_KEY] = greeting
        self.answers: deque[Answering] = deque()
        # A listing popproxy rewrites (advertise): later client lines wait until it is out.
        self.rewriting: tuple[int, int] | None = None  # (seq, end of its command)
        self.lifted = False  # a wait on the client just ended: its lines may go on
        self.stalled = False
        self.cut = False
        self.watch: Watch | None = None
        self.watch_from = 0.0
        self._open: dict[int, _Open] = {}
        self._segments: deque[_Segment] = deque()
        self._queue: deque[RelayCommand | _Wait] = deque()
        self.resume_at: float | None = None  # a pause holds every command until then
        self._queued = 0
        self._holding = False

    # ----------------------------------------------------------------- what is selected

    @property
    def engaged(self) -> bool:
        """Whether the server's bytes must be placed by the observer before they go on."""
        return bool(
            self.armed or self._open or self.stalled or self.cut or self.resume_at is not None
        )

    def observe(self, event: Event, own: bool) -> None:
        """One observer event (``own``: popproxy's bytes), before the controller acts on it."""
        if isinstance(event, StateChanged):
            self.state = event.new
        elif isinstance(event, AuthIdentity):
            self.user = event.identity or self.user
        elif isinstance(event, RawEvent) and event.direction is S:
            self._place(event, own)

    def command(self, command: PopCommand) -> Answering | None:
        """A client command: arm its rule; an answering rule's command is returned."""
        if command.verb in ("USER", "APOP") and command.args:
            self.user = command.args.split(" ", 1)[0]
        inj = self.faults.command(command.verb, command.args, self.state, self.user)
        if inj is None:
            return None
        if isinstance(inj.action, Answer):
            answering = Answering(command.seq, command.offset, len(command.raw), inj)
            self.answers.append(answering)
            return answering
        self.armed[command.seq] = inj
        if isinstance(inj.action, Advertise) and self.rewriting is None:
            self.rewriting = (command.seq, command.offset + len(command.raw))
        return None

    def client_cap(self, decided: int) -> int | None:
        """How far the client's bytes may go: not past a command popproxy answers, nor
        past one whose reply popproxy rewrites (the server must not answer later commands
        before popproxy's bytes have gone out)."""
        cap = None if self.rewriting is None else self.rewriting[1]
        if self.answers:
            first = self.answers[0]
            at = decided if first.dropped else first.offset
            cap = at if cap is None else min(cap, at)
        return cap

    def _place(self, event: RawEvent, own: bool) -> None:
        key = GREETING_KEY if isinstance(event, Greeting) else getattr(event, "seq", None)
        if not isinstance(key, int) or (key not in self.armed and key not in self._open):
            return
        if own:  # popproxy's own reply (an STLS answer): rules shape only the server's
            self.armed.pop(key, None)
            return
        done = isinstance(event, BodyEnd | Greeting | SaslChallenge) or (
            isinstance(event, Reply) and not event.multiline
        )
        multiline = isinstance(event, Reply) and event.multiline
        end = event.offset + len(event.raw)
        self._segments.append(_Segment(event.offset, end, key, done, multiline))

    # ----------------------------------------------------------------- shaping

    def shape(self, out: list[RelayCommand], t: float, own: OwnBytes) -> list[RelayCommand]:
        """The controller's commands for one input, with the rules applied, in order."""
        result: list[RelayCommand] = []
        for command in out:
            if self.cut:
                if isinstance(command, Forward):
                    n = len(command.data)
                    result.append(Drop(command.direction, command.offset, n, AFTER_CUT))
                elif isinstance(command, Drop | Note):
                    result.append(command)
            elif isinstance(command, Forward) and command.direction is S:
                self._server(command, t, own, result)
            else:
                self._emit(command, result)
        if self._queued > HOLD_LIMIT and not self._holding:
            self._holding = True
            result.append(HoldReads(Leg.UPSTREAM))
        return result

    def _server(
        self, command: Forward, t: float, own: OwnBytes, result: list[RelayCommand]
    ) -> None:
        data, base = command.data, command.offset
        pos, end = base, base + len(data)
        segments = self._segments
        while pos < end:
            seg = segments[0] if segments else None
            if seg is not None and seg.end <= pos:
                segments.popleft()
                continue
            if seg is None or seg.start >= end:
                self._plain(data[pos - base :], pos, result)
                return
            if seg.start > pos:
                self._plain(data[pos - base : seg.start - base], pos, result)
                pos = seg.start
                continue
            stop = min(seg.end, end)
            self._shape(seg, data[pos - base : stop - base], pos, t, own, result)
            if self.cut:
                if stop < end:
                    result.append(Drop(S, stop, end - stop, AFTER_CUT))
                return
            pos = stop

    def _plain(self, data: bytes, at: int, result: list[RelayCommand]) -> None:
        if self.stalled:
            result.append(Drop(S, at, len(data), STALLED))
        elif data:
            self._emit(Forward(S, data, at), result)

    def _shape(
        self,
        seg: _Segment,
        piece: bytes,
        at: int,
        t: float,
        own: OwnBytes,
        result: list[RelayCommand],
    ) -> None:
        entry = self._open.get(seg.key)
        steps: list[Step] = []
        if entry is None:
            inj = self.armed.pop(seg.key)
            shaper = ReplyShaper(inj, multiline=seg.multiline)
            entry = self._open[seg.key] = _Open(shaper, at)
            fields = (("rule", inj.rule.text), ("index", inj.index), ("verb", inj.verb))
            self._emit(Note("fault", inj.describe(), fields), result)
            steps += entry.shaper.begin()
        entry.fed.append((at, len(piece)))
        steps += entry.shaper.feed(piece)
        if seg.done and at + len(piece) == seg.end:
            steps += entry.shaper.finish()
            del self._open[seg.key]
            if isinstance(entry.shaper.action, Advertise):
                steps = _rewritten(steps, entry)
                if self.rewriting is not None and self.rewriting[0] == seg.key:
                    self.rewriting, self.lifted = None, True
        for step in steps:
            self._step(step, entry, t, own, result)
            if self.cut:
                # What was fed and is not out yet never goes: withheld with the rest.
                for offset, length in entry.fed:
                    result.append(Drop(S, offset, length, AFTER_CUT))
                entry.fed.clear()
                return

    def _step(
        self, step: Step, entry: _Open, t: float, own: OwnBytes, result: list[RelayCommand]
    ) -> None:
        if isinstance(step, Pass):
            for offset, data in _take(entry, step.data):
                self._plain(data, offset, result)
        elif isinstance(step, Withhold):
            for offset, data in _take(entry, step.data):
                result.append(Drop(S, offset, len(data), step.why))
        elif isinstance(step, Originate):
            self._emit(own(step.data, step.why, result), result)
        elif isinstance(step, Pause):
            self._pause(step.seconds, t)
        elif isinstance(step, Close):
            self._close(step, entry, result)
        elif isinstance(step, Hang):
            offset = _next_offset(entry)
            self._emit(Note("fault-stall", step.why, (("offset", offset),)), result)
            self.stalled = True
        elif isinstance(step, Watch):
            self.watch, self.watch_from = step, t

    def _close(self, step: Close, entry: _Open, result: list[RelayCommand]) -> None:
        fields = (("how", step.how), ("offset", _next_offset(entry)))
        self._emit(Note("fault-cut", step.why, fields), result)
        cut = Cut.RST if step.how == "rst" else Cut.FIN
        self._emit(EndSession("fault", step.why, cut), result)
        self.cut = True

    # ----------------------------------------------------------------- time

    def _pause(self, seconds: float, t: float) -> None:
        if self.resume_at is None:
            self.resume_at = t + seconds
        else:
            self._queue.append(_Wait(seconds))

    def _emit(self, command: RelayCommand, result: list[RelayCommand]) -> None:
        if self.resume_at is None:
            result.append(command)
            return
        if isinstance(command, Send):
            command = replace(command, reserved=True)
            result.append(Reserve(command))  # in the record where the controller counted it
        self._queue.append(command)
        if isinstance(command, Forward | Send):
            self._queued += len(command.data)

    def release(self, t: float, upgrading: bool) -> list[RelayCommand]:
        """The commands whose pause is over at ``t``, in order."""
        result: list[RelayCommand] = []
        queue = self._queue
        while self.resume_at is not None and t >= self.resume_at:
            base, self.resume_at = self.resume_at, None
            while queue:
                item = queue.popleft()
                if isinstance(item, _Wait):
                    self.resume_at = base + item.seconds  # paced from the plan, not the tick
                    break
                if isinstance(item, Forward | Send):
                    self._queued -= len(item.data)
                result.append(item)
        if self._holding and self._queued <= HOLD_LIMIT // 2 and not upgrading:
            self._holding = False
            result.append(ResumeReads(Leg.UPSTREAM))
        return result

    @property
    def deadline(self) -> float:
        """When the stage wants a ``Tick``: a pause's end, or a fault's idle limit."""
        if self.resume_at is not None:
            return self.resume_at
        if self.watch is not None:
            return self.watch_from + self.watch.seconds
        return float("inf")

    def client_spoke(self, t: float) -> None:
        """The client sent bytes: an armed idle limit is spent."""
        if self.watch is not None and t > self.watch_from:
            self.watch = None

    def watch_fired(self, t: float) -> Watch | None:
        watch = self.watch
        if watch is None or self.resume_at is not None or t < self.watch_from + watch.seconds:
            return None
        self.watch = None
        return watch


def _rewritten(steps: list[Step], entry: _Open) -> list[Step]:
    """A listing with popproxy's bytes inside: the server's listing is withheld whole and
    popproxy sends the listing as the client gets it (the record keeps the wire's order:
    nothing of the server's may follow popproxy's bytes inside one reply)."""
    if not any(isinstance(step, Originate) for step in steps):
        return steps
    withheld = b"".join(step.data for step in steps if isinstance(step, Pass | Withhold))
    sent = b"".join(step.data for step in steps if isinstance(step, Pass | Originate))
    why = next(step.why for step in steps if isinstance(step, Originate))
    return [Withhold(withheld, f"{why}: the listing is re-sent by popproxy"), Originate(sent, why)]


def _take(entry: _Open, data: bytes) -> list[tuple[int, bytes]]:
    """Map a step's bytes back to the stream offsets they were fed at (in order)."""
    out: list[tuple[int, bytes]] = []
    fed, pos = entry.fed, 0
    while pos < len(data) and fed:
        offset, length = fed[0]
        n = min(length, len(data) - pos)
        out.append((offset, data[pos : pos + n]))
        pos += n
        entry.at = offset + n
        if n == length:
            fed.popleft()
        else:
            fed[0] = (offset + n, length - n)
    return out


def _next_offset(entry: _Open) -> int:
    """Where the reply's next unsent byte is in the server's stream."""
    return entry.fed[0][0] if entry.fed else entry.at
