"""Fault injection in the fake server (``popproxy serve``, the pytest plugin): runs the steps."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from popproxy.core.events import State
from popproxy.core.observer import ML_ON_OK, ML_ON_OK_IF_NO_ARG
from popproxy.faults.matcher import Injection, SessionFaults
from popproxy.faults.rules import Answer
from popproxy.faults.shape import (
    Close,
    Forward,
    Hang,
    Originate,
    Pause,
    Step,
    Watch,
    Withhold,
    shape_whole,
)
from popproxy.netutil import STREAM_ERRORS, abort_on_close

Note = Callable[[str], None]


class Send(Protocol):
    """Sends bytes to the client: the server's, or (``why`` given) popproxy's own."""

    def __call__(self, data: bytes, why: str | None = None, /) -> Awaitable[None]: ...


class Ledger(Protocol):
    """Where a served session's capture notes what a fault did (replay/served.py): what
    was withheld, what popproxy answered, where it cut, stalled or closed."""

    def fault(self, injection: Injection, detail: str) -> None: ...

    def withheld(self, data: bytes, why: str) -> None: ...

    def answered(self, why: str) -> None: ...

    def cut(self, how: str, why: str) -> None: ...

    def stalled(self, why: str) -> None: ...

    def closed(self, why: str) -> None: ...

    def received(self, data: bytes) -> None: ...


class FaultEnded(Exception):
    """A fault ended the session (a cut, an inactivity close); ``how`` says which."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


@dataclass
class Watching:
    """An armed idle timer: the next wait for a client line is at most ``seconds``."""

    seconds: float
    reply: bytes | None
    why: str


class FakeFaults:
    """One fake-server connection's faults: the matcher, the protocol state, the executor."""

    def __init__(self, faults: SessionFaults, note: Note, identity: str | None = None) -> None:
        self.faults = faults
        self.note = note
        self.state = State.AUTHORIZATION
        self.user: str | None = None
        self.identity = identity  # the recording's SASL identity, for user= on AUTH
        self.watching: Watching | None = None
        self.log: list[str] = []  # one line per injected fault and what it did
        self.ledger: Ledger | None = None  # the served session's capture, when one is kept

    def greeting(self) -> Injection | None:
        return self.faults.greeting()

    def command(self, verb: str, args: str | None) -> Injection | None:
        """The fault for this command (state and user as before it)."""
        if verb in ("USER", "APOP") and args:
            self.user = args.split(" ")[0]
        elif verb == "AUTH" and self.identity:
            self.user = self.identity
        return self.faults.command(verb, args, self.state, self.user)

    def replied(self, verb: str, reply: bytes) -> None:
        """RFC 1939 §3: the state after this command's reply was sent."""
        ok = reply.startswith(b"+OK")
        if verb in ("PASS", "APOP", "AUTH") and ok and self.state is State.AUTHORIZATION:
            self.state = State.TRANSACTION
        elif verb == "QUIT" and self.state is State.TRANSACTION:
            self.state = State.UPDATE

    async def send(
        self,
        injection: Injection | None,
        reply: bytes,
        send: Send,
        stream: Callable[[], trio.abc.Stream],
        *,
        verb: str | None = None,
        args: str | None = None,
    ) -> bytes:
        """Send ``reply`` as the fault shapes it; return the bytes that went out.

        Raises ``FaultEnded`` after a cut; never returns after a stall.
        """
        if injection is None:
            await send(reply)
            return reply
        multiline = is_multiline(verb, args, reply) if verb else False
        steps = shape_whole(injection, reply, multiline=multiline)
        line, ledger = self._describe(injection, reply, steps), self.ledger
        if ledger is not None:
            ledger.fault(injection, line)
        if isinstance(injection.action, Answer):
            if ledger is not None and verb is not None:
                ledger.answered(f"{injection.describe()}: answered by popproxy")
            # The server's own reply (a greeting) comes first in the capture, withheld.
            steps = [s for s in steps if isinstance(s, Withhold)] + [
                s for s in steps if not isinstance(s, Withhold)
            ]
        sent: list[bytes] = []
        for i, step in enumerate(steps):
            if isinstance(step, Forward):
                await send(step.data)
                sent.append(step.data)
            elif isinstance(step, Originate):
                await send(step.data, step.why)
                sent.append(step.data)
            elif isinstance(step, Withhold):
                if ledger is not None:
                    ledger.withheld(step.data, step.why)
            elif isinstance(step, Pause):
                await trio.sleep(step.seconds)
            elif isinstance(step, Close):
                if ledger is not None:
                    ledger.cut(step.how, step.why)
                    self._withhold_rest(steps[i + 1 :])
                await close(stream(), rst=step.how == "rst")
                raise FaultEnded(step.why)
            elif isinstance(step, Hang):
                if ledger is not None:
                    ledger.stalled(step.why)
                    self._withhold_rest(steps[i + 1 :])
                await hang(stream(), ledger.received if ledger is not None else None)
                raise FaultEnded(step.why)
            elif isinstance(step, Watch):
                self.watching = Watching(step.seconds, step.reply, step.why)
        return b"".join(sent)

    def _withhold_rest(self, steps: list[Step]) -> None:
        """After a cut or a stall: the reply's remaining bytes, never sent."""
        assert self.ledger is not None
        for step in steps:
            if isinstance(step, Withhold):
                self.ledger.withheld(step.data, step.why)

    async def watched(self, watching: Watching, send: Send) -> None:
        """The client stayed silent past a fault's idle limit: say so (maybe), close."""
        if self.ledger is not None:
            self.ledger.closed(watching.why)
        if watching.reply:
            with contextlib.suppress(Exception):
                await send(watching.reply, watching.why)
        self.log.append(watching.why)
        self.note(watching.why)
        raise FaultEnded(watching.why)

    def _describe(self, injection: Injection, reply: bytes, steps: list[Step]) -> str:
        withheld = sum(len(s.data) for s in steps if isinstance(s, Withhold))
        made = b"".join(s.data for s in steps if isinstance(s, Originate))
        what = injection.describe()
        if injection.verb:
            what += f" on {injection.verb}"
        parts = []
        if isinstance(injection.action, Answer):
            parts.append(f"answered {first_line(made)!r} instead")
        elif made:
            parts.append(f"added {made!r}")
        if withheld and not isinstance(injection.action, Answer):
            parts.append(f"withheld {withheld} of {len(reply)} reply bytes")
        for step in steps:
            if isinstance(step, Close | Hang):
                parts.append(step.why.rsplit(": ", 1)[-1])
            elif isinstance(step, Pause) and step is steps[0]:
                parts.append(f"paused {step.seconds:.3f} s")
        line = what + (": " + ", ".join(parts) if parts else "")
        self.log.append(line)
        self.note(line)
        return line


def is_multiline(verb: str | None, args: str | None, reply: bytes) -> bool:
    """Whether ``reply`` carries a body (RFC 1939 §3; the observer's own table)."""
    if verb is None or not reply.startswith(b"+OK"):
        return False
    return verb in ML_ON_OK or (verb in ML_ON_OK_IF_NO_ARG and not args)


def first_line(data: bytes) -> str:
    return data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "backslashreplace")[:100]


async def close(stream: trio.abc.Stream, *, rst: bool) -> None:
    """Close the connection: FIN, or RST (``SO_LINGER`` 0) so the peer sees a reset."""
    if rst:
        sock = abort_on_close(stream)
        if sock is not None:
            sock.close()  # no close_notify, no FIN: the kernel sends RST
            return
    with trio.move_on_after(1), trio.CancelScope(shield=True):
        try:
            await stream.aclose()
        except (*STREAM_ERRORS, trio.BusyResourceError):
            pass


async def hang(stream: trio.abc.Stream, received: Callable[[bytes], None] | None = None) -> None:
    """Stall: read and ignore everything until the client gives up and closes (what it
    sends goes to ``received``, its close as b"")."""
    try:
        while data := bytes(await stream.receive_some(65536)):
            if received is not None:
                received(data)
    except (*STREAM_ERRORS, trio.BusyResourceError):
        pass
    if received is not None:
        received(b"")
