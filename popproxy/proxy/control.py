"""Relay control: the only code that may change relayed bytes (strip mode), kept small."""

from __future__ import annotations

import re

from popproxy.core import BodyChunk, BodyEnd, Event, Reply

# RFC 2449 §5: one capability per line; STLS (RFC 2595 §4) takes no arguments.
_STLS_LINE = re.compile(rb"(?im)^stls[ \t]*\r?\n")


def stls_capability_spans(events: list[Event], capa_seqs: set[int]) -> list[tuple[int, int]]:
    """Stream spans (offset, length) of ``STLS`` lines inside CAPA bodies among ``events``.

    ``capa_seqs`` carries the CAPA commands whose body is still open from one call to the
    next.  A body chunk is scanned from its first byte, which is a line start except when a
    chunk boundary split a capability line (CAPA bodies are tiny: not seen in practice).
    """
    spans: list[tuple[int, int]] = []
    for event in events:
        if isinstance(event, Reply) and event.verb == "CAPA" and event.multiline:
            capa_seqs.add(event.seq)
        elif isinstance(event, BodyChunk) and event.seq in capa_seqs:
            for match in _STLS_LINE.finditer(event.raw):
                spans.append((event.offset + match.start(), match.end() - match.start()))
        elif isinstance(event, BodyEnd):
            capa_seqs.discard(event.seq)
    return spans
