"""Which characters a terminal would act on, and their visible escapes (no rich here)."""

# views/safe.py builds on these for everything rich prints; errors.report uses them for its
# one-line messages, which quote file and peer text.

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator
from typing import Any

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


def spans(value: str, keep: str) -> Iterator[tuple[int, int]]:
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
    for start, stop in spans(value, keep):
        if start > at:
            yield value[at:start], False
        yield "".join(escape_char(ch) for ch in value[start:stop]), True
        at = stop
    if at < len(value):
        yield value[at:], False


def escape(value: str, keep: str = ONE_LINE) -> str:
    """``value`` with every unsafe character written as an escape (for plain-text output)."""
    return "".join(piece for piece, _ in pieces(value, keep))


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


def escape_bytes(data: bytes) -> str:
    """Raw octets as text: printable ASCII as is, CR and LF as ``\\r`` ``\\n``, every other
    octet (and the backslash) as ``\\xNN``: what ``show --raw`` and the browser print."""
    out = []
    for b in data:
        if b == 13:
            out.append("\\r")
        elif b == 10:
            out.append("\\n")
        elif 32 <= b < 127 and b != 92:
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    return "".join(out)
