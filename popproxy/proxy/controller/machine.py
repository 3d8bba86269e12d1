"""The relay controller: a sans-IO state machine that decides every byte popproxy relays.

docs/controller.md describes its inputs, its commands and the guarantees they carry.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from popproxy.core.events import BodyChunk, BodyEnd, Direction, Event, Greeting, RawEvent, Reply
from popproxy.core.events import Command as PopCommand
from popproxy.faults.matcher import SessionFaults
from popproxy.proxy.controller.faulting import FaultStage
from popproxy.proxy.controller.io import (
    Cut,
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
    Tick,
    TlsEstablished,
    TlsFact,
    TlsFailed,
)

C, S = Direction.CLIENT, Direction.SERVER
STLS_OK = b"+OK Begin TLS negotiation now.\r\n"
STRIP_ERR = b"-ERR STLS not available.\r\n"
ACTIVE_ERR = b"-ERR TLS is already active.\r\n"
OWN_STLS = b"STLS\r\n"
# RFC 2449 §5: one capability per line; STLS (RFC 2595 §4) takes no arguments.
_STLS_CAPABILITY = re.compile(rb"(?i)stls[ \t]*\r?\n")
# RFC 5034 §6: "SASL" and its mechanism names; RFC 5802 §4: "-PLUS" names channel binding.
_SASL_CAPABILITY = re.compile(rb"(?i)sasl[ \t]")
_PLUS_WORD = re.compile(rb"(?i)[ \t]+[A-Z0-9_-]+-PLUS(?=[ \t\r\n])")
_PLUS_LINE = re.compile(rb"(?i)[A-Z0-9_-]+-PLUS[ \t]*\r?\n")
STLS_WHY = "STLS capability hidden by popproxy"
PLUS_WHY = "-PLUS mechanism hidden by popproxy (--hide-plus)"


def _line_head(head: bytes | None, data: bytes | bytearray) -> bytes | None:
    """The start of the line left unfinished after ``data`` (``head``: before it), upper
    case and without leading blanks, or None once that line cannot be an STLS command."""
    newline = data.rfind(b"\n")
    if newline >= 0:
        head, rest = b"", bytes(data[newline + 1 :])
    elif head is None:
        return None
    else:
        rest = bytes(data[:8])
    head = (head + rest if head else rest.lstrip(b" \t"))[:5].upper()
    if head[:4] != b"STLS"[: len(head[:4])] or (len(head) == 5 and head[4:] not in b" \t\r"):
        return None
    return head


class StlsMode(enum.Enum):
    """What popproxy does when the client sends STLS (RFC 2595 §4) to a plaintext upstream."""

    INTERCEPT = "intercept"  # TLS on both legs, popproxy in the middle (decrypted)
    PASSTHROUGH = "passthrough"  # client and server do TLS end to end (opaque)
    STRIP = "strip"  # popproxy refuses STLS and hides it from CAPA


class Phase(enum.Enum):
    """Where an STLS upgrade stands; every phase but ``LOCAL`` holds the client's bytes."""

    GREETING = "greeting"  # --upstream-stls: waiting for the server's greeting
    OWN_REPLY = "own-reply"  # --upstream-stls: waiting for the reply to popproxy's STLS
    AWAIT_REPLY = "await-reply"  # the client's STLS went to the server: its reply decides
    LOCAL = "local"  # popproxy answers the client's STLS once earlier replies are done
    UPSTREAM_HANDSHAKE = "upstream-handshake"
    CLIENT_HANDSHAKE = "client-handshake"


@dataclass(slots=True)
class _Upgrade:
    seq: int
    phase: Phase
    ok_offset: int = 0  # the server's +OK, held back until the upstream leg is TLS
    ok_line: bytes = b""


@dataclass(slots=True)
class _Flow:
    """One direction's stream as the controller sees it (popproxy's own bytes included)."""

    received: int = 0  # stream offset of the next byte
    decided: int = 0  # every byte below was forwarded, sent or dropped
    pending: bytearray = field(default_factory=bytearray)  # bytes [decided, received)
    head: bytes | None = b""  # the unfinished line's start, while it may still be STLS
    covered: int = 0  # the observer has accounted for every byte below
    own: list[tuple[int, int]] = field(default_factory=list)  # spans popproxy sent
    eof: bool = False
    eof_forwarded: bool = False


class Controller:
    """Decides, for every byte either peer sends, whether it is forwarded, held or dropped,
    and what popproxy sends itself; ``handle`` takes one input and returns the commands."""

    def __init__(
        self,
        stls: StlsMode = StlsMode.INTERCEPT,
        *,
        client_tls: bool = False,
        upstream_tls: bool = False,
        upstream_stls: bool = False,
        hide_plus: bool = False,
        idle_timeout: float = 600.0,
        linger: float = 5.0,
        answer_timeout: float = 10.0,
        faults: SessionFaults | None = None,
        t: float = 0.0,
    ) -> None:
        self.stls = stls
        self.hide_plus = hide_plus  # SASL -PLUS mechanisms hidden from the client
        self.tls = {Leg.CLIENT: client_tls, Leg.UPSTREAM: upstream_tls}
        self.idle_timeout = idle_timeout
        self.linger = linger
        self.answer_timeout = answer_timeout  # for the upstream's answers to popproxy itself
        self.ended: EndSession | None = None
        self._flows = {C: _Flow(), S: _Flow()}
        self._open: dict[int, str] = {}  # commands whose reply (and body) has not ended
        self._open_verbs: dict[str, int] = {}  # how many of each verb are open
        self._capa: dict[int, str] = {}  # listings being filtered (seq -> CAPA or AUTH)
        self._capa_line: int | None = None  # where the unfinished CAPA line starts
        self._upgrade: _Upgrade | None = None
        self._stls: PopCommand | None = None  # an STLS waiting for a fault's turn before it
        self._greeted = False  # the server's greeting was seen (RFC 1939 §4)
        if upstream_stls:
            self._upgrade = _Upgrade(-1, Phase.GREETING)
        self._transparent = False
        self._last = t
        self._out: list[RelayCommand] = []
        self._shaped: list[RelayCommand] = []  # with faults: ``_out`` as the rules shaped it
        self._t = t  # the time of the input being handled
        # Fault rules (docs/faults.md): client lines wait to be placed by the observer, so
        # a rule knows every command before the server (or popproxy) answers it.
        self._stage = FaultStage(faults) if faults is not None and faults.faults else None

    # ----------------------------------------------------------------- public API

    def handle(self, event: Input) -> list[RelayCommand]:
        """Take one input; return the commands it causes, to be executed in order."""
        out: list[RelayCommand] = []
        self._out = out
        stage = self._stage
        if self.ended is not None:
            return out
        if stage is not None:
            return self._faulted(event, stage)
        self._dispatch(event)
        return out

    def _dispatch(self, event: Input) -> None:
        if isinstance(event, DataReceived):
            self._data(event)
        elif isinstance(event, Parsed):
            self._parsed(event.events)
        elif isinstance(event, EofReceived):
            self._last = event.t
            self._flows[event.direction].eof = True
            if event.direction is S and self._awaiting_own():
                self._refuse("upstream-error", "upstream closed before answering STLS")
                return
            self._settle()
        elif isinstance(event, TlsEstablished):
            self._tls_established(event.leg)
        elif isinstance(event, TlsFailed):
            self._tls_failed(event.leg, event.reason)
        elif isinstance(event, ObserverFailed):
            self._observer_failed(event.reason)
        elif isinstance(event, Tick):
            self._tick(event.t)

    def _faulted(self, event: Input, stage: FaultStage) -> list[RelayCommand]:
        """``handle`` with fault rules: the controller decides, the rules reshape."""
        t = self._t = getattr(event, "t", self._last)
        self._shaped = []
        released: list[RelayCommand] = []
        if isinstance(event, Tick):
            released = stage.release(t, self._upgrade is not None)
            if released:
                self._last = t  # idle and linger count from when held bytes went on
            watch = stage.watch_fired(t)
            if watch is not None:
                self._out.append(Note("fault-close", watch.why))
                if watch.reply:
                    self._send(Leg.CLIENT, watch.reply, watch.why)
                self._end("fault", watch.why)
        elif isinstance(event, DataReceived) and event.direction is C:
            stage.client_spoke(t)
        if self.ended is None:
            self._dispatch(event)
        self._flush()
        if stage.lifted and self.ended is None:
            stage.lifted = False  # a rewritten listing went out: the client's lines follow
            self._settle()
            self._flush()
        shaped = self._shaped
        for command in (*released, *shaped):
            if isinstance(command, EndSession):
                self.ended = command
                return [*released, *shaped]  # what follows a session's end never happens
        if self.ended is not None and stage.resume_at is not None:
            self.ended = None  # the end waits behind a pause: it takes effect when released
        return [*released, *shaped]

    def _flush(self) -> None:
        """With fault rules: shape what was decided so far.  Before popproxy sends bytes
        of its own, so that those the rules make (a rewritten listing, an answered
        greeting) take their place in the server stream in the order they go out."""
        stage = self._stage
        if stage is not None and self._out:
            out, self._out = self._out, []
            self._shaped += stage.shape(out, self._t, self._own_reply)

    def _own_reply(self, data: bytes, why: str, result: list[RelayCommand]) -> Send:
        """A fault's bytes of popproxy's own to the client, at the server stream's end
        (server bytes still undecided there are withheld: they would follow on the wire
        but precede in the record)."""
        flow = self._flows[S]
        if flow.pending:
            result.append(Drop(S, flow.decided, len(flow.pending), f"{why}: withheld"))
            flow.pending.clear()
            flow.decided = flow.received
        flow.own.append((flow.received, flow.received + len(data)))
        assert self._stage is not None
        self._stage.replaced.append(flow.own[-1])
        flow.received += len(data)
        flow.decided = flow.received
        return Send(Leg.CLIENT, data, why)

    def start(self) -> list[RelayCommand]:
        """The commands before the first read (--upstream-stls holds the client's bytes)."""
        if self._upgrade is not None:
            return [HoldReads(Leg.CLIENT)]
        return []

    @property
    def deadline(self) -> float:
        """When the controller wants a ``Tick``: idle timeout, linger after an EOF, or a
        fault's pause or idle limit (while a pause holds commands, only its end)."""
        stage = self._stage
        if stage is None:
            return self._relay_deadline()
        if stage.resume_at is not None:
            return stage.resume_at
        return min(stage.deadline, self._relay_deadline())

    def _relay_deadline(self) -> float:
        flows = self._flows
        if self._awaiting_own():
            return self._last + self.answer_timeout
        limit = self.linger if flows[C].eof or flows[S].eof else self.idle_timeout
        return self._last + limit

    @property
    def phase(self) -> Phase | None:
        return None if self._upgrade is None else self._upgrade.phase

    def pending(self, direction: Direction) -> int:
        """Bytes of ``direction`` received and not yet decided about."""
        return len(self._flows[direction].pending)

    def own_spans(self, direction: Direction) -> list[tuple[int, int]]:
        """Spans (start, end) of ``direction``'s stream that popproxy sent itself."""
        return list(self._flows[direction].own)

    # ----------------------------------------------------------------- data

    def _data(self, event: DataReceived) -> None:
        direction, data = event.direction, event.data
        self._last = event.t
        flow = self._flows[direction]
        flow.received += len(data)
        if not flow.pending and self._forward_now(direction, flow, data):
            # The common case: no decision is pending, the bytes go on before parsing.
            flow.decided = flow.received
            self._out.append(Forward(direction, data, flow.received - len(data)))
            return
        flow.pending += data
        if self._transparent:
            self._settle()
        # The rest waits for the observer's events (the next ``Parsed``).

    def _forward_now(self, direction: Direction, flow: _Flow, data: bytes) -> bool:
        """Whether bytes may be forwarded before the observer has seen them."""
        if self._transparent:
            return True
        if self._blocked(direction):
            return False
        if self._stage is not None and (direction is C or self._stage.engaged):
            return False  # a rule may select these bytes: they are placed first
        if direction is C:
            # Only a chunk that may hold an STLS line waits for its events; an unfinished
            # line that may become STLS ("ST", then "LS\r\n") is never forwarded early.
            if self._gated() or b"STLS" in data.upper():
                return False
            head = _line_head(flow.head, data)
            if head is not None and not data.endswith(b"\n"):
                return False
            flow.head = head
            return True
        return not self._awaiting_server() and not self._filter_pending()

    def _gated(self) -> bool:
        """Whether popproxy answers STLS itself: client lines wait until classified."""
        return self.stls is StlsMode.STRIP or self.tls[Leg.CLIENT] or self.tls[Leg.UPSTREAM]

    def _hiding(self) -> bool:
        """Whether STLS is hidden from CAPA: the client must not (or cannot) use it here."""
        return self.stls is StlsMode.STRIP or (self.tls[Leg.CLIENT] and not self.tls[Leg.UPSTREAM])

    def _awaiting_server(self) -> bool:
        """Whether a server reply under way decides the bytes after it (an STLS reply)."""
        upgrade = self._upgrade
        return upgrade is not None and upgrade.phase in (
            Phase.GREETING,
            Phase.OWN_REPLY,
            Phase.AWAIT_REPLY,
        )

    def _awaiting_own(self) -> bool:
        """Whether the upstream owes popproxy itself an answer (--upstream-stls)."""
        upgrade = self._upgrade
        return upgrade is not None and upgrade.phase in (Phase.GREETING, Phase.OWN_REPLY)

    def _filters(self, verb: str) -> bool:
        """Whether a listing of ``verb`` is filtered: STLS hidden from CAPA, or -PLUS
        mechanisms hidden from CAPA's SASL line and a bare AUTH listing."""
        if verb == "CAPA":
            return self._hiding() or self.hide_plus
        return verb == "AUTH" and self.hide_plus

    def _filter_pending(self) -> bool:
        """A filtered listing is open, or its command awaits a reply: parse server bytes
        before relaying them."""
        if self._capa:
            return True
        verbs = self._open_verbs
        return (verbs.get("CAPA", 0) > 0 and self._filters("CAPA")) or (
            verbs.get("AUTH", 0) > 0 and self.hide_plus
        )

    def _blocked(self, direction: Direction) -> bool:
        upgrade = self._upgrade
        if upgrade is None:
            return False
        if direction is C:
            return True  # after STLS the client's next bytes are a ClientHello, or injected
        return upgrade.phase in (Phase.UPSTREAM_HANDSHAKE, Phase.CLIENT_HANDSHAKE)

    def _limit(self, direction: Direction) -> int:
        """How far ``direction``'s pending bytes may be forwarded now."""
        flow = self._flows[direction]
        if self._blocked(direction):
            return flow.decided
        if self._transparent:
            return flow.received
        stage = self._stage
        if stage is not None and direction is C:
            # Faults: whole placed lines only, and never past a command popproxy answers.
            cap = stage.client_cap(flow.decided)
            for waiting in (self._stls, stage.unmatched[0] if stage.unmatched else None):
                if waiting is not None:  # a command waits for its turn: nothing after it
                    cap = waiting.offset if cap is None else min(cap, waiting.offset)
            limit = flow.covered
            if flow.eof and b"\n" not in flow.pending[max(0, limit - flow.decided) :]:
                # The client closed: its unfinished last line goes as it is.  Complete
                # lines still wait to be placed (behind an AUTH, a line may be STLS).
                limit = flow.received
            return max(flow.decided, limit if cap is None else min(limit, cap))
        if flow.eof:
            return flow.received
        if direction is C:
            if self._gated() and not self._open_verbs.get("AUTH", 0):
                return max(flow.decided, flow.covered)
            # SASL responses are held by the observer until the server answers: they cannot
            # be STLS commands and must go on for the server to answer.
            if _line_head(flow.head, flow.pending) is None or flow.pending.endswith(b"\n"):
                return flow.received
            return flow.decided + flow.pending.rfind(b"\n") + 1
        limit = flow.received
        if self._capa_line is not None:
            # A listing being filtered: never past its unfinished line, even while an STLS
            # pipelined after it awaits its reply (the line may be a -PLUS name).
            limit = self._capa_line
        elif (
            self._awaiting_server()
            or self._filter_pending()
            or (stage is not None and stage.engaged)
        ):
            limit = flow.covered
        return max(flow.decided, min(limit, flow.received))

    def _settle(self) -> None:
        self._settle_flows()
        while self._stage is not None and self._fault_turn():
            self._settle_flows()

    def _fault_turn(self) -> bool:
        """Take the next step that waited for a fault's turn; whether one was taken."""
        stage = self._stage
        assert stage is not None
        if stage.answers and self._answer():
            return True
        unmatched = stage.unmatched
        if unmatched and not self._waits_for_state(unmatched[0]):
            self._placed(unmatched.popleft(), own=False)
            return True
        stls = self._stls
        if stls is not None and not stage.before(stls.seq):
            self._stls = None  # the lines before it are through: its turn
            self._client_stls(stls)
            return True
        upgrade = self._upgrade
        if (
            upgrade is not None
            and upgrade.phase is Phase.LOCAL
            and self._greeted  # an STLS sent before the greeting: the greeting goes first
            and not any(seq < upgrade.seq for seq in self._open)
        ):
            self._answer_locally()  # an STLS that waited its turn: no event may come now
            return True
        return False

    def _answer(self) -> bool:
        """Take the next step for the first command a rule answers; whether one was taken.

        Its bytes are dropped once everything before them went on; popproxy's reply goes
        out once the server has answered every command before it (RFC 2449 §6.6).
        """
        stage = self._stage
        assert stage is not None
        first = stage.answers[0]
        if not first.dropped:
            if self._flows[C].decided < first.offset:
                return False
            first.dropped = True
            self._drop_to(C, first.offset + first.length, first.why)
            inj = first.injection
            fields = (("rule", inj.rule.text), ("index", inj.index), ("verb", inj.verb))
            self._out.append(Note("fault", first.why, fields))
        if not self._greeted or any(seq < first.seq for seq in self._open):
            return False  # a command sent before the greeting: the greeting goes first
        stage.answers.popleft()
        self._finished(first.seq)
        reply = first.injection.action.reply  # type: ignore[union-attr]
        if self._send(Leg.CLIENT, reply, first.why):
            stage.answered.append((first, *self._flows[S].own[-1]))
        if not stage.answers and self._upgrade is None and self._stls is None:
            self._out.append(ResumeReads(Leg.CLIENT))
        return True

    def _settle_flows(self) -> None:
        for direction in (S, C):
            flow = self._flows[direction]
            if flow.pending:
                self._forward_to(direction, self._limit(direction))
            if (
                flow.eof
                and not flow.pending
                and not flow.eof_forwarded
                and not self._blocked(direction)
            ):
                flow.eof_forwarded = True
                self._out.append(ForwardEof(direction))

    def _forward_to(self, direction: Direction, offset: int) -> None:
        flow = self._flows[direction]
        n = offset - flow.decided
        if n <= 0:
            return
        data = bytes(flow.pending[:n])
        del flow.pending[:n]
        start, flow.decided = flow.decided, offset
        if direction is C:
            flow.head = _line_head(flow.head, data)
        self._out.append(Forward(direction, data, start))

    def _drop_to(self, direction: Direction, offset: int, why: str) -> None:
        flow = self._flows[direction]
        n = offset - flow.decided
        if n <= 0:
            return
        del flow.pending[:n]
        self._out.append(Drop(direction, flow.decided, n, why))
        flow.decided = offset
        flow.head = b""

    def _send(self, leg: Leg, data: bytes, why: str) -> bool:
        """popproxy's own bytes to ``leg``: they join the stream its peer receives (unless
        a fault stalled the client's side: whether they were sent)."""
        direction = S if leg is Leg.CLIENT else C
        flow = self._flows[direction]
        # What may go on goes first, so the record's order is the wire's (held bytes are
        # never pending here: their leg's reads were held before they could arrive).
        self._forward_to(direction, self._limit(direction))
        self._flush()  # with fault rules: shaped first (popproxy's own bytes among them)
        if leg is Leg.CLIENT and self._stage is not None and self._stage.stalled:
            return False  # a stall: nothing reaches the client any more, popproxy's neither
        if flow.pending:
            # Bytes not placed yet (an unfinished line no command awaits): they would
            # follow popproxy's on the wire but precede them in the record.
            self._drop_to(direction, flow.received, f"{why}: withheld, popproxy's bytes first")
        flow.own.append((flow.received, flow.received + len(data)))
        flow.received += len(data)
        flow.decided = flow.received
        self._out.append(Send(leg, data, why))
        return True

    def _is_own(self, direction: Direction, offset: int) -> bool:
        return any(lo <= offset < hi for lo, hi in self._flows[direction].own)

    # ----------------------------------------------------------------- events

    def _parsed(self, events: tuple[Event, ...]) -> None:
        flows = self._flows
        if self._transparent:
            self._settle()  # relay control is off: events decide nothing any more
            return
        stage = self._stage
        for event in events:
            if isinstance(event, RawEvent):
                end = event.offset + len(event.raw)
                flow = flows[event.direction]
                if end > flow.covered:
                    flow.covered = end
                why = None if stage is None or event.direction is C else stage.out_of_step(event)
                if why is not None:
                    # popproxy's bytes did not read as the turn they took (a bare +OK to
                    # LIST, a listing taken for a pipelined command's reply): from here on
                    # the server's replies cannot be paired with commands.
                    self._observer_failed(why)
                    break
            if stage is not None:
                own = isinstance(event, RawEvent) and self._is_own(event.direction, event.offset)
                stage.observe(event, own)
            if isinstance(event, PopCommand):
                self._command(event)
            elif isinstance(event, Reply):
                self._reply(event)
            elif isinstance(event, BodyChunk):
                if event.seq in self._capa:
                    self._capa_chunk(event)
            elif isinstance(event, BodyEnd):
                self._finished(event.seq)
                if event.seq in self._capa:
                    del self._capa[event.seq]
                    self._capa_line = None
            elif isinstance(event, Greeting):
                self._greeting(event)
        upgrade = self._upgrade
        if (
            upgrade is not None
            and upgrade.phase is Phase.LOCAL
            and self._greeted  # an STLS sent before the greeting: the greeting goes first
            and not any(seq < upgrade.seq for seq in self._open)
        ):
            self._settle()  # the replies before go first
            if self._upgrade is upgrade and upgrade.phase is Phase.LOCAL:
                self._answer_locally()  # (with fault rules, settling may have answered it)
        self._settle()

    def _finished(self, seq: int) -> None:
        verb = self._open.pop(seq, None)
        if verb is not None:
            self._open_verbs[verb] -= 1

    def _command(self, command: PopCommand) -> None:
        self._open[command.seq] = command.verb
        self._open_verbs[command.verb] = self._open_verbs.get(command.verb, 0) + 1
        own = self._is_own(C, command.offset)
        stage = self._stage
        if (
            stage is not None
            and not own
            and not self._transparent
            and (stage.unmatched or self._waits_for_state(command))
        ):
            # A rule asks for the protocol state: the command is matched in the state it
            # runs in, once the replies before it are in (RFC 1939 §3), whatever the
            # reads; later commands are matched after it, in order.
            stage.unmatched.append(command)
            return
        self._placed(command, own)

    def _waits_for_state(self, command: PopCommand) -> bool:
        """Whether a rule on ``command``'s verb asks for the protocol state while a reply
        before it has not ended, or has not been read yet (popproxy's, just sent)."""
        stage = self._stage
        assert stage is not None
        if not stage.stateful(command.verb):
            return False
        seq = command.seq
        answered = any(a.seq < seq for a, _, _ in stage.answered)
        return answered or any(earlier < seq for earlier in self._open)

    def _placed(self, command: PopCommand, own: bool) -> None:
        """A client command in its turn: matched against the rules, STLS acted on."""
        stage = self._stage
        if stage is not None and not own and not self._transparent:
            answering = stage.command(command)
            if answering is not None:
                if len(stage.answers) == 1:
                    self._out.append(HoldReads(Leg.CLIENT))  # bounded: later lines wait
                return  # never reaches the server, whatever it is (STLS included)
        if command.verb != "STLS" or own:
            return
        if self._upgrade is not None or self._stls is not None:
            return  # a second STLS while one is under way: its bytes are held anyway
        if stage is not None and stage.before(command.seq):
            # A line before it waits for popproxy's answer (or a rewritten listing): the
            # STLS takes effect once they are through, never past them.
            self._stls = command
            return
        self._client_stls(command)

    def _client_stls(self, command: PopCommand) -> None:
        """The client's STLS (RFC 2595 §4), once every line before it went on."""
        end = command.offset + len(command.raw)
        flow = self._flows[C]
        self._forward_to(C, command.offset)
        if self._gated() and end > flow.decided:
            self._drop_to(C, end, "STLS answered by popproxy")
            self._upgrade = _Upgrade(command.seq, Phase.LOCAL)
        else:
            self._forward_to(C, end)
            self._upgrade = _Upgrade(command.seq, Phase.AWAIT_REPLY)
        self._out.append(HoldReads(Leg.CLIENT))

    def _reply(self, reply: Reply) -> None:
        if not reply.multiline:
            self._finished(reply.seq)
        upgrade = self._upgrade
        if upgrade is not None and reply.verb == "STLS":
            if upgrade.phase is Phase.AWAIT_REPLY and reply.seq == upgrade.seq:
                self._stls_reply(reply, upgrade)
            elif upgrade.phase is Phase.OWN_REPLY:
                self._own_stls_reply(reply, upgrade)
            return
        if reply.multiline and self._filters(reply.verb):
            self._capa[reply.seq] = reply.verb
            self._capa_line = reply.offset + len(reply.raw)

    def _capa_chunk(self, chunk: BodyChunk) -> None:
        """Filter a listing line by line; an unfinished line waits for its end."""
        flow = self._flows[S]
        verb = self._capa[chunk.seq]
        line = self._capa_line if self._capa_line is not None else chunk.offset
        end = chunk.offset + len(chunk.raw)
        while True:
            lo = line - flow.decided
            newline = flow.pending.find(b"\n", lo, end - flow.decided)
            if newline < 0:
                break
            stop = flow.decided + newline + 1
            self._filter_line(verb, line, lo, newline + 1)
            line = stop
        self._capa_line = line

    def _filter_line(self, verb: str, line: int, lo: int, hi: int) -> None:
        """One complete listing line at stream offset ``line`` (``pending[lo:hi]``)."""
        pending = self._flows[S].pending
        stop = line + hi - lo
        if verb == "CAPA" and self._hiding() and _STLS_CAPABILITY.fullmatch(pending, lo, hi):
            self._forward_to(S, line)
            self._drop_to(S, stop, STLS_WHY)
            self._out.append(Note("strip", "STLS hidden from CAPA"))
        elif not self.hide_plus:
            return
        elif verb == "CAPA" and _SASL_CAPABILITY.match(pending, lo, hi):
            words = [(m.start(), m.end()) for m in _PLUS_WORD.finditer(pending, lo, hi)]
            for start, finish in words:  # each name with the blank before it
                self._forward_to(S, line + start - lo)
                self._drop_to(S, line + finish - lo, PLUS_WHY)
            if words:
                self._out.append(Note("hide-plus", "-PLUS mechanisms hidden (--hide-plus)"))
        elif verb == "AUTH" and _PLUS_LINE.fullmatch(pending, lo, hi):
            self._forward_to(S, line)
            self._drop_to(S, stop, PLUS_WHY)
            self._out.append(Note("hide-plus", "-PLUS mechanisms hidden (--hide-plus)"))

    def _greeting(self, greeting: Greeting) -> None:
        self._greeted = True
        upgrade = self._upgrade
        if upgrade is None or upgrade.phase is not Phase.GREETING:
            return
        self._forward_to(S, greeting.offset + len(greeting.raw))
        upgrade.phase = Phase.OWN_REPLY
        self._send(Leg.UPSTREAM, OWN_STLS, "popproxy upgrades the upstream leg (--upstream-stls)")

    # ----------------------------------------------------------------- STLS

    def _stls_reply(self, reply: Reply, upgrade: _Upgrade) -> None:
        server, client = self._flows[S], self._flows[C]
        self._forward_to(S, reply.offset)
        end = reply.offset + len(reply.raw)
        if reply.status != "+OK":
            self._upgrade = None  # the session goes on in plaintext
            self._out.append(ResumeReads(Leg.CLIENT))
            return
        if self.stls is not StlsMode.INTERCEPT and self.stls is not StlsMode.PASSTHROUGH:
            self._end("proxy-error", "an STLS reached the server unanswered by popproxy")
            return
        if self.stls is StlsMode.PASSTHROUGH:
            self._forward_to(S, end)
        else:
            upgrade.ok_offset, upgrade.ok_line = reply.offset, bytes(reply.raw)
            del server.pending[: len(reply.raw)]
            server.decided = end
        if self.stls is StlsMode.INTERCEPT:
            upgrade.phase = Phase.UPSTREAM_HANDSHAKE
            self._out.append(HoldReads(Leg.UPSTREAM))
            self._out.append(StartTls(Leg.UPSTREAM, "stls"))
        # RFC 2595 §4: nothing sent after STLS (client) or its +OK (server) before the
        # handshake belongs to the TLS session: such bytes are injected, never forwarded.
        self._drop_to(S, server.received, "plaintext after STLS +OK")
        self._drop_to(C, client.received, "plaintext after STLS")
        if self.stls is StlsMode.PASSTHROUGH:
            self._out.append(TlsFact(S, decrypted=False, mode="passthrough"))
            self._out.append(TlsFact(C, decrypted=False, mode="passthrough"))
            self._transparent = True
            self._upgrade = None
            self._out.append(ResumeReads(Leg.CLIENT))

    def _own_stls_reply(self, reply: Reply, upgrade: _Upgrade) -> None:
        self._forward_to(S, reply.offset)
        end = reply.offset + len(reply.raw)
        self._drop_to(S, end, "reply to popproxy's own STLS")
        if reply.status != "+OK":
            self._refuse("upstream-tls-error", "upstream refused STLS")
            return
        upgrade.phase = Phase.UPSTREAM_HANDSHAKE
        self._out.append(HoldReads(Leg.UPSTREAM))
        self._out.append(StartTls(Leg.UPSTREAM, "stls"))
        self._drop_to(S, self._flows[S].received, "plaintext after STLS +OK")

    def _answer_locally(self) -> None:
        """Answer the client's STLS: RFC 2449 §6.6, only after every earlier reply."""
        upgrade = self._upgrade
        assert upgrade is not None
        if self.tls[Leg.CLIENT]:
            self._send(Leg.CLIENT, ACTIVE_ERR, "TLS is already active on the client leg")
        elif self.stls is StlsMode.STRIP:
            self._out.append(Note("strip", "STLS refused by popproxy (strip mode)"))
            self._send(Leg.CLIENT, STRIP_ERR, "strip mode: popproxy refuses STLS")
        else:
            # The upstream leg is TLS already: upgrade only the client leg.
            self._send(Leg.CLIENT, STLS_OK, "the upstream leg is TLS already")
            upgrade.phase = Phase.CLIENT_HANDSHAKE
            self._out.append(StartTls(Leg.CLIENT, "stls"))
            self._drop_to(C, self._flows[C].received, "plaintext after STLS")
            return
        self._upgrade = None
        self._out.append(ResumeReads(Leg.CLIENT))

    def _tls_established(self, leg: Leg) -> None:
        self.tls[leg] = True
        upgrade = self._upgrade
        if upgrade is None:
            return
        # Plaintext read from the leg before its handshake began is injected (RFC 2595 §4).
        why = "plaintext after STLS" if leg is Leg.CLIENT else "plaintext after STLS +OK"
        self._drop_to(leg.sender, self._flows[leg.sender].received, why)
        if leg is Leg.UPSTREAM and upgrade.phase is Phase.UPSTREAM_HANDSHAKE:
            if upgrade.seq < 0:  # --upstream-stls: the client leg stays as it is
                self._out.append(TlsFact(C, decrypted=True, mode="unchanged"))
                self._upgrade = None
                self._out.append(ResumeReads(Leg.UPSTREAM))
                self._out.append(ResumeReads(Leg.CLIENT))
                self._settle()
                return
            self._out.append(Forward(S, upgrade.ok_line, upgrade.ok_offset))
            upgrade.phase = Phase.CLIENT_HANDSHAKE
            self._out.append(StartTls(Leg.CLIENT, "stls"))
        elif leg is Leg.CLIENT and upgrade.phase is Phase.CLIENT_HANDSHAKE:
            if not upgrade.ok_line:  # answered by popproxy: the upstream leg was TLS already
                self._out.append(TlsFact(S, decrypted=True, mode="already-tls"))
            self._upgrade = None
            self._out.append(ResumeReads(Leg.UPSTREAM))
            self._out.append(ResumeReads(Leg.CLIENT))
            self._settle()

    def _tls_failed(self, leg: Leg, reason: str) -> None:
        if leg is Leg.CLIENT:
            self._end("client-tls-error", f"TLS handshake with the client failed: {reason}")
            return
        upgrade = self._upgrade
        if upgrade is not None and upgrade.ok_line:
            # The client never saw the server's +OK: it gets popproxy's answer instead.
            self._out.append(
                Drop(S, upgrade.ok_offset, len(upgrade.ok_line), "upstream TLS failed")
            )
        # Never relay mail from an upstream whose certificate failed verification.
        self._refuse("upstream-tls-error", f"TLS with upstream failed: {reason}")

    def _refuse(self, how: str, reason: str) -> None:
        line = f"-ERR [SYS/TEMP] popproxy: {reason}\r\n".encode()
        self._send(Leg.CLIENT, line, reason)
        self._end(how, reason)

    def _end(self, how: str, error: str | None, cut: Cut = Cut.FIN) -> None:
        self.ended = EndSession(how, error, cut)
        self._out.append(self.ended)

    def _observer_failed(self, reason: str) -> None:
        """No more events: relay the rest unchanged rather than stall (never alter bytes)."""
        self._out.append(Note("observer-error", f"relay control off: {reason}"))
        self._transparent = True
        self._faults_off()
        upgrade = self._upgrade
        if upgrade is not None and upgrade.phase is Phase.LOCAL:
            self._answer_locally()
        elif upgrade is not None and upgrade.phase in (
            Phase.AWAIT_REPLY,
            Phase.GREETING,
            Phase.OWN_REPLY,
        ):
            self._upgrade = None
            self._out.append(ResumeReads(Leg.CLIENT))
        self._settle()

    def _faults_off(self) -> None:
        """Relay control goes off: nothing may wait any more for events that will not come.
        Bytes a rule held back go on unchanged.  popproxy's answers whose turn has come go
        now; one still waiting for earlier replies is given up (sent later it could land
        inside a reply of the server's: its command, withheld, gets no reply); a command
        not withheld yet goes on to the server unchanged, with every line after it, and
        an STLS waiting behind them goes on as a plain line."""
        stage = self._stage
        if stage is None:
            return
        self._flush()
        self._shaped += stage.let_go()
        self._stls = None
        while stage.answers and stage.answers[0].dropped and self._answer():
            pass
        stage.answers.clear()
        if self._upgrade is None:
            self._out.append(ResumeReads(Leg.CLIENT))  # held for an answer, an STLS, ...

    def _tick(self, t: float) -> None:
        if t < self._relay_deadline():
            return
        flows = self._flows
        if self._awaiting_own():
            self._refuse("upstream-error", "upstream did not answer")
        elif flows[S].eof:
            self._end("server-closed", None)
        elif flows[C].eof:
            self._end("client-closed", None)
        else:
            limit = self.idle_timeout
            self._end("idle-timeout", f"no traffic for {limit:g} s")
