"""The relay controller's vocabulary: inputs the pump reports, commands the pump executes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from popproxy.core.events import Direction, Event


class Leg(enum.Enum):
    """One of the proxy's two connections: to the client, or to the upstream server."""

    CLIENT = "client"
    UPSTREAM = "upstream"

    __hash__ = object.__hash__

    @property
    def sender(self) -> Direction:
        """The direction of the bytes that arrive on this leg."""
        return Direction.CLIENT if self is Leg.CLIENT else Direction.SERVER

    @property
    def other(self) -> Leg:
        return Leg.UPSTREAM if self is Leg.CLIENT else Leg.CLIENT


def arrives_on(direction: Direction) -> Leg:
    """The leg ``direction``'s bytes are read from."""
    return Leg.CLIENT if direction is Direction.CLIENT else Leg.UPSTREAM


def goes_to(direction: Direction) -> Leg:
    """The leg ``direction``'s bytes are forwarded to."""
    return Leg.UPSTREAM if direction is Direction.CLIENT else Leg.CLIENT


class Cut(enum.Enum):
    """How a leg is closed: an orderly FIN (close_notify on TLS) or an abortive RST."""

    FIN = "fin"
    RST = "rst"


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class Input:
    """Base class of what the pump reports to the controller."""


@dataclass(frozen=True, slots=True)
class DataReceived(Input):
    """``direction``'s peer sent ``data`` (never empty) at time ``t``."""

    direction: Direction
    data: bytes
    t: float


@dataclass(frozen=True, slots=True)
class Parsed(Input):
    """The observer's events for the bytes fed to it last (any direction's events)."""

    events: tuple[Event, ...]


@dataclass(frozen=True, slots=True)
class EofReceived(Input):
    """``direction``'s peer closed its side (EOF) at time ``t``."""

    direction: Direction
    t: float


@dataclass(frozen=True, slots=True)
class TlsEstablished(Input):
    """The handshake a ``StartTls`` asked for on ``leg`` succeeded."""

    leg: Leg


@dataclass(frozen=True, slots=True)
class TlsFailed(Input):
    """The handshake a ``StartTls`` asked for on ``leg`` failed, for ``reason``."""

    leg: Leg
    reason: str


@dataclass(frozen=True, slots=True)
class ObserverFailed(Input):
    """The observer raised: from now on no events come (the relay goes on)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Tick(Input):
    """The clock reached ``t`` (the pump sends one at each ``Controller.deadline``: an idle
    limit, a linger, or the end of a fault's pause)."""

    t: float


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class RelayCommand:
    """Base class of what the controller asks the pump to do, in order."""


@dataclass(frozen=True, slots=True)
class Forward(RelayCommand):
    """Relay ``data``, bytes ``direction``'s peer sent, unchanged to the other leg
    (``offset``: where they start in that direction's stream)."""

    direction: Direction
    data: bytes
    offset: int = field(default=-1, compare=False)


@dataclass(frozen=True, slots=True)
class Send(RelayCommand):
    """Send bytes popproxy makes itself to ``leg``; recorded as popproxy's, with ``why``
    (``reserved``: already recorded by a ``Reserve``, when a fault's pause held it)."""

    leg: Leg
    data: bytes
    why: str
    reserved: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class Reserve(RelayCommand):
    """popproxy's ``send`` waits behind a fault's pause: its bytes take their place in
    the record now (the stream order the controller counted), and go out later."""

    send: Send


@dataclass(frozen=True, slots=True)
class Drop(RelayCommand):
    """``length`` bytes of ``direction``'s stream from ``offset`` are never forwarded."""

    direction: Direction
    offset: int
    length: int
    why: str


@dataclass(frozen=True, slots=True)
class HoldReads(RelayCommand):
    """Stop reading ``leg`` (after the read in progress) until ``ResumeReads``."""

    leg: Leg


@dataclass(frozen=True, slots=True)
class ResumeReads(RelayCommand):
    """Read ``leg`` again."""

    leg: Leg


@dataclass(frozen=True, slots=True)
class StartTls(RelayCommand):
    """Upgrade ``leg`` to TLS now (``mode``: why) and report the outcome as an input."""

    leg: Leg
    mode: str


@dataclass(frozen=True, slots=True)
class TlsFact(RelayCommand):
    """``direction``'s stream carries TLS from here on without a handshake by popproxy
    (``decrypted`` False: passthrough, relayed opaque); for the record and the observer."""

    direction: Direction
    decrypted: bool
    mode: str


@dataclass(frozen=True, slots=True)
class ForwardEof(RelayCommand):
    """Pass ``direction``'s EOF on: half-close the other leg (or close it if it cannot)."""

    direction: Direction


@dataclass(frozen=True, slots=True)
class Note(RelayCommand):
    """A fact about the session for the record (``kind`` as in capture event records;
    ``fields``: the record's other fields, e.g. a fault's rule and offset)."""

    kind: str
    detail: str
    fields: tuple[tuple[str, str | int | None], ...] = ()


@dataclass(frozen=True, slots=True)
class EndSession(RelayCommand):
    """Stop relaying and close both legs with ``cut``; ``how`` and ``error`` go on record."""

    how: str
    error: str | None = None
    cut: Cut = Cut.FIN
