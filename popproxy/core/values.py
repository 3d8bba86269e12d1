"""Pure helpers that read POP3 values: status tokens, response codes, listings, SASL identities."""

from __future__ import annotations

import base64
import binascii
import re

from popproxy.core.events import AnomalyKind

OK = "+OK"
ERR = "-ERR"
CONT = "+"

# RFC 1939 §7: the APOP timestamp is a msg-id, "<" ... "@" ... ">", anywhere in the greeting.
_APOP_RE = re.compile(rb"<[^<>\s@]*@[^<>\s]*>")
# RFC 2449 §8: a response code is the first token after the status, in square brackets.
_CODE_RE = re.compile(r"^\[([^\]\s]*)\]\s?")


def decode_text(data: bytes) -> str:
    """Decode protocol text as UTF-8, escaping other bytes (lossless for display)."""
    return data.decode("utf-8", "backslashreplace")


def strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


def classify_status(line: bytes) -> tuple[str | None, AnomalyKind | None, bytes]:
    """Split a server line into (canonical status, anomaly, rest of line).

    The canonical status is ``+OK``, ``-ERR``, ``+`` (SASL continuation) or None when the
    line is not a status line at all.  RFC 1939 §3: servers send the indicators in upper
    case; we accept other cases and ``+ERR`` but name them as anomalies.
    """
    token, _, rest = line.partition(b" ")
    upper = token.upper()
    if token == b"+OK":
        return OK, None, rest
    if token == b"-ERR":
        return ERR, None, rest
    if token == b"+":
        return CONT, None, rest
    if upper == b"+OK":
        return OK, AnomalyKind.STATUS_CASE, rest
    if upper == b"-ERR":
        return ERR, AnomalyKind.STATUS_CASE, rest
    if upper == b"+ERR":
        # hMailServer's "+ERR": an error, never a continuation (docs/protocol-notes.md §4).
        return ERR, AnomalyKind.NONSTANDARD_STATUS, rest
    return None, None, rest


def split_code(text: bytes) -> tuple[str | None, str]:
    """Return (response code, remaining text) per RFC 2449 §8; unknown codes are kept."""
    decoded = decode_text(text)
    match = _CODE_RE.match(decoded)
    if match is None:
        return None, decoded
    return match.group(1), decoded[match.end() :]


def apop_timestamp(greeting: bytes) -> str | None:
    match = _APOP_RE.search(greeting)
    return None if match is None else decode_text(match.group(0))


def parse_drop_listing(text: str) -> tuple[object, ...] | None:
    """STAT's ``count octets`` (RFC 1939 §5); None when malformed."""
    parts = text.split()
    if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
        return (int(parts[0]), int(parts[1]))
    return None


def parse_listing_line(verb: str, line: bytes) -> tuple[str, ...]:
    """One line of a LIST/UIDL/CAPA/AUTH/LANG body, split into fields.

    Scan and unique-id listings split on any run of blanks (tab and multiple spaces occur
    in the wild, docs/protocol-notes.md §6.8); capability and mechanism lines keep their words.
    """
    text = decode_text(line)
    if verb == "LANG":
        tag, _, description = text.partition(" ")
        return (tag, description)
    return tuple(text.split())


def single_listing(verb: str, text: str) -> tuple[object, ...] | None:
    """``LIST n`` → (n, size), ``UIDL n`` → (n, uid) (RFC 1939 §5, §7); None if malformed."""
    parts = text.split()
    if len(parts) < 2 or not parts[0].isdigit():
        return None
    if verb == "LIST":
        return (int(parts[0]), int(parts[1])) if parts[1].isdigit() else None
    return (int(parts[0]), parts[1])


def b64decode(data: bytes) -> bytes | None:
    """Strict base64 (RFC 5034 §4 forbids other characters); None when not base64."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def sasl_identity(mechanism: str, responses: list[bytes]) -> str | None:
    """The authentication identity carried by PLAIN, LOGIN or CRAM-MD5 client data.

    RFC 4616 §2: PLAIN is ``authzid NUL authcid NUL passwd``; LOGIN's first response is the
    user name; RFC 2195 §2: CRAM-MD5's response is ``user SP digest``.
    """
    if not responses:
        return None
    first = b64decode(responses[0])
    if first is None:
        return None
    if mechanism == "PLAIN":
        parts = first.split(b"\x00")
        return decode_text(parts[1]) if len(parts) == 3 else None
    if mechanism == "LOGIN":
        return decode_text(first) if first else None
    if mechanism == "CRAM-MD5":
        user, sep, _ = first.rpartition(b" ")
        return decode_text(user) if sep else None
    return None
