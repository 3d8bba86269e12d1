"""One multi-line body being read: finds its terminator and undoes dot-stuffing, chunk-wise."""

from __future__ import annotations

import re
from dataclasses import dataclass

from popproxy.core import values

_CRLF_DOT = re.compile(rb"\r\n\.")  # a body line that starts with "." (RFC 1939 §3)
_LF_DOT = re.compile(rb"\n\.")
MAX_LISTING = 1_000_000  # entries kept of a LIST/UIDL/CAPA body (bounded memory)


@dataclass
class Body:
    """The state of one body between chunks; ``scan`` is the only per-chunk work.

    No Python loop runs per body line: a compiled pattern (about twice as fast as
    ``bytes.find`` here) jumps from one line-start dot to the next, and such a line is
    either the terminator or dot-stuffed.  Line counts use ``bytes.count``.
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
        dots: list[int] = []
        start = pos
        if self.bol and data.startswith(b".", pos):
            j = pos
        elif self.prev_cr and data.startswith(b"\n.", pos):
            j = pos + 1
        else:
            match = search(data, pos)
            j = match.start() + back if match else -1
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
            match = search(data, j + 1)
            j = match.start() + back if match else -1
        pieces = [self.take(data[start:end], dots, start)] if end > start else []
        return end, pieces, None

    def take(self, raw: bytes, dots: list[int], base: int) -> tuple[bytes, bytes]:
        """Account for ``raw``; ``dots`` are positions (from ``base``) of line-start dots."""
        data = raw
        if dots:
            # RFC 1939 §3: drop the first octet of a line that begins with ".".
            pieces, prev = [], 0
            for at in dots:
                i = at - base
                if raw[i + 1 : i + 2] != b".":
                    self.unstuffed_dots += 1
                pieces.append(raw[prev:i])
                prev = i + 1
            pieces.append(raw[prev:])
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
