"""Beside the pump: bytes the observer has not seen yet, in arrival order, and the record
of what the controller decided (drops, notes, TLS facts, popproxy's own bytes)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from popproxy.core import Direction, Event
from popproxy.proxy.controller import Drop, Leg, Note, RelayCommand, Reserve, Send, TlsFact
from popproxy.proxy.tap import Tap

C, S = Direction.CLIENT, Direction.SERVER


class Feed:
    """Chunks wait here until the tap is fed them, oldest first, across both read loops, so
    a reply is never parsed before its command; their events wait for the controller."""

    def __init__(self, tap: Tap, now: Callable[[], float], notice: Callable[[Note], None]) -> None:
        self.tap = tap
        self.now = now
        self.notice = notice  # a fault's one-line notice in the live view
        self._unfed: deque[tuple[Direction, float, bytes, str | None]] = deque()
        self._events: list[Event] = []

    def received(self, direction: Direction, t: float, data: bytes) -> None:
        """A peer's chunk (b"": its EOF), to be fed in its turn."""
        self._unfed.append((direction, t, data, None))

    def own(self, direction: Direction, data: bytes, why: str) -> None:
        """Bytes popproxy sends itself into ``direction``'s stream."""
        self._unfed.append((direction, self.now(), data, why))

    @property
    def waiting(self) -> bool:
        """Whether chunks wait to be fed."""
        return bool(self._unfed)

    def observe(self) -> None:
        """Feed the tap every chunk not yet fed, oldest first; keep the events."""
        unfed, events, data_of = self._unfed, self._events, self.tap.data
        while unfed:
            direction, t, data, why = unfed.popleft()
            events.extend(data_of(direction, t, data, proxy=why is not None, why=why))

    def take(self) -> tuple[Event, ...]:
        """The events not yet reported to the controller."""
        if not self._events:
            return ()  # the common case per chunk: nothing new
        events, self._events = tuple(self._events), []
        return events

    def forget(self) -> None:
        """The observer failed: its events no longer matter."""
        self._events = []

    def tls(self, direction: Direction, info: dict[str, Any], *, decrypted: bool) -> None:
        """``direction`` carries TLS from here on (after every chunk before it)."""
        self.observe()
        self._events.extend(self.tap.start_tls(direction, self.now(), info, decrypted=decrypted))

    def record(self, commands: list[RelayCommand]) -> None:
        """Put a batch's decisions in the record, before anything of it is executed, so the
        record's order is the wire's."""
        tap = self.tap
        for command in commands:
            if isinstance(command, Send | Reserve):
                send = command.send if isinstance(command, Reserve) else command
                if not send.reserved:  # a reserved send was recorded by its Reserve
                    self.own(S if send.leg is Leg.CLIENT else C, send.data, send.why)
            elif isinstance(command, Drop):
                tap.drop(command.direction, command.offset, command.length, command.why)
                who = "client" if command.direction is C else "server"
                tap.note(
                    self.now(),
                    f"✂ popproxy did not forward {command.length} octets from the {who}: "
                    f"{command.why}",
                )
            elif isinstance(command, Note):
                tap.event(self.now(), command.kind, detail=command.detail, **dict(command.fields))
                tap.note(self.now(), f"● popproxy: {command.kind} {command.detail or ''}".rstrip())
                if command.kind.startswith("fault"):
                    self.notice(command)
            elif isinstance(command, TlsFact):
                leg = "upstream" if command.direction is S else "client"
                info: dict[str, Any] = {"leg": "both" if command.mode == "passthrough" else leg}
                info["mode"] = command.mode
                self.tls(command.direction, info, decrypted=command.decrypted)
