"""One multi-line body being read: finds its terminator and undoes dot-stuffing, chunk-wise."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from popproxy.core import values

_CRLF_DOT = re.compile(rb"\r\n\.")  # a body line that starts with "." (RFC 1939 §3)
_LF_DOT = re.compile(rb"\n\.")
_DOTS_IN_LINES = 8  # per chunk: dots inside lines memchr passes before the pattern takes over
MAX_LISTING = 1_000_000  # entries kept of a LIST/UIDL/CAPA body (bounded memory)


@dataclass
class Body:
    """The state of one body between chunks; ``scan`` is the only per-chunk work.

    No Python loop runs per body line: ``scan`` jumps from one line-start dot to the next,
    and such a line is either the terminator or dot-stuffed.  It looks for the next "."
    with ``bytes.find`` (``memchr``: tens of GB/s over base64 or dot-free text); a dot
    inside a line sends it to a compiled pattern for CRLF "." (about twice as fast as
    ``bytes.find`` of three bytes) up to the next line-start dot, so text full of dots
    costs no more than the pattern alone.  Line counts use ``bytes.count``.
    """

    seq: int
    verb: str
    bol: bool = True  # the next byte starts a line
    prev_cr: bool = False  # the last byte seen was CR
    lines: int = 0
    octets: int = 0
    unstuffed_dots: int = 0
    listing: list[tuple[str, ...]] | None = None
    partial: bytes = b""
    count_lines: bool = True  # a full pass per chunk; a proxy showing nothing can skip it

    def scan(
        self, data: bytes, pos: int, *, bare_lf: bool
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes | None]:
        """Read body bytes from ``pos``.

        Returns (where reading stopped, [(raw, unstuffed) pieces], terminator raw or None).
        Reading stops early only before a "." or ".\\r" that may be the terminator.
        ``bare_lf``: the server ends lines with LF alone, so look for "\\n." instead.
        """
        end = len(data)
        search, back = (_LF_DOT.search, 1) if bare_lf else (_CRLF_DOT.search, 2)
        eol = b"\n" if bare_lf else b"\r\n"
        dots: list[int] = []
        start = pos
        patience = _DOTS_IN_LINES
        if self.bol and data.startswith(b".", pos):
            j = pos
        elif self.prev_cr and data.startswith(b"\n.", pos):
            j = pos + 1
        else:
            j, patience = _next_dot(data, pos, pos, search, back, eol, patience)
        while j >= 0:
            # RFC 1939 §3: a line of exactly "." ends the body.
            if data.startswith(b".\r\n", j) or data.startswith(b".\n", j):
                term = 3 if data[j + 1] == 13 else 2
                pieces = [self.take(data[start:j], dots, start)] if j > start else []
                return j + term, pieces, data[j : j + term]
            if end - j < 3 and data[j:] in (b".", b".\r"):
                pieces = [self.take(data[start:j], dots, start)] if j > start else []
                return j, pieces, None  # maybe the terminator: decide with more bytes
            dots.append(j)
            if patience:
                after = j + 2 if data.startswith(b"..", j) else j + 1  # stuffing's 2nd dot
                j, patience = _next_dot(data, after, start, search, back, eol, patience)
            else:
                match = search(data, j + 1)
                j = match.start() + back if match else -1
        pieces = [self.take(data[start:end], dots, start)] if end > start else []
        return end, pieces, None

    def take(self, raw: bytes, dots: list[int], base: int) -> tuple[bytes, bytes]:
        """Account for ``raw``; ``dots`` are positions (from ``base``) of line-start dots."""
        data = raw
        if dots:
            # RFC 1939 §3: drop the first octet of a line that begins with ".".
            # Long pieces are joined from views, not slices: the join is their only copy.
            view: bytes | memoryview = memoryview(raw) if len(raw) > 512 * len(dots) else raw
            pieces: list[bytes | memoryview] = []
            prev = 0
            for at in dots:
                i = at - base
                if raw[i + 1 : i + 2] != b".":
                    self.unstuffed_dots += 1
                pieces.append(view[prev:i])
                prev = i + 1
            pieces.append(view[prev:])
            data = b"".join(pieces)
        self.prev_cr = raw.endswith(b"\r")
        self.bol = raw.endswith(b"\n")
        if self.count_lines:
            self.lines += raw.count(b"\n")
        self.octets += len(data)
        if self.listing is not None:
            parts = (self.partial + data).split(b"\n")
            self.partial = parts.pop()
            for part in parts:
                if len(self.listing) < MAX_LISTING:
                    self.listing.append(values.parse_listing_line(self.verb, part.rstrip(b"\r")))
        return raw, data

    def take_rest(self, rest: bytes) -> tuple[bytes, bytes]:
        """Account for held-back bytes ("." or ".\\r") that turned out to be data."""
        return self.take(rest, [0] if self.bol and rest.startswith(b".") else [], 0)

    def finish(self) -> tuple[tuple[str, ...], ...] | None:
        """The structured listing (LIST, UIDL, CAPA, AUTH, LANG), once the body has ended."""
        if self.listing is None:
            return None
        if self.partial:
            self.listing.append(values.parse_listing_line(self.verb, self.partial.rstrip(b"\r")))
            self.partial = b""
        return tuple(self.listing)


def _next_dot(
    data: bytes,
    pos: int,
    start: int,
    search: Callable[..., re.Match[bytes] | None],
    back: int,
    eol: bytes,
    patience: int,
) -> tuple[int, int]:
    """Where the next line-start dot at or after ``pos`` is (-1: none), and the patience
    left: how many more dots inside lines ``bytes.find`` may pass in this chunk before the
    pattern takes over.  Lines before ``start`` are not looked at (the caller decided)."""
    if patience:
        find = data.find
        j = find(b".", pos)
        while j >= 0:
            if j - back >= start and data.startswith(eol, j - back):
                return j, patience
            patience -= 1
            if not patience:
                pos = j
                break
            j = find(b".", j + 1)
        else:
            return -1, patience
    match = search(data, pos)  # dots inside lines are common here: text
    return (match.start() + back if match else -1), 0
