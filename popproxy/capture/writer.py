"""Turns relayed chunks and observer events into capture records, redacting credentials."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popproxy import fsutil
from popproxy.capture import format as fmt
from popproxy.capture.format import SessionEnd
from popproxy.core.events import AuthIdentity, Direction, Event, Secret


@dataclass(slots=True)
class _Chunk:
    direction: Direction
    offset: int
    t: float
    data: bytes
    proxy: bool
    why: str | None = None


@dataclass
class WriterStats:
    """What the writer counted, for the end record."""

    redactions: int = 0
    late_redactions: int = 0


class CaptureWriter:
    """Buffers records until the observer has settled them, then hands out file bytes.

    One named method per record kind (docs/capture-format.md, "Record kinds"); callers
    never lay out a record.  Data is released in arrival order once its whole chunk lies
    below the observer's settled offset, so every credential span is known before its
    bytes are written (format doc, "Redaction").  Pure: ``take()`` returns bytes, the
    caller does the IO.
    """

    def __init__(self, header: dict[str, Any], *, keep_secrets: bool = False) -> None:
        self.keep_secrets = keep_secrets
        self.stats = WriterStats()
        self._queue: deque[_Chunk | bytes] = deque()  # data, and record lines in order
        self._next = {Direction.CLIENT: 0, Direction.SERVER: 0}
        self._written = {Direction.CLIENT: 0, Direction.SERVER: 0}
        self._secrets: list[Secret] = []
        self._tls_legs: list[str] = []
        self._queued_bytes = 0
        self._out: list[bytes] = [fmt.encode_header(header)]
        self._out_bytes = len(self._out[0])

    @property
    def buffered(self) -> int:
        """Bytes waiting for the disk (released or not)."""
        return self._out_bytes + self._queued_bytes

    def offset(self, direction: Direction) -> int:
        """Octets of ``direction``'s stream so far (every data record, released or not)."""
        return self._next[direction]

    def written(self, direction: Direction) -> int:
        """Offset of ``direction``'s stream up to which data has been released."""
        return self._written[direction]

    # --------------------------------------------------------------- record kinds

    def data(
        self,
        direction: Direction,
        t: float,
        data: bytes,
        *,
        proxy: bool = False,
        why: str | None = None,
    ) -> None:
        """A chunk of ``direction``'s stream; ``proxy`` marks bytes popproxy itself made
        (``why`` says what for)."""
        self._queue.append(_Chunk(direction, self._next[direction], t, data, proxy, why))
        self._next[direction] += len(data)
        self._queued_bytes += len(data)

    def tls(
        self, direction: Direction, t: float, facts: Mapping[str, Any], *, decrypted: bool = True
    ) -> dict[str, Any]:
        """From here on ``direction``'s stream is TLS; ``facts`` (leg, mode, version,
        cipher, ...) are recorded as given.  Returns the record's fields."""
        fields = fmt.tls_fields(direction, t, self._next[direction], facts, decrypted=decrypted)
        leg = str(facts.get("leg", ""))
        if leg and leg not in self._tls_legs:
            self._tls_legs.append(leg)
        self._queue.append(fmt.encode_meta(fields))
        return fields

    def drop(self, direction: Direction, offset: int, length: int, why: str) -> None:
        """Octets of ``direction``'s stream that popproxy received but did not forward."""
        if length > 0:
            self._queue.append(fmt.encode_drop(direction, offset, length, why))

    def event(self, t: float | None, kind: str, **fields: str | int | None) -> None:
        """Something that happened to the connection (``t`` None: not tied to a time)."""
        self._queue.append(fmt.encode_event(t, kind, fields))

    def eof(
        self, direction: Direction, t: float, *, proxy: bool = False, why: str | None = None
    ) -> None:
        """``direction``'s sender closed; ``proxy``: popproxy ended it itself (``why``)."""
        self._queue.append(fmt.encode_eof(direction, t, proxy=proxy, why=why))

    def opaque(self, direction: Direction, why: str) -> None:
        """From here on ``direction``'s stream is not POP3 and is not interpreted."""
        self._queue.append(fmt.encode_opaque(direction, self._next[direction], why))

    def identity(
        self,
        seq: int,
        mechanism: str,
        identity: str,
        details: Sequence[tuple[str, str]] = (),
    ) -> None:
        """The user name a SASL exchange carried (not a secret; replay needs it)."""
        self._queue.append(fmt.encode_identity(seq, mechanism, identity, details))

    def end(self, end: SessionEnd, *, unrecorded: int | None = None) -> None:
        """Release everything, then the end record: ``end``'s facts and the writer's own
        counts (octets, TLS legs, redactions; ``unrecorded`` after a write failure)."""
        self.flush_all()
        stats = self.stats
        self._emit(
            fmt.encode_end(
                end,
                octets=self._next,
                tls=self._tls_legs,
                redactions=stats.redactions,
                late_redactions=stats.late_redactions,
                unrecorded=unrecorded,
            )
        )

    def meta(self, fields: dict[str, Any]) -> None:
        """A record of a kind this popproxy does not write (tests of newer minors)."""
        self._queue.append(fmt.encode_meta(fields))

    def observe(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Secret):
                if event.offset < self._written[event.direction]:
                    # Its first bytes are on disk already: only possible if the observer's
                    # settled offset was wrong.  Counted loudly; the rest is still redacted.
                    self.stats.late_redactions += 1
                self._secrets.append(event)
            elif isinstance(event, AuthIdentity):
                self.identity(event.seq, event.mechanism, event.identity, event.details)

    def advance(self, settled_client: int, settled_server: int) -> None:
        """Release every queued record that the observer's settled offsets allow."""
        queue, out = self._queue, self._out
        client = Direction.CLIENT
        while queue:
            item = queue[0]
            if isinstance(item, bytes):
                self._emit(item)
            else:
                limit = settled_client if item.direction is client else settled_server
                if item.offset + len(item.data) > limit:
                    break
                data = self._redact(item)
                out.extend(
                    fmt.encode_data(item.direction, item.t, data, proxy=item.proxy, why=item.why)
                )
                self._out_bytes += len(data) + 48
                self._queued_bytes -= len(data)
                self._written[item.direction] = item.offset + len(item.data)
            queue.popleft()

    def flush_all(self) -> None:
        """Release everything, settled or not (end of session): redact what is known."""
        big = 1 << 62
        self.advance(big, big)

    def take(self) -> list[bytes]:
        """The released file bytes, as pieces for ``fmt.write_all``."""
        out, self._out, self._out_bytes = self._out, [], 0
        return out

    def untake(self, pieces: list[bytes]) -> None:
        """Put back what ``take`` returned but could not be written (kept in order)."""
        self._out[:0] = pieces
        self._out_bytes += sum(len(p) for p in pieces)

    def _emit(self, record: bytes) -> None:
        self._out.append(record)
        self._out_bytes += len(record)

    def _redact(self, chunk: _Chunk) -> bytes:
        if not self._secrets:
            return chunk.data
        start, end = chunk.offset, chunk.offset + len(chunk.data)
        data: bytearray | None = None
        keep: list[Secret] = []
        for secret in self._secrets:
            s_end = secret.offset + secret.length
            if secret.direction is not chunk.direction or secret.offset >= end:
                keep.append(secret)
                continue
            lo, hi = max(secret.offset, start), min(s_end, end)
            if s_end > end:
                keep.append(secret)
            if lo >= hi:
                continue
            if secret.offset >= start:
                self.stats.redactions += 1
                self._emit(
                    fmt.encode_redact(
                        chunk.direction,
                        secret.offset,
                        secret.length,
                        secret.kind.value,
                        masked=not self.keep_secrets,
                    )
                )
            if not self.keep_secrets:
                data = data if data is not None else bytearray(chunk.data)
                data[lo - start : hi - start] = fmt.FILLER * (hi - lo)
        self._secrets = keep
        return chunk.data if data is None else bytes(data)


def create_capture_file(path: Path) -> int:
    """Create a capture file exclusively, mode 0600 (captures hold mail); return its fd."""
    return fsutil.create(path, fsutil.PRIVATE)
