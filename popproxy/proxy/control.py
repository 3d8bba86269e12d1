"""Relay control: the only code that may change relayed bytes (strip mode), kept small."""

from __future__ import annotations

import re

from popproxy.core import BodyChunk, BodyEnd, Event, Reply

# RFC 2449 §5: one capability per line; STLS (RFC 2595 §4) takes no arguments.
_STLS_LINE = re.compile(rb"(?im)^stls[ \t]*\r?\n")
# RFC 5034 §6: "SASL" and its mechanism names; RFC 5802 §4: "-PLUS" names channel binding.
_SASL_LINE = re.compile(rb"(?im)^sasl[ \t][^\r\n]*")
_PLUS_WORD = re.compile(rb"(?i)[ \t]+[A-Z0-9_-]+-PLUS(?=[ \t\r\n]|$)")
_PLUS_LINE = re.compile(rb"(?im)^[A-Z0-9_-]+-PLUS[ \t]*\r?\n")
PLUS_WHY = "-PLUS mechanism hidden by popproxy (--hide-plus)"


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


def plus_mechanism_spans(
    events: list[Event], open_seqs: dict[int, str]
) -> list[tuple[int, int, str]]:
    """Spans of ``-PLUS`` mechanism names: words of CAPA's SASL line (with their leading
    blank) and whole lines of a bare AUTH listing; ``open_seqs`` as for STLS above."""
    spans: list[tuple[int, int, str]] = []
    for event in events:
        if isinstance(event, Reply) and event.multiline and event.verb in ("CAPA", "AUTH"):
            open_seqs[event.seq] = event.verb
        elif isinstance(event, BodyChunk) and open_seqs.get(event.seq) == "CAPA":
            for line in _SASL_LINE.finditer(event.raw):
                for word in _PLUS_WORD.finditer(event.raw, line.start(), line.end()):
                    spans.append((event.offset + word.start(), word.end() - word.start(), PLUS_WHY))
        elif isinstance(event, BodyChunk) and open_seqs.get(event.seq) == "AUTH":
            for match in _PLUS_LINE.finditer(event.raw):
                spans.append((event.offset + match.start(), match.end() - match.start(), PLUS_WHY))
        elif isinstance(event, BodyEnd):
            open_seqs.pop(event.seq, None)
    return spans
