"""In-process speed of popproxy.core's Observer: RETR bodies in GB/s, NOOP pairs per second."""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.pop3server import Message

MIB = 1 << 20
CHUNK = 64 * 1024
BATCH = 100  # NOOP pairs per receive_data call


def _chunks(size: int, line: int) -> tuple[list[bytes], int]:
    """The RETR body (terminator included) cut into 64 KiB chunks, from one prebuilt block."""
    message = Message.build(size, line)
    data = message.block * message.repeats + message.tail + b".\r\n"
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)], len(data)


def _retr_seconds(api: Any, chunks: list[bytes]) -> tuple[float, int]:
    observer_cls, direction = api
    obs = observer_cls()
    events = len(obs.receive_data(direction.SERVER, b"+OK POP3 ready\r\n"))
    events += len(obs.receive_data(direction.CLIENT, b"RETR 1\r\n"))
    start = time.perf_counter()
    events += len(obs.receive_data(direction.SERVER, b"+OK\r\n"))
    for chunk in chunks:
        events += len(obs.receive_data(direction.SERVER, chunk))
    return time.perf_counter() - start, events


def _pairs_seconds(api: Any, pairs: int) -> tuple[float, int]:
    observer_cls, direction = api
    obs = observer_cls()
    obs.receive_data(direction.SERVER, b"+OK POP3 ready\r\n")
    commands, replies = b"NOOP\r\n" * BATCH, b"+OK\r\n" * BATCH
    events = 0
    start = time.perf_counter()
    for _ in range(pairs // BATCH):
        events += len(obs.receive_data(direction.CLIENT, commands))
        events += len(obs.receive_data(direction.SERVER, replies))
    return time.perf_counter() - start, events


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows of results, or one row saying the Observer is not available."""
    try:
        from popproxy.core import Direction, Observer  # type: ignore[attr-defined,unused-ignore]
    except Exception as exc:  # absent, or still being written
        return [{"benchmark": "observer", "result": "not available", "note": str(exc)}]
    api = (Observer, Direction)
    size = (32 if quick else 256) * MIB
    pairs = 20_000 if quick else 100_000
    repeats = 3
    rows: list[dict[str, Any]] = []
    for line in (1024, 80):
        chunks, total = _chunks(size, line)
        timings = [_retr_seconds(api, chunks) for _ in range(repeats)]
        seconds = statistics.median(t for t, _ in timings)
        rows.append(
            {
                "benchmark": f"RETR {size // MIB} MiB, {line}-byte lines, 64 KiB chunks",
                "result": f"{total / seconds / 1e9:.3f} GB/s",
                "note": f"median of {repeats}, {timings[0][1]:,} events",
            }
        )
    timings = [_pairs_seconds(api, pairs) for _ in range(repeats)]
    seconds = statistics.median(t for t, _ in timings)
    rows.append(
        {
            "benchmark": f"{pairs:,} NOOP/+OK pairs, {BATCH} per call",
            "result": f"{pairs / seconds:,.0f} pairs/s",
            "note": f"median of {repeats}, {timings[0][1]:,} events",
        }
    )
    return rows
