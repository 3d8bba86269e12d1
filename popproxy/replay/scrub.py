"""``before_record`` scrubbing: rules rewrite a new capture as declared, same-length redactions.

Each match in either direction's stream is overwritten in place by the rule's
replacement fitted to the match's length, and a ``redact`` record (kind ``SCRUB``,
``rule``) declares the span, so offsets, octet counts and message sizes stay true
(docs/capture-format.md).  String fields of metadata records (addresses, host names)
are rewritten too.  Streams are scanned in two passes with a bounded window.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popproxy.capture import format as fmt
from popproxy.capture.reader import CaptureReader
from popproxy.capture.writer import create_capture_file
from popproxy.core import Direction

WINDOW = 4096  # a match must be shorter than this (it may straddle data records)
_KEEP_FIELDS = frozenset({"r", "kind", "how", "d", "v", "start", "mode", "leg", "mech"})


@dataclass(frozen=True)
class Scrub:
    """One rule: a regular expression (bytes or str) and what replaces each match.

    ``replacement`` None fills the match with ``fill``; a replacement of another length
    is cut or padded with ``fill``.  ``directions``: ``"c"``, ``"s"`` or ``"cs"``.
    """

    pattern: bytes | str
    replacement: bytes | str | None = None
    name: str = "scrub"
    directions: str = "cs"
    fill: bytes = b"#"

    def regex(self) -> re.Pattern[bytes]:
        pattern = self.pattern.encode() if isinstance(self.pattern, str) else self.pattern
        return re.compile(pattern)

    def fitted_match(self, match: re.Match[bytes]) -> bytes:
        return self.fitted(len(match.group()))

    def fitted(self, length: int) -> bytes:
        rep = self.replacement
        data = rep.encode() if isinstance(rep, str) else (rep or b"")
        data = data[:length]
        return data + self.fill[:1] * (length - len(data))


@dataclass(frozen=True)
class Span:
    direction: Direction
    offset: int
    length: int
    rule: int


def _stream_chunks(path: Path, direction: Direction) -> Iterator[bytes]:
    with CaptureReader(path) as reader:
        for record in reader.records():
            if record.kind == fmt.DATA and record.direction is direction and record.data:
                yield record.data


def _leftmost(
    active: list[tuple[int, re.Pattern[bytes]]], buf: bytes, pos: int
) -> tuple[int, int, int] | None:
    """The leftmost non-empty match at or after ``pos`` in ``buf``: (start, end, rule)."""
    best: tuple[int, int, int] | None = None
    for i, regex in active:
        m = regex.search(buf, pos)
        while m is not None and m.end() == m.start():
            m = regex.search(buf, m.start() + 1) if m.start() < len(buf) else None
        if m is not None and (best is None or m.start() < best[0]):
            best = (m.start(), m.end(), i)
    return best


def find_spans(path: Path, rules: Sequence[Scrub], direction: Direction) -> list[Span]:
    """Pass 1: every match in one direction's stream, leftmost first, never overlapping.

    ``buf`` holds stream offsets from ``base`` on; a match starting more than WINDOW
    before the end of what was read cannot change with more data, so it is settled.
    """
    active = [(i, r.regex()) for i, r in enumerate(rules) if direction.value in r.directions]
    if not active:
        return []
    spans: list[Span] = []
    base, buf, decided = 0, b"", 0
    chunks = _stream_chunks(path, direction)
    while True:
        chunk = next(chunks, None)
        final = chunk is None
        buf += chunk or b""
        limit = base + len(buf) if final else base + len(buf) - WINDOW
        pos = decided
        while pos < limit:
            found = _leftmost(active, buf, pos - base)
            if found is None or base + found[0] >= limit:
                break
            start, end, rule = found
            spans.append(Span(direction, base + start, end - start, rule))
            pos = base + end
        decided = max(decided, pos, limit)
        buf, base = buf[decided - base :], decided
        if final:
            return spans


def _scrub_fields(fields: dict[str, Any], rules: Sequence[Scrub]) -> dict[str, Any]:
    out = dict(fields)
    for key, value in fields.items():
        if key not in _KEEP_FIELDS and isinstance(value, str):
            out[key] = _scrub_text(value, rules)
    return out


def _scrub_text(value: str, rules: Sequence[Scrub]) -> str:
    data = value.encode("utf-8", "surrogateescape")
    for rule in rules:
        data = rule.regex().sub(rule.fitted_match, data)
    return data.decode("utf-8", "replace")


def scrub_capture(path: Path, rules: Sequence[Scrub]) -> int:
    """Rewrite ``path`` with ``rules`` applied (pass 2); returns the number of spans."""
    spans = {d: find_spans(path, rules, d) for d in Direction}
    if not rules:
        return 0
    staged = path.with_name(f".{path.name}.scrub")
    staged.unlink(missing_ok=True)
    fd = create_capture_file(staged)
    offsets = dict.fromkeys(Direction, 0)
    pending = {d: list(spans[d]) for d in spans}
    try:
        with CaptureReader(path) as reader:
            fmt.write_all(fd, [fmt.encode_meta(_scrub_fields(reader.header, rules))])
            for record in reader.records():
                d = record.direction
                if record.kind != fmt.DATA or record.data is None or d is None:
                    fmt.write_all(fd, [fmt.encode_meta(_scrub_fields(record.fields, rules))])
                    continue
                start, data = offsets[d], bytearray(record.data)
                end = start + len(data)
                pieces: list[bytes] = []
                todo = pending[d]
                while todo and todo[0].offset < end:
                    span = todo[0]
                    if span.offset >= start:
                        pieces.append(_declare(span, rules))
                    lo, hi = max(span.offset, start), min(span.offset + span.length, end)
                    fill = rules[span.rule].fitted(span.length)
                    data[lo - start : hi - start] = fill[lo - span.offset : hi - span.offset]
                    if span.offset + span.length > end:
                        break  # continues in the next data record of this direction
                    todo.pop(0)
                offsets[d] = end
                why = None if record.why is None else _scrub_text(record.why, rules)
                pieces.extend(
                    fmt.encode_data(d, record.t, bytes(data), proxy=record.proxy, why=why)
                )
                fmt.write_all(fd, pieces)
    except BaseException:
        os.close(fd)
        staged.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(staged, path)
    return sum(len(v) for v in spans.values())


def _declare(span: Span, rules: Sequence[Scrub]) -> bytes:
    name = rules[span.rule].name
    return fmt.encode_redact(
        span.direction, span.offset, span.length, "SCRUB", masked=True, rule=name
    )
