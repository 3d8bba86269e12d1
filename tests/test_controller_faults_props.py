"""Fault rules in the relay controller, drawn at random: every byte once, the same bytes
whatever the reads, no session wedged (docs/controller.md, "Faults")."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field, replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popproxy.core import Direction, Event, Observer
from popproxy.faults import FaultSet, parse_rule
from popproxy.proxy.controller import (
    Controller,
    DataReceived,
    Drop,
    EndSession,
    EofReceived,
    Forward,
    HoldReads,
    Input,
    Leg,
    Note,
    ObserverFailed,
    Parsed,
    RelayCommand,
    Reserve,
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
HORIZON = 30.0  # a Tick is given for every deadline this close (idle limits are longer)

# ----------------------------------------------------------------------------- the server

BODY = b"Subject: hi\r\n\r\n..dotted\r\n" + b"x" * 70 + b"\r\n.\r\n"
LISTINGS = {
    "LIST": b"+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n",
    "UIDL": b"+OK\r\n1 aaa\r\n2 bbb\r\n.\r\n",
    "CAPA": (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nSTLS\r\n"
        b"SASL PLAIN SCRAM-SHA-256-PLUS\r\nUSER\r\n.\r\n"
    ),
}


@dataclass
class Server:
    """A POP3 server that answers the lines that reach it, in order (RFC 1939)."""

    buf: bytes = b""
    sasl: bool = False
    tls: bool = False
    quit: bool = False

    def receive(self, data: bytes) -> list[bytes]:
        """The replies to the complete lines received so far."""
        self.buf += data
        out = []
        while b"\n" in self.buf and not self.quit:
            line, self.buf = self.buf.split(b"\n", 1)
            out.append(self.answer(line.rstrip(b"\r")))
        return out

    def answer(self, line: bytes) -> bytes:
        if self.sasl:
            self.sasl = False
            return b"-ERR cancelled\r\n" if line == b"*" else b"+OK logged in\r\n"
        words = line.split()
        verb = words[0].upper().decode() if words else ""
        args = words[1:]
        if verb in ("LIST", "UIDL") and args:
            return b"+OK " + args[0] + b" 120\r\n"
        if verb in LISTINGS:
            return LISTINGS[verb]
        if verb in ("RETR", "TOP"):
            return b"+OK 120 octets\r\n" + BODY
        if verb == "AUTH":
            if not args:
                return b"+OK\r\nPLAIN\r\nSCRAM-SHA-256-PLUS\r\n.\r\n"
            if args[0].upper() != b"PLAIN":
                return b"-ERR unknown mechanism\r\n"
            if len(args) > 1:
                return b"+OK logged in\r\n"
            self.sasl = True
            return b"+ \r\n"
        if verb == "STLS":
            if self.tls:
                return b"-ERR TLS already active\r\n"
            self.tls = True
            return b"+OK Begin TLS negotiation now.\r\n"
        if verb == "QUIT":
            self.quit = True
            return b"+OK bye\r\n"
        if verb in ("USER", "PASS", "APOP", "STAT", "NOOP", "DELE", "RSET"):
            return b"+OK 2 320\r\n" if verb == "STAT" else b"+OK\r\n"
        return b"-ERR unknown command\r\n"


# ----------------------------------------------------------------------------- the pump


@dataclass
class World:
    """What happens around the controller, drawn: where reads split, how much time each
    read takes, when the observer fails, when the server hangs up."""

    cuts: list[int] = field(default_factory=list)
    pace: float = 0.001  # seconds each read takes
    fail_at: int | None = None  # the observer fails at this read
    server_replies: int | None = None  # the server closes after this many replies
    eof_early: bool = False  # the client closes right after its last lines
    early_data: bool = False  # the client's first lines come before the greeting
    tls_fails: Leg | None = None  # the first handshake on this leg fails
    gulp: bool = False  # a read takes every byte waiting (a slow reader: replies coalesce)


@dataclass
class Sim:
    """The pump's part around one controller: reads (held when asked), the observer fed
    in the record's order (popproxy's bytes where they are reserved), handshakes, the
    watchdog's ticks, and a server that answers what reaches it."""

    ctl: Controller
    world: World
    obs: Observer = field(default_factory=Observer)
    server: Server = field(default_factory=Server)
    out: list[RelayCommand] = field(default_factory=list)
    inbox: dict[Leg, deque[bytes | None]] = field(
        default_factory=lambda: {Leg.CLIENT: deque(), Leg.UPSTREAM: deque()}
    )
    held: dict[Leg, bool] = field(default_factory=lambda: {Leg.CLIENT: False, Leg.UPSTREAM: False})
    queue: deque[tuple[Direction, bytes]] = field(default_factory=deque)
    handshakes: list[Leg] = field(default_factory=list)
    received: dict[Direction, int] = field(default_factory=lambda: {C: 0, S: 0})
    served: int = 0  # bytes of the server's input already answered
    replies: int = 0
    reads: int = 0
    broken: bool = False
    t: float = 0.0

    def feed(self, event: Input) -> None:
        if self.ctl.ended is not None:
            return
        commands = self.ctl.handle(event)
        self.out.extend(commands)
        for command in commands:
            if isinstance(command, Send) and not command.reserved:
                self.queue.append((command.leg.other.sender, command.data))
            elif isinstance(command, Reserve):
                self.queue.append((command.send.leg.other.sender, command.send.data))
            elif isinstance(command, HoldReads):
                self.held[command.leg] = True
            elif isinstance(command, ResumeReads):
                self.held[command.leg] = False
            elif isinstance(command, StartTls):
                self.handshakes.append(command.leg)
            elif isinstance(command, TlsFact):
                self.drain()
                self.parsed(self.obs.start_tls(command.direction, decrypted=command.decrypted))
            elif isinstance(command, EndSession):
                return
        self.drain()

    def parsed(self, events: list[Event]) -> None:
        if not self.broken:
            self.feed(Parsed(tuple(events)))

    def drain(self) -> None:
        while self.queue:
            direction, data = self.queue.popleft()
            self.parsed(self.obs.receive_data(direction, data))

    def split(self, data: bytes) -> list[bytes]:
        bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in self.world.cuts)})
        return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]

    def step(self, horizon: float) -> bool:
        """One thing the world does next; whether anything happened."""
        if self.ctl.ended is not None:
            return False
        if self.world.gulp and self.answer():
            return True  # a slow reader: the server has answered before the proxy reads
        for leg in (Leg.CLIENT, Leg.UPSTREAM):
            inbox = self.inbox[leg]
            if inbox and not self.held[leg]:
                data = inbox.popleft()
                while self.world.gulp and data is not None and inbox:
                    more = inbox[0]
                    if more is None:
                        break
                    data += more
                    inbox.popleft()
                self.read(leg, data)
                return True
        if self.handshakes:
            leg = self.handshakes.pop(0)
            self.drain()
            if leg is self.world.tls_fails:
                self.world = replace(self.world, tls_fails=None)
                self.feed(TlsFailed(leg, "bad certificate"))
                return True
            self.parsed(self.obs.start_tls(leg.sender))
            self.feed(TlsEstablished(leg))
            return True
        if self.answer():
            return True
        deadline = self.ctl.deadline
        if deadline <= self.t + horizon:
            self.t = max(self.t, deadline)
            self.feed(Tick(self.t))
            return True
        return False

    def answer(self) -> bool:
        """The server answers what reached it; whether it had anything to answer."""
        sent = to_server(self.out)
        if len(sent) <= self.served or self.server.quit:
            return False
        self.serve(sent[self.served :])
        self.served = len(sent)
        return True

    def serve(self, data: bytes) -> None:
        limit = self.world.server_replies
        for line in self.server.receive(data):
            if limit is not None and self.replies >= limit:
                self.server.quit = True  # it hangs up without a word
                break
            self.replies += 1
            self.inbox[Leg.UPSTREAM].extend(self.split(line))
        if self.server.quit:
            self.inbox[Leg.UPSTREAM].append(None)

    def read(self, leg: Leg, data: bytes | None) -> None:
        direction = leg.sender
        self.reads += 1
        if self.reads == self.world.fail_at and not self.broken:
            self.broken = True
            self.feed(ObserverFailed("boom"))
        self.t += self.world.pace
        if self.ctl.deadline <= self.t:
            self.feed(Tick(self.t))  # the watchdog runs between reads
        if data is None:
            self.queue.append((direction, b""))
            self.feed(EofReceived(direction, self.t))
            return
        self.received[direction] += len(data)
        self.queue.append((direction, data))  # for the observer, in arrival order
        self.feed(DataReceived(direction, data, self.t))

    def settle(self, horizon: float = HORIZON) -> None:
        for _ in range(20_000):
            if not self.step(horizon):
                return
        raise AssertionError("the session never settles")


def to_client(out: list[RelayCommand]) -> bytes:
    return b"".join(
        c.data
        for c in out
        if (isinstance(c, Forward) and c.direction is S)
        or (isinstance(c, Send) and c.leg is Leg.CLIENT)
    )


def to_server(out: list[RelayCommand]) -> bytes:
    return b"".join(
        c.data
        for c in out
        if (isinstance(c, Forward) and c.direction is C)
        or (isinstance(c, Send) and c.leg is Leg.UPSTREAM)
    )


# ----------------------------------------------------------------------------- draws

COMMANDS = [
    b"USER joe",
    b"PASS secret",
    b"STAT",
    b"LIST",
    b"LIST 1",
    b"UIDL",
    b"RETR 1",
    b"RETR 2",
    b"TOP 1 0",
    b"NOOP",
    b"DELE 1",
    b"CAPA",
    b"AUTH",
    b"AUTH PLAIN\r\nAGpvZQBzZWNyZXQ=",
    b"AUTH PLAIN AGpvZQBzZWNyZXQ=",
    b"AUTH XOAUTH2 dG9rZW4=",
    b"AUTH X-UNKNOWN",
    b"STLS",
    b"QUIT",
]
ACTIONS = [
    "-ERR [IN-USE] locked",
    "+OK fine",
    '"+OK\\r\\n1 100\\n.\\r\\n"',
    '"-ERR\\r\\n"',
    "delay 1ms",
    "delay 2s after 5",
    "delay uniform(1ms,3s)",
    "stall",
    "stall after 30",
    "cut",
    "cut after",
    "cut after 20",
    "cut after 9 rst",
    "throttle 1KiB/s",
    "throttle 2KiB/s after 10",
    "corrupt bare-lf",
    "corrupt unstuffed",
    "corrupt no-terminator",
    "inactivity 100s",
    "idle 100s",
    "advertise XOAUTH2",
]
OPTIONS = ["", " nth=1", " nth=2", " p=0.5 seed=3", " state=TRANSACTION"]


def _batch(lines: list[bytes]) -> bytes:
    """Pipelined lines; nothing after an STLS (RFC 2595 §4: the client's next bytes are
    its TLS handshake, and bytes read with the STLS are injected, whatever the reads)."""
    if b"STLS" in lines:
        lines = lines[: lines.index(b"STLS") + 1]
    return b"".join(line + b"\r\n" for line in lines)


BATCHES = st.lists(
    st.lists(st.sampled_from(COMMANDS), min_size=1, max_size=4).map(_batch),
    min_size=1,
    max_size=5,
)


@st.composite
def rules(draw: st.DrawFn, batches: list[bytes]) -> str:
    """A rule, mostly on a command the session sends."""
    sent = sorted({line.split()[0].decode() for b in batches for line in b.splitlines()})
    sent = [verb for verb in sent if verb.isalpha() and verb.isupper()]
    match = draw(st.sampled_from([*sent, "greeting", "*", "RETR 1", "LIST 1", "TOP * 0"]))
    action = draw(st.sampled_from(ACTIONS))
    option = draw(st.sampled_from(OPTIONS))
    if action.startswith("advertise"):
        match = "CAPA"
    if match == "greeting" and option in (" nth=1", " nth=2", " state=TRANSACTION"):
        option = ""
    return f"{match}: {action}{option}"


@dataclass(frozen=True)
class Mode:
    stls: StlsMode = StlsMode.INTERCEPT
    client_tls: bool = False
    upstream_tls: bool = False
    upstream_stls: bool = False
    hide_plus: bool = False


MODES = st.builds(
    lambda stls, client_tls, upstream, hide_plus: Mode(
        stls, client_tls, upstream == "tls", upstream == "stls", hide_plus
    ),
    st.sampled_from(list(StlsMode)),
    st.booleans(),
    st.sampled_from(["plain", "tls", "stls"]),
    st.booleans(),
)
WORLDS = st.builds(
    World,
    cuts=st.lists(st.integers(1, 400), max_size=6),
    pace=st.sampled_from([0.001, 0.3, 1.1]),
    fail_at=st.none() | st.integers(1, 40),
    server_replies=st.none() | st.integers(0, 12),
    eof_early=st.booleans(),
    early_data=st.booleans(),
    tls_fails=st.sampled_from([None, None, Leg.CLIENT, Leg.UPSTREAM]),
    gulp=st.booleans(),
)


@dataclass
class Outcome:
    sim: Sim
    to_client: bytes
    to_server: bytes


def session(batches: list[bytes], rule_texts: list[str], mode: Mode, world: World) -> Outcome:
    faults = FaultSet([parse_rule(r) for r in rule_texts], seed=5).session(1)
    ctl = Controller(
        mode.stls,
        client_tls=mode.client_tls,
        upstream_tls=mode.upstream_tls,
        upstream_stls=mode.upstream_stls,
        hide_plus=mode.hide_plus,
        faults=faults,
    )
    sim = Sim(ctl, world)
    for command in ctl.start():
        sim.out.append(command)
        if isinstance(command, HoldReads):
            sim.held[command.leg] = True
    if world.early_data:
        sim.inbox[Leg.CLIENT].extend(sim.split(batches[0]))
    sim.inbox[Leg.UPSTREAM].extend(sim.split(b"+OK POP3 ready <1.2@x>\r\n"))
    sim.settle()
    for i, batch in enumerate(batches):
        if i or not world.early_data:
            sim.inbox[Leg.CLIENT].extend(sim.split(batch))
        if world.eof_early and batch is batches[-1]:
            sim.inbox[Leg.CLIENT].append(None)
        sim.settle()
    if not world.eof_early:
        sim.inbox[Leg.CLIENT].append(None)
    sim.settle(horizon=200.0)  # idle limits (100 s) fire now, the idle timeout (600 s) not
    return Outcome(sim, to_client(sim.out), to_server(sim.out))


# ----------------------------------------------------------------------------- checks


def assert_each_byte_once(sim: Sim, direction: Direction) -> None:
    """Forwarded, dropped or popproxy's own: each byte of the stream exactly once, and
    (unless the session ended) up to every byte received."""
    spans = [
        (c.offset, c.offset + len(c.data))
        for c in sim.out
        if isinstance(c, Forward) and c.direction is direction and c.data
    ]
    spans += [
        (c.offset, c.offset + c.length)
        for c in sim.out
        if isinstance(c, Drop) and c.direction is direction and c.length
    ]
    spans += sim.ctl.own_spans(direction)
    pos = 0
    for lo, hi in sorted(spans):
        assert lo == pos, (direction, lo, pos, sorted(spans))
        pos = hi
    own = sum(hi - lo for lo, hi in sim.ctl.own_spans(direction))
    total = sim.received[direction] + own
    if sim.ctl.ended is None:
        assert pos + sim.ctl.pending(direction) == total, (direction, pos, total)
    else:
        assert pos <= total


def assert_wire_order(sim: Sim) -> None:
    """What the client gets goes out in stream order, popproxy's bytes where the record
    has them: the record (the s stream minus its drops) is what was on the wire."""
    own = iter(sim.ctl.own_spans(S))
    last = -1
    for c in sim.out:
        if isinstance(c, Forward) and c.direction is S and c.data:
            at = c.offset
        elif isinstance(c, Reserve) and c.send.leg is Leg.CLIENT:
            lo, hi = next(own)
            assert hi - lo == len(c.send.data), (lo, hi, c)
            continue  # its place is taken now; the bytes go with its Send
        elif isinstance(c, Send) and c.leg is Leg.CLIENT and not c.reserved:
            at, hi = next(own)
            assert hi - at == len(c.data), (at, hi, c)
        else:
            continue
        assert at > last, (at, last)
        last = at


def assert_silent_after_a_stall(sim: Sim) -> None:
    """After a stall nothing more reaches the client (docs/faults.md: "nothing is sent,
    ever"), but what was decided before it and waited behind a pause."""
    stall = next((c for c in sim.out if isinstance(c, Note) and c.kind == "fault-stall"), None)
    if stall is None:
        return
    at = dict(stall.fields)["offset"]
    assert isinstance(at, int)
    after = sim.out[sim.out.index(stall) :]
    reserved = [c.send for c in sim.out[: sim.out.index(stall)] if isinstance(c, Reserve)]
    for c in after:
        if isinstance(c, Forward) and c.direction is S:
            assert c.offset + len(c.data) <= at, (c, at)
        elif isinstance(c, Send) and c.leg is Leg.CLIENT:
            assert c.reserved and any(r.data == c.data for r in reserved), c


def assert_not_wedged(sim: Sim) -> None:
    """After every input and every Tick nothing waits, unless a stall, a cut, or a
    server that hung up explains it."""
    ctl = sim.ctl
    stage = ctl._stage
    ended = ctl.ended
    if ended is not None and ended.how not in ("server-closed", "client-closed"):
        return  # a cut, a refusal, an idle limit: the rest is never read
    if stage is not None and stage.stalled:
        return
    assert ctl.pending(S) == 0, ctl.pending(S)
    if stage is not None:
        assert stage.resume_at is None and not stage._queue
    if not sim.server.quit:  # lines after a QUIT wait for replies that never come
        assert ended is not None or not any(sim.inbox.values()), (sim.inbox, sim.held)
        assert ctl.pending(C) == 0, ctl.pending(C)
        assert stage is None or not stage.answers, stage.answers


def kinds(outcome: Outcome) -> list[str]:
    """The notes' kinds up to a cut (what follows it in the same read is never relayed)."""
    out = [c.kind for c in outcome.sim.out if isinstance(c, Note)]
    return out[: out.index("fault-cut") + 1] if "fault-cut" in out else out


def check(outcome: Outcome) -> None:
    sim = outcome.sim
    assert_each_byte_once(sim, S)
    assert_each_byte_once(sim, C)
    assert_wire_order(sim)
    assert_silent_after_a_stall(sim)
    assert_not_wedged(sim)


@st.composite
def sessions(draw: st.DrawFn) -> tuple[list[bytes], list[str], Mode, World]:
    batches = draw(BATCHES)
    rule_texts = draw(st.lists(rules(batches), min_size=1, max_size=3))
    return batches, rule_texts, draw(MODES), draw(WORLDS)


@given(sessions())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_drawn_sessions_keep_every_byte_once_whatever_the_reads(
    drawn: tuple[list[bytes], list[str], Mode, World],
) -> None:
    batches, rule_texts, mode, world = drawn
    split = session(batches, rule_texts, mode, world)
    check(split)
    whole = session(batches, rule_texts, mode, replace(world, cuts=[]))
    check(whole)
    if "observer-error" in kinds(split) + kinds(whole):
        return  # once relay control is off, what it had decided before depends on the reads
    assert split.to_client == whole.to_client
    assert split.to_server == whole.to_server
    assert kinds(split) == kinds(whole)
