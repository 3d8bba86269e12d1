"""Per-command counts, latency percentiles, octets and error rates over captures (streaming)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from popproxy.capture.reader import CaptureReader
from popproxy.core.transcript import Exchange, TranscriptBuilder
from popproxy.inspect import metered_events

LATENCY_SAMPLES = 100_000  # per command; beyond it a uniform reservoir keeps memory bounded
PERCENTILES = (50, 90, 99)


def percentile(ordered: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending list: the smallest value with ``p``% at or below."""
    if not ordered:
        return None
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class CommandStats:
    """What one command verb cost across every session read."""

    verb: str
    count: int = 0
    errors: int = 0
    no_reply: int = 0
    client_octets: int = 0
    server_octets: int = 0
    body_octets: int = 0
    latency_max: float | None = None
    latencies: list[float] = field(default_factory=list)
    _seen: int = 0
    _rng: random.Random = field(default_factory=lambda: random.Random(0))

    def add_latency(self, seconds: float) -> None:
        self._seen += 1
        if self.latency_max is None or seconds > self.latency_max:
            self.latency_max = seconds
        if len(self.latencies) < LATENCY_SAMPLES:
            self.latencies.append(seconds)
        else:  # reservoir sampling (Algorithm R)
            slot = self._rng.randrange(self._seen)
            if slot < LATENCY_SAMPLES:
                self.latencies[slot] = seconds

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else 0.0

    def latency(self) -> dict[str, float | None]:
        ordered = sorted(self.latencies)
        out: dict[str, float | None] = {f"p{p}": percentile(ordered, p) for p in PERCENTILES}
        out["max"] = self.latency_max
        out["samples"] = self._seen
        return out

    def merge(self, other: CommandStats) -> None:
        self.count += other.count
        self.errors += other.errors
        self.no_reply += other.no_reply
        self.client_octets += other.client_octets
        self.server_octets += other.server_octets
        self.body_octets += other.body_octets
        for x in other.latencies:
            self.add_latency(x)
        if other.latency_max is not None:
            self.latency_max = max(self.latency_max or 0.0, other.latency_max)

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "no_reply": self.no_reply,
            "client_octets": self.client_octets,
            "server_octets": self.server_octets,
            "body_octets": self.body_octets,
            "latency": self.latency(),
        }


class StatsCollector:
    """Feed it each capture's exchanges in completion order; it keeps per-verb totals.

    Latency of a command is measured from ``max(time sent, end of the previous reply)`` to
    the end of its own reply (the terminating ``.`` of a body).  A pipelined command
    (RFC 2449 §6.6) waits in the server's queue while earlier replies are sent; that wait
    is not the command's cost, so it is left out.  The greeting counts as a reply.
    """

    def __init__(self) -> None:
        self.commands: dict[str, CommandStats] = {}
        self.sessions = 0
        self._prev_end: float | None = None

    def start_session(self) -> None:
        self.sessions += 1
        self._prev_end = None

    def add(self, ex: Exchange) -> None:
        """A finished exchange (or an unanswered one, at the end of a session)."""
        if ex.kind == "greeting":
            self._prev_end = ex.t_end
            return
        if ex.kind != "command":
            return
        verb = ex.command or "?"
        stats = self.commands.get(verb)
        if stats is None:
            stats = self.commands[verb] = CommandStats(verb)
        stats.count += 1
        stats.client_octets += ex.client_octets
        stats.server_octets += ex.server_octets
        stats.body_octets += ex.body_octets or 0
        if ex.status is None:
            stats.no_reply += 1
            return
        if ex.status == "-ERR":
            stats.errors += 1
        if ex.t_end is not None and ex.t_sent is not None:
            start = ex.t_sent if self._prev_end is None else max(ex.t_sent, self._prev_end)
            stats.add_latency(max(0.0, ex.t_end - start))
        if ex.t_end is not None:
            self._prev_end = ex.t_end

    def total(self) -> CommandStats:
        total = CommandStats("TOTAL")
        for stats in self.commands.values():
            total.merge(stats)
        return total

    def ordered(self) -> list[CommandStats]:
        """Verbs by count, most frequent first."""
        return sorted(self.commands.values(), key=lambda s: (-s.count, s.verb))

    def to_json(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "commands": {s.verb: s.to_json() for s in self.ordered()},
            "total": self.total().to_json(),
        }


def collect(
    reader: CaptureReader, stats: StatsCollector, progress: Callable[[int], None] | None = None
) -> None:
    """Stream one capture into ``stats``."""
    stats.start_session()
    builder = TranscriptBuilder(hash_bodies=False, keep_listings=False)
    for _record, t, events in metered_events(reader, progress):
        for item in builder.feed(t, events):
            if item.what == "done" and item.exchange is not None:
                stats.add(item.exchange)
    for ex in builder.unfinished():
        stats.add(ex)
