"""Re-reads a capture through the observer: the same events the live proxy saw."""

from __future__ import annotations

from collections.abc import Iterator

from popproxy.capture import format as fmt
from popproxy.capture.format import Record
from popproxy.capture.reader import CaptureReader
from popproxy.core import (
    AuthIdentity,
    Direction,
    Event,
    Observer,
    PopproxyClosed,
    PopproxyDropped,
    PopproxySent,
)

_STREAM_KINDS = frozenset({fmt.DATA, fmt.TLS, fmt.EOF, fmt.OPAQUE, fmt.DROP})


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
        # The reader has checked each known kind's fields; "d" of other kinds is not used.
        direction = record.direction if kind in _STREAM_KINDS else None
        if direction is not None:
            if kind == fmt.DATA and record.data is not None:
                start = offsets[direction]
                offsets[direction] += len(record.data)
                if record.proxy:
                    # Three actors: these bytes are popproxy's, whatever they look like.
                    why = record.why or "sent by popproxy"
                    events = [PopproxySent(direction, start, len(record.data), why)]
                events += obs.receive_data(direction, record.data)
            elif kind == fmt.TLS:
                events = obs.start_tls(direction, decrypted=record.decrypted)
            elif kind == fmt.DROP and record.length > 0:
                # Bytes popproxy received and never forwarded: the transcript's, not the
                # observer's (it reads the stream as each peer sent it).
                why = record.why or "dropped"
                events = [PopproxyDropped(direction, record.offset, record.length, why)]
            elif kind == fmt.OPAQUE:
                events = obs.go_opaque(direction, record.why or "not POP3")
            elif kind == fmt.EOF:
                closed.add(direction)
                if record.proxy:
                    events = [PopproxyClosed(direction, record.why or "popproxy closed")]
                events += obs.receive_data(direction, b"")
        elif kind == fmt.IDENTITY:
            events = _identity(f)
        yield record, t, events
    if close:
        for direction in (Direction.SERVER, Direction.CLIENT):
            if direction not in closed:
                yield None, t, obs.receive_data(direction, b"")


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
