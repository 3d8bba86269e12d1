"""Fault rules as relay-control decisions, at exact protocol positions (docs/faults.md)."""

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
    Unsolicited,
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
    """One session's fault rules inside the controller: matching, shaping, time.

    The controller decides first (STLS, CAPA filtering, drops); the stage then reshapes
    what it decided for the server's replies a rule selected: each ``Forward`` of those
    bytes goes through a ``ReplyShaper`` and comes out as forwards, drops (withheld
    bytes), popproxy's own bytes, a cut, a stall, or a pause.  A pause is a hold in time:
    every command after it waits in order until a ``Tick`` at its end, so nothing
    overtakes the paused bytes on either leg.  Commands a rule answers never reach the
    server (docs/controller.md, "Faults").
    """

    def __init__(self, faults: SessionFaults) -> None:
        self.faults = faults
        self.state = State.AUTHORIZATION
        self.user: str | None = None
        self.armed: dict[int, Injection] = {}  # replies a rule will shape (seq -> fault)
        greeting = faults.greeting()
        if greeting is not None:
            self.armed[GREETING_KEY] = greeting
        self.answers: deque[Answering] = deque()
        # Commands placed but not matched yet: a rule on their verb asks for the protocol
        # state, which the replies before them decide (and those after wait, in order).
        self.unmatched: deque[PopCommand] = deque()
        # popproxy's answers sent and not yet read back by the observer: (its command, the
        # answer's span in the server stream).
        self.answered: deque[tuple[Answering, int, int]] = deque()
        # Spans of popproxy's bytes sent in place of the server's, not read back yet.
        self.replaced: deque[tuple[int, int]] = deque()
        # Listings popproxy rewrites (advertise), in order: later client lines wait until
        # each is out (a second CAPA pipelined behind the first waits its turn as well).
        self.rewriting: deque[tuple[int, int]] = deque()  # (seq, end of its command)
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

    def stateful(self, verb: str) -> bool:
        """Whether a rule that may select ``verb`` has a ``state=`` condition."""
        return any(c.rule.match.state for c in self.faults.faults.candidates(verb.upper()))

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
        if isinstance(inj.action, Advertise):
            self.rewriting.append((command.seq, command.offset + len(command.raw)))
        return None

    def client_cap(self, decided: int) -> int | None:
        """How far the client's bytes may go: not past a command popproxy answers, nor
        past one whose reply popproxy rewrites (the server must not answer later commands
        before popproxy's bytes have gone out), nor at all while popproxy's greeting has
        not replaced the server's (replies to early commands would follow it in the
        record but precede popproxy's on the wire)."""
        if self._greeting_answered():
            return decided
        cap = self.rewriting[0][1] if self.rewriting else None
        if self.answers:
            first = self.answers[0]
            at = decided if first.dropped else first.offset
            cap = at if cap is None else min(cap, at)
        return cap

    def before(self, seq: int) -> bool:
        """Whether a command before ``seq`` still waits for popproxy's answer, or for the
        listing popproxy rewrites, or popproxy's greeting is not out yet: the client's
        lines from ``seq`` on wait behind it."""
        rewriting = bool(self.rewriting) and self.rewriting[0][0] < seq
        answers = any(answer.seq < seq for answer in self.answers)
        return rewriting or answers or self._greeting_answered()

    def _greeting_answered(self) -> bool:
        """Whether popproxy's greeting is to replace the server's and is not out yet."""
        entry = self._open.get(GREETING_KEY)
        greeting = self.armed.get(GREETING_KEY) if entry is None else entry.shaper.injection
        return greeting is not None and isinstance(greeting.action, Answer)

    def out_of_step(self, event: RawEvent) -> str | None:
        """Why the observer, at this server-stream event, no longer pairs replies with
        commands as the server does, if it does not: each of popproxy's answers must read
        as one whole reply to its command, and popproxy's bytes in place of the server's
        (a rewritten listing, a greeting) as no command's (the server's, withheld, took
        that turn)."""
        end = event.offset + len(event.raw)
        replaced = self.replaced
        while replaced and event.offset >= replaced[0][1]:
            replaced.popleft()
        if replaced and end > replaced[0][0]:
            if event_seq(event) is not None or end > replaced[0][1]:
                return "popproxy's bytes in place of the server's read as a command's reply"
            if end == replaced[0][1]:
                replaced.popleft()
        if not self.answered:
            return None
        answering, lo, hi = self.answered[0]
        if end <= lo:
            return None  # before the answer
        stray = isinstance(event, Unsolicited)  # a line after it, paired with nothing
        whole = (
            stray
            or isinstance(event, BodyEnd | SaslChallenge)
            or (isinstance(event, Reply) and not event.multiline)
        )
        if (
            event.offset >= hi  # past its end, its reply unfinished
            or end > hi  # running on past it
            or not (stray or event_seq(event) == answering.seq)  # another command's
            or (end == hi and not whole)  # a bare +OK to LIST: the server's bytes its body
        ):
            return f"{answering.why}: not one whole reply to its command"
        if end == hi:
            self.answered.popleft()
        return None

    def _place(self, event: RawEvent, own: bool) -> None:
        key = GREETING_KEY if isinstance(event, Greeting) else getattr(event, "seq", None)
        if not isinstance(key, int) or (key not in self.armed and key not in self._open):
            return
        if own:  # popproxy's own reply (an STLS answer): rules shape only the server's
            self.armed.pop(key, None)
            # No listing of the server's will be rewritten for it: the client's lines after
            # it must not wait for one.
            self.rewriting = deque(r for r in self.rewriting if r[0] != key)
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
            inj = self.armed.pop(seg.key, None)
            if inj is None:
                # Its reply ended already: the observer, resynchronising, read on into a
                # body it had not expected.  The rule shaped the reply it applied to.
                self._plain(piece, at, result)
                return
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
            if seg.key == GREETING_KEY:
                self.lifted = True  # early client lines may follow the greeting now
            if isinstance(entry.shaper.action, Advertise):
                steps = _rewritten(steps, entry)
                if self.rewriting and self.rewriting[0][0] == seg.key:
                    self.rewriting.popleft()
                    self.lifted = True
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
            if not self.stalled:  # after a stall nothing reaches the client
                self._emit(own(step.data, step.why, result), result)
        elif isinstance(step, Pause):
            self._pause(step.seconds, t)
        elif isinstance(step, Close):
            self._close(step, entry, result)
        elif isinstance(step, Hang):
            offset = _next_offset(entry)
            self._emit(Note("fault-stall", step.why, (("offset", offset),)), result)
            self.stalled, self.watch = True, None  # the connection stays open: no idle close
        elif isinstance(step, Watch) and not self.stalled:
            self.watch, self.watch_from = step, t

    def _close(self, step: Close, entry: _Open, result: list[RelayCommand]) -> None:
        fields = (("how", step.how), ("offset", _next_offset(entry)))
        self._emit(Note("fault-cut", step.why, fields), result)
        cut = Cut.RST if step.how == "rst" else Cut.FIN
        self._emit(EndSession("fault", step.why, cut), result)
        self.cut = True

    def let_go(self) -> list[RelayCommand]:
        """Relay control is off: no rule shapes anything any more, and the bytes a rule
        held back until the next byte showed what they were go on unchanged (a pause, a
        stall or a cut already under way stays)."""
        result: list[RelayCommand] = []
        for entry in self._open.values():
            for held in entry.shaper.release():
                for offset, data in _take(entry, held.data):
                    self._plain(data, offset, result)
        self._open.clear()
        self._segments.clear()
        self.armed.clear()
        self.rewriting.clear()
        self.answered.clear()
        self.replaced.clear()
        self.unmatched.clear()
        self.watch = None
        return result

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


def event_seq(event: Event) -> int | None:
    """The command an event belongs to, if any."""
    seq = getattr(event, "seq", None)
    return seq if isinstance(seq, int) else None


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
