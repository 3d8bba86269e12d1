"""Captures built from the recorded Dovecot fixtures (tests/fixtures), byte for byte and
with fixed times, so screenshots of them are the same on every machine."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from popproxy.capture import format as fmt
from popproxy.capture.writer import CaptureWriter
from popproxy.core import Direction, Observer
from popproxy.core.transcript import TranscriptBuilder

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def build_capture(path: Path, name: str, number: int) -> Path:
    """Write fixture ``name`` as the proxy would have, end record included."""
    doc = json.loads((FIXTURES / f"{name}.json").read_text())
    header = {
        "start": f"2026-11-26T18:{number:02d}:00.000000Z",
        "session": number,
        "client": f"127.0.0.1:{50900 + number}",
        "upstream": "pop.example.org:110",
    }
    steps = [(c["dir"], float(c["t"]), base64.b64decode(c["b64"])) for c in doc["chunks"]]
    return write_steps(path, steps, header)


def write_steps(
    path: Path, steps: list[tuple[str, float, bytes]], header: dict[str, Any] | None = None
) -> Path:
    """A capture of (direction, time, bytes) steps, both directions closed at the end."""
    writer = CaptureWriter(header or {"start": "2026-11-26T18:00:00Z", "upstream": "h:110"})
    observer = Observer()
    builder = TranscriptBuilder(hash_bodies=False)
    octets = {"c": 0, "s": 0}
    t = 0.0
    last = steps[-1][1] if steps else 0.0
    for d, t, data in [*steps, ("s", last, b""), ("c", last, b"")]:
        if data:
            writer.data(Direction(d), t, data)
            octets[d] += len(data)
        else:
            writer.meta({"r": fmt.EOF, "d": d, "t": t})
        events = observer.receive_data(Direction(d), data)
        writer.observe(events)
        builder.feed(t, events)
        writer.advance(observer.settled(Direction.CLIENT), observer.settled(Direction.SERVER))
    writer.flush_all()
    s = builder.session
    kinds: dict[str, int] = {}
    for anomaly in s.anomalies:
        kinds[anomaly["kind"]] = kinds.get(anomaly["kind"], 0) + 1
    end: dict[str, Any] = {
        "r": fmt.END,
        "t": t,
        "how": "quit" if s.quit else "closed",
        "error": None,
        "octets": octets,
        "commands": s.commands,
        "user": s.user,
        "mechanism": s.mechanism,
        "anomalies": len(s.anomalies),
        "anomaly_kinds": kinds,
        "errors": s.errors,
        "verbs": s.verbs,
        "tls": [],
        "redactions": writer.stats.redactions,
        "observer_error": None,
    }
    writer.meta(end)
    writer.flush_all()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        fmt.write_all(fd, writer.take())
    finally:
        os.close(fd)
    return path


def build_folder(folder: Path) -> list[Path]:
    """Every fixture as a capture in ``folder``, named by start time like the proxy's."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(p.stem for p in FIXTURES.glob("*.json"))
    return [
        build_capture(folder / f"20261126T18{i:02d}00.000000Z-{i:05d}{fmt.SUFFIX}", name, i)
        for i, name in enumerate(names, start=1)
    ]
