"""One summary row per capture, as ``list`` and ``browse`` show it: end record first."""

from __future__ import annotations

from typing import Any

from popproxy.capture.reader import CaptureReader
from popproxy.capture.via import via_of
from popproxy.core import Direction
from popproxy.core.transcript import TranscriptBuilder
from popproxy.inspect import metered_events


def _base(reader: CaptureReader) -> dict[str, Any]:
    h = reader.header
    return {
        "path": str(reader.path),
        "start": h.get("start"),
        "client": h.get("client"),
        "upstream": h.get("upstream"),
        "via": via_of(h),  # how the upstream was chosen (docs/capture-format.md)
    }


def row_from_end(reader: CaptureReader, end: dict[str, Any]) -> dict[str, Any]:
    """A row from the header and the end record alone."""
    octets = end.get("octets") or {}
    return {
        **_base(reader),
        "user": end.get("user"),
        "commands": end.get("commands"),
        "client_octets": octets.get("c"),
        "server_octets": octets.get("s"),
        "duration": end.get("t"),
        "how": end.get("how"),
        "error": end.get("error"),
        "anomalies": end.get("anomalies"),
        "unfinished": False,
    }


def row_from_scan(reader: CaptureReader, progress: Any = None) -> dict[str, Any]:
    """A row for a capture without an end record: read it all through the observer."""
    builder = TranscriptBuilder(hash_bodies=False, keep_listings=False)
    octets = {Direction.CLIENT: 0, Direction.SERVER: 0}
    last = 0.0
    for record, t, events in metered_events(reader, progress):
        last = max(last, t)
        if record is not None and record.data is not None and record.direction is not None:
            octets[record.direction] += len(record.data)  # data records only carry bytes
        builder.feed(t, events)
    session = builder.session
    return {
        **_base(reader),
        "user": session.user,
        "commands": session.commands,
        "client_octets": octets[Direction.CLIENT],
        "server_octets": octets[Direction.SERVER],
        "duration": last,
        "how": "unfinished",
        "error": None,
        "anomalies": len(session.anomalies),
        "unfinished": True,
    }
