"""The relay controller: a sans-IO state machine deciding every byte popproxy relays."""

from __future__ import annotations

from popproxy.core.events import BodyChunk, BodyEnd, Direction, Event, Greeting, RawEvent, Reply
from popproxy.core.events import Command as PopCommand
from popproxy.faults.matcher import SessionFaults
from popproxy.proxy.controller import faultcontrol, stls
from popproxy.proxy.controller.faulting import FaultStage
from popproxy.proxy.controller.flows import Flow, Phase, StlsMode, Upgrade, line_head
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
    Tick,
    TlsEstablished,
    TlsFailed,
)

C, S = Direction.CLIENT, Direction.SERVER


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
        self._flows = {C: Flow(), S: Flow()}
        self._open: dict[int, str] = {}  # commands whose reply (and body) has not ended
        self._open_verbs: dict[str, int] = {}  # how many of each verb are open
        self._capa: dict[int, str] = {}  # listings being filtered (seq -> CAPA or AUTH)
        self._capa_line: int | None = None  # where the unfinished CAPA line starts
        self._upgrade: Upgrade | None = None
        self._stls: PopCommand | None = None  # an STLS waiting for a fault's turn before it
        self._greeted = False  # the server's greeting was seen (RFC 1939 §4)
        if upstream_stls:
            self._upgrade = Upgrade(-1, Phase.GREETING)
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
            return faultcontrol.faulted(self, event, stage)
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
            stls.tls_established(self, event.leg)
        elif isinstance(event, TlsFailed):
            stls.tls_failed(self, event.leg, event.reason)
        elif isinstance(event, ObserverFailed):
            self._observer_failed(event.reason)
        elif isinstance(event, Tick):
            self._tick(event.t)

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

    def _forward_now(self, direction: Direction, flow: Flow, data: bytes) -> bool:
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
            head = line_head(flow.head, data)
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
        if direction is C and self._gated():
            # popproxy answers STLS itself: whole placed lines only, an AUTH open or not (a
            # line the observer holds behind an AUTH waits for the server's answer to it,
            # which never needs that line; an STLS among them must not reach the server).
            limit = flow.covered
            if flow.eof and b"\n" not in flow.pending[max(0, limit - flow.decided) :]:
                limit = flow.received  # the client closed: its unfinished last line goes
            return max(flow.decided, limit)
        if flow.eof:
            return flow.received
        if direction is C:
            # SASL responses are held by the observer until the server answers: they cannot
            # be STLS commands and must go on for the server to answer.
            if line_head(flow.head, flow.pending) is None or flow.pending.endswith(b"\n"):
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
        while self._stage is not None and faultcontrol.fault_turn(self):
            self._settle_flows()

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
            flow.head = line_head(flow.head, data)
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
        faultcontrol.flush(self)  # with fault rules: shaped first (popproxy's own bytes among them)
        if leg is Leg.CLIENT and self._stage is not None and self._stage.stalled:
            return False  # a stall: nothing reaches the client any more, popproxy's neither
        if flow.pending:
            # Bytes not placed yet (an unfinished line no command awaits): they would
            # follow popproxy's on the wire but precede them in the record.
            self._drop_to(direction, flow.received, f"{why}: withheld, popproxy's bytes first")
        flow.add_own(len(data))
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
                    stls.capa_chunk(self, event)
            elif isinstance(event, BodyEnd):
                self._finished(event.seq)
                if event.seq in self._capa:
                    del self._capa[event.seq]
                    self._capa_line = None
            elif isinstance(event, Greeting):
                stls.greeting(self, event)
        upgrade = self._upgrade
        if self._local_answer_due():
            self._settle()  # the replies before go first
            if upgrade is not None and self._upgrade is upgrade and upgrade.phase is Phase.LOCAL:
                stls.answer_locally(self)  # (with fault rules, settling may have answered it)
        self._settle()

    def _local_answer_due(self) -> bool:
        """Whether popproxy answers the client's STLS now: every earlier reply is done
        (RFC 2449 §6.6), the greeting included (an STLS sent before it waits for it)."""
        upgrade = self._upgrade
        return (
            upgrade is not None
            and upgrade.phase is Phase.LOCAL
            and self._greeted
            and not any(seq < upgrade.seq for seq in self._open)
        )

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
            and (stage.unmatched or faultcontrol.waits_for_state(self, command))
        ):
            # A rule asks for the protocol state: the command is matched in the state it
            # runs in, once the replies before it are in (RFC 1939 §3), whatever the
            # reads; later commands are matched after it, in order.
            stage.unmatched.append(command)
            return
        faultcontrol.placed(self, command, own)

    def _client_stls(self, command: PopCommand) -> None:
        """The client's STLS (RFC 2595 §4), once every line before it went on."""
        end = command.offset + len(command.raw)
        flow = self._flows[C]
        self._forward_to(C, command.offset)
        if self._gated() and end > flow.decided:
            self._drop_to(C, end, "STLS answered by popproxy")
            self._upgrade = Upgrade(command.seq, Phase.LOCAL)
        else:
            self._forward_to(C, end)
            self._upgrade = Upgrade(command.seq, Phase.AWAIT_REPLY)
        self._out.append(HoldReads(Leg.CLIENT))

    def _reply(self, reply: Reply) -> None:
        if not reply.multiline:
            self._finished(reply.seq)
        upgrade = self._upgrade
        if upgrade is not None and reply.verb == "STLS":
            if upgrade.phase is Phase.AWAIT_REPLY and reply.seq == upgrade.seq:
                stls.stls_reply(self, reply, upgrade)
            elif upgrade.phase is Phase.OWN_REPLY:
                stls.own_stls_reply(self, reply, upgrade)
            return
        if reply.multiline and self._filters(reply.verb):
            self._capa[reply.seq] = reply.verb
            self._capa_line = reply.offset + len(reply.raw)

    # ----------------------------------------------------------------- STLS

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
        faultcontrol.faults_off(self)
        upgrade = self._upgrade
        if upgrade is not None and upgrade.phase is Phase.LOCAL:
            stls.answer_locally(self)
        elif upgrade is not None and upgrade.phase in (
            Phase.AWAIT_REPLY,
            Phase.GREETING,
            Phase.OWN_REPLY,
        ):
            self._upgrade = None
            self._out.append(ResumeReads(Leg.CLIENT))
        self._settle()

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
