"""Captures for tests: one builder (as the proxy writes them) and one waiter for end records."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import trio

from popproxy.capture import format as fmt
from popproxy.capture.format import CaptureError
from popproxy.capture.reader import CaptureReader
from popproxy.capture.writer import CaptureWriter
from popproxy.core import Direction, Observer
from popproxy.core.transcript import TranscriptBuilder

C, S = Direction.CLIENT, Direction.SERVER
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
HEADER: dict[str, Any] = {
    "popproxy": "test",
    "start": "2024-01-01T10:00:00Z",
    "t0": 1704103200.0,
    "session": 1,
    "client": "127.0.0.1:54321",
    "listen": "127.0.0.1:1110",
    "upstream": "127.0.0.1:2110",
    "keep_secrets": False,
    "stls": "intercept",
}

# A step: (direction, t, bytes) with the direction a Direction or "c"/"s"; b"" closes that
# direction; or ("tls", direction, t[, decrypted]) for TLS starting there (STLS, passthrough);
# or ("p", direction, t, bytes, why) for bytes popproxy sent itself; or ("drop", direction,
# offset, length, why) for bytes of that stream popproxy did not forward.
Step = tuple[Any, ...]


def make_capture(
    path: Path,
    steps: Iterable[Step],
    header: dict[str, Any] | None = None,
    *,
    end: bool = True,
    keep_secrets: bool = False,
) -> Path:
    """Write a capture as the proxy would: writer fed by a real observer (redaction
    included), settled offsets, EOF records and an end record summing the session up.

    With ``end=False`` the file stops before the directions close and the end record, like
    a capture whose proxy died.
    """
    hdr = {**HEADER, "keep_secrets": keep_secrets, **(header or {})}
    writer = CaptureWriter(hdr, keep_secrets=keep_secrets)
    observer = Observer()
    builder = TranscriptBuilder(hash_bodies=False)
    offsets = {C: 0, S: 0}
    closed: set[Direction] = set()
    t = 0.0

    def settle(when: float, events: list[Any]) -> None:
        writer.observe(events)
        builder.feed(when, events)
        writer.advance(observer.settled(C), observer.settled(S))

    for step in steps:
        if step[0] == "tls":
            direction, t = Direction(step[1]), step[2]
            decrypted = step[3] if len(step) > 3 else True
            writer.meta(
                {
                    "r": fmt.TLS,
                    "d": direction.value,
                    "t": t,
                    "off": offsets[direction],
                    "decrypted": decrypted,
                    "version": "TLSv1.3",
                    "leg": "client" if direction is C else "upstream",
                    "mode": "stls" if decrypted else "passthrough",
                }
            )
            settle(t, observer.start_tls(direction, decrypted=decrypted))
            continue
        if step[0] == "drop":
            _, d, off, length, why = step
            writer.meta(
                {"r": fmt.DROP, "d": Direction(d).value, "off": off, "len": length, "why": why}
            )
            continue
        proxy = step[0] == "p"  # ("p", direction, t, bytes, why): popproxy's own bytes
        if proxy:
            step = step[1:]
        direction, t, data = Direction(step[0]), step[1], step[2]
        if data:
            writer.data(direction, t, data, proxy=proxy, why=step[3] if proxy else None)
            offsets[direction] += len(data)
        else:
            writer.meta({"r": fmt.EOF, "d": direction.value, "t": t})
            closed.add(direction)
        settle(t, observer.receive_data(direction, data))
    if end:
        for direction in (S, C):
            if direction not in closed:
                writer.meta({"r": fmt.EOF, "d": direction.value, "t": t})
                settle(t, observer.receive_data(direction, b""))
        writer.flush_all()
        session = builder.session
        writer.meta(
            {
                "r": fmt.END,
                "t": t,
                "how": "quit" if session.quit else "closed",
                "error": None,
                "octets": {"c": offsets[C], "s": offsets[S]},
                "commands": session.commands,
                "user": session.user,
                "mechanism": session.mechanism,
                "anomalies": len(session.anomalies),
                "redactions": 0,
                "observer_error": None,
            }
        )
    writer.flush_all()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        fmt.write_all(fd, writer.take())
    finally:
        os.close(fd)
    return path


def timed(session: Iterable[tuple[Any, bytes]], step: float = 0.01) -> list[Step]:
    """(direction, bytes) pairs as steps 10 ms apart."""
    return [(d, round((i + 1) * step, 6), data) for i, (d, data) in enumerate(session)]


def fixture_steps(name: str) -> list[Step]:
    """The chunks of a recorded byte fixture (tests/fixtures/NAME.json) as steps."""
    doc = json.loads((FIXTURES / f"{name}.json").read_text())
    return [(c["dir"], float(c["t"]), base64.b64decode(c["b64"])) for c in doc["chunks"]]


def ended(path: Path) -> bool:
    """Whether a capture is finished (has its end record)."""
    try:
        with CaptureReader(path) as reader:
            return reader.end() is not None
    except CaptureError:
        return False


async def wait_ended(out: Path, count: int, before: set[Path] | None = None) -> list[Path]:
    """Wait (the caller bounds it) until ``count`` captures in ``out`` (other than those in
    ``before``) have their end record; return them in name order."""
    while True:
        paths = sorted(set(out.glob(f"*{fmt.SUFFIX}")) - (before or set()))
        if len(paths) >= count and all(ended(p) for p in paths):
            return paths
        await trio.sleep(0.02)
