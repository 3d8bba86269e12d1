"""Where the relay controller consults its fault rules and acts on them (docs/controller.md)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from popproxy.core.events import Command as PopCommand
from popproxy.core.events import Direction
from popproxy.proxy.controller import stls
from popproxy.proxy.controller.faulting import FaultStage
from popproxy.proxy.controller.io import (
    DataReceived,
    Drop,
    EndSession,
    HoldReads,
    Input,
    Leg,
    Note,
    RelayCommand,
    ResumeReads,
    Send,
    Tick,
)

if TYPE_CHECKING:
    from popproxy.proxy.controller.machine import Controller

C, S = Direction.CLIENT, Direction.SERVER


def faulted(ctl: Controller, event: Input, stage: FaultStage) -> list[RelayCommand]:
    """``handle`` with fault rules: the controller decides, the rules reshape."""
    t = ctl._t = getattr(event, "t", ctl._last)
    ctl._shaped = []
    released: list[RelayCommand] = []
    if isinstance(event, Tick):
        released = stage.release(t, ctl._upgrade is not None)
        if released:
            ctl._last = t  # idle and linger count from when held bytes went on
        watch = stage.watch_fired(t)
        if watch is not None:
            ctl._out.append(Note("fault-close", watch.why))
            if watch.reply:
                ctl._send(Leg.CLIENT, watch.reply, watch.why)
            ctl._end("fault", watch.why)
    elif isinstance(event, DataReceived) and event.direction is C:
        stage.client_spoke(t)
    if ctl.ended is None:
        ctl._dispatch(event)
    flush(ctl)
    if stage.lifted and ctl.ended is None:
        stage.lifted = False  # a rewritten listing went out: the client's lines follow
        ctl._settle()
        flush(ctl)
    shaped = ctl._shaped
    for command in (*released, *shaped):
        if isinstance(command, EndSession):
            ctl.ended = command
            return [*released, *shaped]  # what follows a session's end never happens
    if ctl.ended is not None and stage.resume_at is not None:
        ctl.ended = None  # the end waits behind a pause: it takes effect when released
    return [*released, *shaped]


def flush(ctl: Controller) -> None:
    """With fault rules: shape what was decided so far.  Before popproxy sends bytes
    of its own, so that those the rules make (a rewritten listing, an answered
    greeting) take their place in the server stream in the order they go out."""
    stage = ctl._stage
    if stage is not None and ctl._out:
        out, ctl._out = ctl._out, []
        ctl._shaped += stage.shape(out, ctl._t, partial(own_reply, ctl))


def own_reply(ctl: Controller, data: bytes, why: str, result: list[RelayCommand]) -> Send:
    """A fault's bytes of popproxy's own to the client, at the server stream's end
    (server bytes still undecided there are withheld: they would follow on the wire
    but precede in the record)."""
    flow = ctl._flows[S]
    if flow.pending:
        result.append(Drop(S, flow.decided, len(flow.pending), f"{why}: withheld"))
        flow.pending.clear()
        flow.decided = flow.received
    assert ctl._stage is not None
    ctl._stage.replaced.append(flow.add_own(len(data)))
    return Send(Leg.CLIENT, data, why)


def fault_turn(ctl: Controller) -> bool:
    """Take the next step that waited for a fault's turn; whether one was taken."""
    stage = ctl._stage
    assert stage is not None
    if stage.answers and answer(ctl):
        return True
    unmatched = stage.unmatched
    if unmatched and not waits_for_state(ctl, unmatched[0]):
        placed(ctl, unmatched.popleft(), own=False)
        return True
    waiting = ctl._stls
    if waiting is not None and not stage.before(waiting.seq):
        ctl._stls = None  # the lines before it are through: its turn
        ctl._client_stls(waiting)
        return True
    if ctl._local_answer_due():
        stls.answer_locally(ctl)  # an STLS that waited its turn: no event may come now
        return True
    return False


def answer(ctl: Controller) -> bool:
    """Take the next step for the first command a rule answers; whether one was taken.

    Its bytes are dropped once everything before them went on; popproxy's reply goes
    out once the server has answered every command before it (RFC 2449 §6.6).
    """
    stage = ctl._stage
    assert stage is not None
    first = stage.answers[0]
    if not first.dropped:
        if ctl._flows[C].decided < first.offset:
            return False
        first.dropped = True
        ctl._drop_to(C, first.offset + first.length, first.why)
        inj = first.injection
        fields = (("rule", inj.rule.text), ("index", inj.index), ("verb", inj.verb))
        ctl._out.append(Note("fault", first.why, fields))
    if not ctl._greeted or any(seq < first.seq for seq in ctl._open):
        return False  # a command sent before the greeting: the greeting goes first
    stage.answers.popleft()
    ctl._finished(first.seq)
    reply = first.injection.action.reply  # type: ignore[union-attr]
    if ctl._send(Leg.CLIENT, reply, first.why):
        stage.answered.append((first, *ctl._flows[S].own[-1]))
    if not stage.answers and ctl._upgrade is None and ctl._stls is None:
        ctl._out.append(ResumeReads(Leg.CLIENT))
    return True


def waits_for_state(ctl: Controller, command: PopCommand) -> bool:
    """Whether a rule on ``command``'s verb asks for the protocol state while a reply
    before it has not ended, or has not been read yet (popproxy's, just sent)."""
    stage = ctl._stage
    assert stage is not None
    if not stage.stateful(command.verb):
        return False
    seq = command.seq
    answered = any(a.seq < seq for a, _, _ in stage.answered)
    return answered or any(earlier < seq for earlier in ctl._open)


def placed(ctl: Controller, command: PopCommand, own: bool) -> None:
    """A client command in its turn: matched against the rules, STLS acted on."""
    stage = ctl._stage
    if stage is not None and not own and not ctl._transparent:
        answering = stage.command(command)
        if answering is not None:
            if len(stage.answers) == 1:
                ctl._out.append(HoldReads(Leg.CLIENT))  # bounded: later lines wait
            return  # never reaches the server, whatever it is (STLS included)
    if command.verb != "STLS" or own:
        return
    if ctl._upgrade is not None or ctl._stls is not None:
        return  # a second STLS while one is under way: its bytes are held anyway
    if stage is not None and stage.before(command.seq):
        # A line before it waits for popproxy's answer (or a rewritten listing): the
        # STLS takes effect once they are through, never past them.
        ctl._stls = command
        return
    ctl._client_stls(command)


def faults_off(ctl: Controller) -> None:
    """Relay control goes off: nothing may wait any more for events that will not come.
    Bytes a rule held back go on unchanged.  popproxy's answers whose turn has come go
    now; one still waiting for earlier replies is given up (sent later it could land
    inside a reply of the server's: its command, withheld, gets no reply); a command
    not withheld yet goes on to the server unchanged, with every line after it, and
    an STLS waiting behind them goes on as a plain line."""
    stage = ctl._stage
    if stage is None:
        return
    flush(ctl)
    ctl._shaped += stage.let_go()
    ctl._stls = None
    while stage.answers and stage.answers[0].dropped and answer(ctl):
        pass
    stage.answers.clear()
    if ctl._upgrade is None:
        ctl._out.append(ResumeReads(Leg.CLIENT))  # held for an answer, an STLS, ...
