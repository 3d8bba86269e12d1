"""Each leg serves the pump's command batches in the order the controller returned them."""

from __future__ import annotations

import trio

from popproxy.proxy.controller import (
    Forward,
    ForwardEof,
    Leg,
    RelayCommand,
    Send,
    StartTls,
    goes_to,
)


def leg_of(command: RelayCommand) -> Leg | None:
    """The leg a command writes to or changes (its turn there keeps the wire's order)."""
    if isinstance(command, Forward | ForwardEof):
        return goes_to(command.direction)
    if isinstance(command, Send | StartTls):
        return command.leg
    return None


class Turns:
    """Tickets per leg (docs/controller.md, "The pump keeps that order"): a batch takes one
    for each leg it writes to before its first await and keeps the leg until it is done
    there, so a later batch, from whichever task, never overtakes it on that leg."""

    def __init__(self) -> None:
        self._issued = {Leg.CLIENT: 0, Leg.UPSTREAM: 0}
        self._serving = {Leg.CLIENT: 0, Leg.UPSTREAM: 0}
        self._turn = {Leg.CLIENT: trio.Event(), Leg.UPSTREAM: trio.Event()}
        self._waiting = {Leg.CLIENT: 0, Leg.UPSTREAM: 0}

    def take(self, leg: Leg) -> int:
        """A ticket for ``leg`` (synchronous: call it before awaiting anything)."""
        ticket = self._issued[leg]
        self._issued[leg] = ticket + 1
        return ticket

    async def wait(self, leg: Leg, ticket: int) -> None:
        """Until ``ticket`` is served on ``leg`` (at once, without a checkpoint, if it is)."""
        if self._serving[leg] == ticket:
            return
        self._waiting[leg] += 1
        try:
            while self._serving[leg] != ticket:
                await self._turn[leg].wait()
        finally:
            self._waiting[leg] -= 1

    def done(self, leg: Leg) -> None:
        """The ticket being served on ``leg`` is through: the next one's turn."""
        self._serving[leg] += 1
        if self._waiting[leg]:
            self._turn[leg].set()
            self._turn[leg] = trio.Event()
