"""The one sanitising step between peer or file text and a person: controls become escapes.

Everything popproxy shows comes from bytes a peer sent or a file held. A terminal acts on
some characters instead of showing them: C0 controls and DEL, ESC (CSI, OSC 8 links,
OSC 52 clipboard writes, DCS), C1 controls (U+0080–U+009F), bidirectional overrides
(U+202A–U+202E, U+2066–U+2069) and other invisible format characters (Unicode category
Cf), line and paragraph separators, unassigned code points and lone surrogates.  Each of
these is shown as a visible escape (``\\x1b``, ``\\u202e``) in the ``pop.escape`` style;
rich markup in peer text is never interpreted because peer text only ever enters a
``rich.text.Text`` as plain text (consoles are also built with markup and emoji off).
JSON output escapes the same characters as ``\\u`` escapes and stays valid JSON.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from typing import Any

from rich.segment import Segment
from rich.style import Style
from rich.text import Text

ESCAPE_STYLE = "pop.escape"
ONE_LINE = ""  # keep nothing: a field that must stay on one line
MULTI_LINE = "\t\n"  # keep tabs and line feeds (message bodies, popproxy's own notes)
_SAFE_CATEGORIES = frozenset({"Zs", "Co"})  # spaces and private-use glyphs show as such
_CANDIDATE = re.compile(r"[^\x20-\x7e]")  # anything else is looked at one by one


def is_unsafe(ch: str) -> bool:
    """Whether a terminal could act on ``ch`` (or not show it) instead of printing it."""
    return not ch.isprintable() and unicodedata.category(ch) not in _SAFE_CATEGORIES


def escape_char(ch: str) -> str:
    """The visible escape of one character, as Python writes it."""
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _spans(value: str, keep: str) -> Iterator[tuple[int, int]]:
    """(start, stop) of each run of unsafe characters (``keep`` excepted)."""
    run_start = run_stop = -1
    for match in _CANDIDATE.finditer(value):
        ch = match.group()
        if ch in keep or not is_unsafe(ch):
            continue
        at = match.start()
        if at == run_stop:
            run_stop = at + 1
            continue
        if run_start >= 0:
            yield run_start, run_stop
        run_start, run_stop = at, at + 1
    if run_start >= 0:
        yield run_start, run_stop


def pieces(value: str, keep: str = ONE_LINE) -> Iterator[tuple[str, bool]]:
    """Split ``value`` into (text, is_escape) pieces; escapes are already written out."""
    if value.isprintable() and value.isascii():
        if value:
            yield value, False
        return
    at = 0
    for start, stop in _spans(value, keep):
        if start > at:
            yield value[at:start], False
        yield "".join(escape_char(ch) for ch in value[start:stop]), True
        at = stop
    if at < len(value):
        yield value[at:], False


def escape(value: str, keep: str = ONE_LINE) -> str:
    """``value`` with every unsafe character written as an escape (for plain-text output)."""
    return "".join(piece for piece, _ in pieces(value, keep))


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
    spans = list(_spans(plain, keep))
    if not spans:
        return line
    out = line.blank_copy()
    at = 0
    for start, stop in spans:
        if start > at:
            out.append_text(line[at:start])
        out.append(escape(plain[start:stop]), style=ESCAPE_STYLE)
        at = stop
    if at < len(plain):
        out.append_text(line[at:])
    return out


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


_JSON_UNSAFE = re.compile(r"[^\x20-\x7e\n]")


def _json_escape(match: re.Match[str]) -> str:
    ch = match.group()
    if not is_unsafe(ch):
        return ch
    code = ord(ch)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # JSON spells other planes as a UTF-16 surrogate pair (RFC 8259 §7)
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def json_dumps(value: Any, **options: Any) -> str:
    """``json.dumps`` whose output holds no character a terminal would act on.

    Non-ASCII text stays readable; controls, DEL, C1, bidi and format characters and lone
    surrogates become ``\\uXXXX`` escapes.  They can only occur inside JSON strings, so
    escaping them in the encoded document keeps it valid and equal when decoded.
    """
    options.setdefault("ensure_ascii", False)
    return _JSON_UNSAFE.sub(_json_escape, json.dumps(value, **options))
