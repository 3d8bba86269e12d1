"""The one sanitising step between peer or file text and a person: controls become escapes."""

# Everything popproxy shows comes from bytes a peer sent or a file held. A terminal acts on
# some characters instead of showing them: C0 controls and DEL, ESC (CSI, OSC 8 links,
# OSC 52 clipboard writes, DCS), C1 controls (U+0080-U+009F), bidirectional overrides
# (U+202A-U+202E, U+2066-U+2069) and other invisible format characters (Unicode category
# Cf), line and paragraph separators, unassigned code points and lone surrogates. Each is
# shown as a visible escape (\x1b, \u202e) in the pop.escape style (popproxy/escapes.py
# holds the rule). Rich markup in peer text is never interpreted: peer text only enters a
# rich Text as plain text, and consoles are built with markup and emoji off. JSON output
# escapes the same characters as \u escapes and stays valid JSON.

from __future__ import annotations

from collections.abc import Iterable, Iterator

from rich.segment import Segment
from rich.style import Style
from rich.text import Text

from popproxy.escapes import (
    MULTI_LINE,
    ONE_LINE,
    escape,
    escape_char,
    is_unsafe,
    json_dumps,
    pieces,
    spans,
)

__all__ = [
    "MULTI_LINE",
    "ONE_LINE",
    "append",
    "escape",
    "escape_char",
    "is_unsafe",
    "json_dumps",
    "pieces",
    "row",
    "sanitise",
    "sanitise_segments",
    "text",
]

ESCAPE_STYLE = "pop.escape"


def append(text: Text, value: str, style: str | Style = "", keep: str = ONE_LINE) -> Text:
    """Append peer text to ``text``: plain text in ``style``, escapes in the escape style."""
    for piece, escaped in pieces(value, keep):
        text.append(piece, style=ESCAPE_STYLE if escaped else style)
    return text


def text(value: str, style: str | Style = "", keep: str = ONE_LINE) -> Text:
    """A new ``Text`` holding peer text (see ``append``)."""
    return append(Text(), value, style, keep)


def sanitise(line: Text, keep: str = MULTI_LINE) -> Text:
    """``line`` with unsafe characters replaced by escapes, its styles kept.

    The edge of every console (``views.theme.make_console``) runs this on each ``Text``
    it prints, so text that missed ``append`` still cannot reach the terminal raw.
    """
    plain = line.plain
    if plain.isprintable():
        return line
    runs = list(spans(plain, keep))
    if not runs:
        return line
    out = line.blank_copy()
    at = 0
    for start, stop in runs:
        if start > at:
            out.append_text(line[at:start])
        out.append(escape(plain[start:stop]), style=ESCAPE_STYLE)
        at = stop
    if at < len(plain):
        out.append_text(line[at:])
    return out


def row(*cells: str | Text) -> list[Text]:
    """Table cells with peer text made safe before the table is laid out."""
    return [sanitise(c, ONE_LINE) if isinstance(c, Text) else text(c) for c in cells]


def sanitise_segments(segments: Iterable[Segment]) -> Iterator[Segment]:
    """The same step on rendered segments (tables and other containers)."""
    for segment in segments:
        if segment.control or segment.text.isprintable():
            yield segment
            continue
        for piece, escaped in pieces(segment.text, MULTI_LINE):
            if escaped:
                yield Segment(piece, (segment.style or Style()) + Style(reverse=True))
            else:
                yield Segment(piece, segment.style)
