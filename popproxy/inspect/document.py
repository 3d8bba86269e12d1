"""The ``show --json`` document of a capture (docs/show.schema.json), built streaming."""

from __future__ import annotations

from typing import Any

from popproxy.capture import format as fmt
from popproxy.capture.events import replay_events
from popproxy.capture.reader import CaptureReader
from popproxy.core.transcript import Exchange, TranscriptBuilder

SCHEMA_VERSION = 3  # docs/show.schema.json: the reply the client got, with what popproxy withheld


def capture_json(reader: CaptureReader, *, reveal: bool = False) -> dict[str, Any]:
    """The ``show --json`` document (docs/show.schema.json)."""
    builder = TranscriptBuilder(reveal_secrets=reveal)
    exchanges: list[Exchange] = []
    tls: list[dict[str, Any]] = []
    end: dict[str, Any] | None = None
    events_out: list[dict[str, Any]] = []
    for record, t, events in replay_events(reader):
        if record is not None and record.kind == fmt.TLS:
            tls.append({k: v for k, v in record.fields.items() if k != "r"})
        elif record is not None and record.kind == fmt.END:
            end = {k: v for k, v in record.fields.items() if k != "r"}
        elif record is not None and record.kind in (fmt.EVENT, fmt.DROP):
            events_out.append(dict(record.fields))
        for item in builder.feed(t, events):
            if item.what == "done" and item.exchange is not None:
                exchanges.append(item.exchange)
    exchanges.extend(builder.unfinished())
    exchanges.sort(key=lambda ex: ex.t_sent if ex.t_sent is not None else ex.t_reply or 0.0)
    summary = builder.session
    header = {k: v for k, v in reader.header.items() if k != "r"}
    session = {
        **header,
        "greeting": summary.greeting,
        "apop_timestamp": summary.apop_timestamp,
        "user": summary.user,
        "mechanism": summary.mechanism,
        "state": summary.state,
        "commands": summary.commands,
        "end": end,
        "warnings": reader.warnings,
    }
    return {
        "schema": SCHEMA_VERSION,
        "path": str(reader.path),
        "session": session,
        "exchanges": [ex.to_json() for ex in exchanges],
        "tls": tls,
        "events": events_out,
        "anomalies": summary.anomalies,
    }
