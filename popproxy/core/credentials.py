"""Where credentials sit in POP3 lines, what SASL responses carry, and how echoes look."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from popproxy.core import values
from popproxy.core.events import Secret, SecretKind

BLANKS = b" \t"  # servers split a command at a run of SP or TAB (docs/protocol-notes.md §1.5)
CREDENTIAL_VERBS = frozenset({"PASS", "APOP", "AUTH", "RPOP"})
MIN_ECHO = 4  # shorter values would mask ordinary words in every server line


@dataclass(frozen=True, slots=True)
class CommandLine:
    """A client line (without its line end) split into verb and argument text."""

    lead: int  # blanks before the verb
    verb_raw: bytes
    verb: str  # upper case (RFC 1939 §3: keywords are case-insensitive)
    arg_start: int  # index of the first argument octet, after the blank run
    rest: bytes  # the argument text


def split_command(body: bytes) -> CommandLine:
    """Split a command line at the first run of blanks after the verb."""
    stripped = body.lstrip(BLANKS)
    lead = len(body) - len(stripped)
    cut = len(stripped)
    for blank in BLANKS:
        at = stripped.find(blank)
        if 0 <= at < cut:
            cut = at
    verb_raw = stripped[:cut]
    after = stripped[cut:]
    rest = after.lstrip(BLANKS)
    arg_start = lead + cut + len(after) - len(rest)
    verb = verb_raw.upper().decode("ascii", "backslashreplace")
    return CommandLine(lead, verb_raw, verb, arg_start, rest)


def credential_span(cmd: CommandLine, body: bytes) -> tuple[int, int, SecretKind] | None:
    """The (start, stop, kind) of the credential in a command line, if it carries one."""
    if not cmd.rest.strip(BLANKS):
        return None
    after_verb = cmd.lead + len(cmd.verb_raw) + 1  # past the first blank
    verb = cmd.verb
    if verb in ("PASS", "RPOP"):
        # RFC 1939 §7: the password is the rest of the line; it may hold blanks, leading
        # ones too, so everything after the first blank is masked.
        return (after_verb, len(body), SecretKind.PASS if verb == "PASS" else SecretKind.RPOP)
    if verb == "APOP":
        trimmed = cmd.rest.rstrip(BLANKS)
        name = _first_word(trimmed)
        digest = trimmed[len(name) :].lstrip(BLANKS)
        if not digest:
            return None
        stop = cmd.arg_start + len(trimmed)
        return (stop - len(digest), stop, SecretKind.APOP)
    if verb == "AUTH":
        mech = _first_word(cmd.rest)
        ir = cmd.rest[len(mech) :].strip(BLANKS)
        if not ir or ir == b"=":
            return None
        return (cmd.arg_start + len(mech) + 1, len(body), SecretKind.AUTH_IR)
    return None


def mask_line(body: bytes, filler: bytes = b"#") -> bytes:
    """A command line (no line end) with its credential, if any, filled with ``filler``."""
    span = credential_span(split_command(body), body)
    if span is None:
        return body
    start, stop, _ = span
    return body[:start] + filler * (stop - start) + body[stop:]


def mask_text(line: str) -> str:
    """``mask_line`` for decoded text: what a log may show of a client line."""
    raw = line.encode("utf-8", "surrogateescape")
    return mask_line(raw).decode("utf-8", "surrogateescape")


def mechanism_and_response(cmd: CommandLine) -> tuple[str, bytes | None]:
    """``AUTH mech [initial-response]``: the mechanism (upper case) and the response."""
    mech = _first_word(cmd.rest)
    ir = cmd.rest[len(mech) :].strip(BLANKS)
    name = mech.upper().decode("ascii", "backslashreplace")
    if not ir:
        return name, None
    return name, b"" if ir == b"=" else ir


def could_carry_credential(partial: bytes) -> bool:
    """Whether an unfinished client line may still turn out to carry a credential."""
    head = partial.lstrip(BLANKS)
    verb = head
    for blank in BLANKS:
        verb = verb.split(bytes([blank]), 1)[0]
    if len(verb) == len(head) and len(verb) < 5:
        return True  # the verb is not complete yet
    return verb.upper().decode("latin-1") in CREDENTIAL_VERBS


def decoded_secrets(mechanism: str | None, responses: list[bytes]) -> list[bytes]:
    """The secret values inside a SASL exchange's (base64) client responses.

    RFC 4616 §2: PLAIN's password is the third NUL-separated field; LOGIN's responses after
    the first (the user name) are the password; XOAUTH2 and OAUTHBEARER (RFC 7628 §3.1)
    carry ``auth=Bearer <token>``; RFC 2195 §2: CRAM-MD5 answers ``user SP digest``.
    """
    out: list[bytes] = []
    decoded = [values.b64decode(r) for r in responses]
    if mechanism == "PLAIN" and decoded and decoded[0] is not None:
        parts = decoded[0].split(b"\x00")
        if len(parts) >= 3:
            out.append(b"\x00".join(parts[2:]))
    elif mechanism == "LOGIN":
        out.extend(d for d in decoded[1:] if d is not None)
    elif mechanism in ("XOAUTH2", "OAUTHBEARER"):
        for data in decoded:
            for field in (data or b"").split(b"\x01"):
                if field[:5].lower() == b"auth=":
                    value = field[5:]
                    out.append(value)
                    scheme, _, token = value.partition(b" ")
                    if scheme.lower() == b"bearer" and token:
                        out.append(token.strip())
    elif mechanism == "CRAM-MD5" and decoded and decoded[0] is not None:
        _, sep, digest = decoded[0].rpartition(b" ")
        if sep:
            out.append(digest)
    elif mechanism is not None and mechanism.startswith("SCRAM-"):
        # RFC 5802 §5.1: the client-final's proof "p=" (the last attribute) is a verifier.
        for data in decoded:
            _, sep, proof = (data or b"").rpartition(b",p=")
            if sep and proof:
                out.append(proof)
    return [s for s in out if len(s) >= MIN_ECHO]


def echo_forms(secret: bytes) -> list[tuple[bytes, bool]]:
    """What a server line may contain when it echoes ``secret``: (form, case-insensitive).

    The value itself (case-insensitive), and its base64 at each of the three alignments it
    can take inside a longer encoded string: only the characters that depend on the secret
    alone, so an echo is found whatever surrounds it.
    """
    secret = secret.strip(BLANKS)
    if len(secret) < MIN_ECHO:
        return []
    forms: list[tuple[bytes, bool]] = [(secret.lower(), True)]
    bits = 8 * len(secret)
    for skew in range(3):
        encoded = base64.b64encode(b"\x00" * skew + secret)
        first = -(-8 * skew // 6)  # the first character made of the secret's bits only
        last = (8 * skew + bits) // 6  # one past the last such character
        core = encoded[first:last]
        if len(core) >= MIN_ECHO:
            forms.append((core, False))
    return forms


def find_echoes(line: bytes, forms: list[tuple[bytes, bool]]) -> list[tuple[int, int]]:
    """Every (start, stop) where one of ``forms`` occurs in ``line``."""
    if not forms:
        return []
    lower = line.lower()
    spans: list[tuple[int, int]] = []
    for form, folded in forms:
        hay = lower if folded else line
        start = hay.find(form)
        while start >= 0:
            spans.append((start, start + len(form)))
            start = hay.find(form, start + 1)
    return _merge(spans)


def mask_spans(raw: bytes, offset: int, secrets: list[Secret], filler: bytes = b"#") -> bytes:
    """``raw`` (which starts at stream ``offset``) with the ``secrets`` inside it filled."""
    out: bytearray | None = None
    end = offset + len(raw)
    for secret in secrets:
        lo, hi = max(secret.offset, offset), min(secret.offset + secret.length, end)
        if lo < hi:
            out = out if out is not None else bytearray(raw)
            out[lo - offset : hi - offset] = filler * (hi - lo)
    return raw if out is None else bytes(out)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, stop in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


def _first_word(data: bytes) -> bytes:
    cut = len(data)
    for blank in BLANKS:
        at = data.find(blank)
        if 0 <= at < cut:
            cut = at
    return data[:cut]
