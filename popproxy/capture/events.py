"""Re-reads a capture through the observer: the same events the live proxy saw."""

from __future__ import annotations

from collections.abc import Iterator

from popproxy.capture import format as fmt
from popproxy.capture.format import Record
from popproxy.capture.reader import CaptureReader
from popproxy.core import AuthIdentity, Direction, Event, Observer, PopproxyClosed, PopproxySent


def replay_events(
    reader: CaptureReader, *, follow: bool = False, close: bool = True
) -> Iterator[tuple[Record | None, float, list[Event]]]:
    """Yield (record, time, events) for each record; proxy-made bytes are fed like the rest.

    Data, TLS and EOF records drive the observer exactly as the live session did.  When
    ``close`` is set, directions the capture never closed (a crash) are closed at the end,
    so cut-off bodies come out as truncated.
    """
    obs = Observer()
    closed: set[Direction] = set()
    offsets = {Direction.CLIENT: 0, Direction.SERVER: 0}
    t = 0.0
    for record in reader.records(follow=follow):
        kind, f = record.kind, record.fields
        t = float(f.get("t", t))
        events: list[Event] = []
        # A record whose fields are damaged is skipped (the rest still reads); the observer
        # is called outside that check, so a bug in it surfaces instead of passing for one.
        direction = _direction(f) if kind in (fmt.DATA, fmt.TLS, fmt.EOF, fmt.OPAQUE) else None
        if direction is not None:
            if kind == fmt.DATA and record.data is not None:
                start = offsets[direction]
                offsets[direction] += len(record.data)
                if f.get("p"):
                    # Three actors: these bytes are popproxy's, whatever they look like.
                    why = str(f.get("why") or "sent by popproxy")
                    events = [PopproxySent(direction, start, len(record.data), why)]
                events += obs.receive_data(direction, record.data)
            elif kind == fmt.TLS:
                events = obs.start_tls(direction, decrypted=bool(f.get("decrypted", True)))
            elif kind == fmt.OPAQUE:
                events = obs.go_opaque(direction, str(f.get("why", "not POP3")))
            elif kind == fmt.EOF:
                closed.add(direction)
                if f.get("by") == "popproxy":
                    events = [PopproxyClosed(direction, str(f.get("why") or "popproxy closed"))]
                events += obs.receive_data(direction, b"")
        elif kind == fmt.IDENTITY:
            events = _identity(f)
        yield record, t, events
    if close:
        for direction in (Direction.SERVER, Direction.CLIENT):
            if direction not in closed:
                yield None, t, obs.receive_data(direction, b"")


def _direction(fields: dict[str, object]) -> Direction | None:
    try:
        return Direction(fields.get("d"))
    except ValueError:
        return None


def _identity(fields: dict[str, object]) -> list[Event]:
    details = fields.get("details")
    seq = fields.get("seq", 0)
    return [
        AuthIdentity(
            seq if isinstance(seq, int) and not isinstance(seq, bool) else 0,
            str(fields.get("mech", "")),
            str(fields.get("identity", "")),
            tuple((str(k), str(v)) for k, v in details.items())
            if isinstance(details, dict)
            else (),
        )
    ]
