"""Body scanning (core/body.py) against a byte-by-byte reading of RFC 1939 §3, split anywhere."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popproxy.core.body import Body

SETTINGS = settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
# Line-start dots, stuffed dots, dots inside lines (text) and the terminator, in any order.
CRLF_TOKENS = [
    b".",
    b"..",
    b"...",
    b"\r\n",
    b"a",
    b"ab. c",
    b". ",
    b".\r\n",
    b"x" * 40,
    b"a" + b"." * 9,
]
LF_TOKENS = [*CRLF_TOKENS, b"\n", b".\n"]


def reference(body: bytes, *, bare_lf: bool) -> tuple[bytes, int | None, int]:
    """Unstuffed data, where the terminator starts (None: not seen), unstuffed dots."""
    out = bytearray()
    unstuffed = 0
    i = 0

    def line_start(at: int) -> bool:
        if at == 0:
            return True
        return body[at - 1 : at] == b"\n" if bare_lf else body[at - 2 : at] == b"\r\n"

    skip_check = False
    while i < len(body):
        if not skip_check and line_start(i) and body[i : i + 1] == b".":
            if body.startswith(b".\r\n", i) or (bare_lf and body.startswith(b".\n", i)):
                return bytes(out), i, unstuffed
            if body[i + 1 : i + 2] != b".":
                unstuffed += 1
            i += 1  # RFC 1939 §3: the first octet of a line that begins with "." goes
            skip_check = True
            continue
        skip_check = False
        out.append(body[i])
        i += 1
    return bytes(out), None, unstuffed


def scan_in_pieces(
    prefix: bytes, body: bytes, cuts: list[int], *, bare_lf: bool
) -> tuple[bytes, bytes, int | None, int]:
    """Feed ``prefix + body`` cut at ``cuts`` the way the observer does; the body starts
    after ``prefix`` in the first piece.  Returns raw, data, terminator start, unstuffed."""
    stream = prefix + body
    bounds = sorted({c for c in cuts if 0 < c < len(stream)})
    pieces = [stream[a:b] for a, b in zip([0, *bounds], [*bounds, len(stream)], strict=True)]
    reader = Body(1, "RETR", count_lines=True)
    raw, data = bytearray(), bytearray()
    rest = b""
    offset = 0  # stream offset of the first piece not fed yet
    for piece in pieces:
        chunk = rest + piece
        start = offset - len(rest)
        offset += len(piece)
        pos = max(0, len(prefix) - start)  # the status line before the body is not body
        if pos >= len(chunk):
            continue
        stop, got, terminator = reader.scan(chunk, pos, bare_lf=bare_lf)
        for r, d in got:
            raw += r
            data += d
        if terminator is not None:
            at = start + stop - len(terminator) - len(prefix)
            return bytes(raw), bytes(data), at, reader.unstuffed_dots
        rest = chunk[stop:]
    if rest:
        r, d = reader.take_rest(rest)
        raw += r
        data += d
    return bytes(raw), bytes(data), None, reader.unstuffed_dots


@SETTINGS
@given(
    tokens=st.lists(st.sampled_from(CRLF_TOKENS), max_size=60),
    bare_lf=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_scan_matches_reference_whatever_the_cuts(
    tokens: list[bytes], bare_lf: bool, seed: int
) -> None:
    body = b"".join(tokens)
    rng = random.Random(seed)
    cuts = [rng.randrange(len(body) + 20) for _ in range(rng.randrange(6))]
    want, end, unstuffed = reference(body, bare_lf=bare_lf)
    for prefix in (b"", b"+OK here.\r\n"):
        for split in (cuts, list(range(len(prefix) + len(body)))):
            raw, data, got_end, got_unstuffed = scan_in_pieces(prefix, body, split, bare_lf=bare_lf)
            assert (data, got_end, got_unstuffed) == (want, end, unstuffed)
            assert raw == body[:end]  # every body byte up to the terminator, once


@SETTINGS
@given(tokens=st.lists(st.sampled_from(LF_TOKENS), max_size=60), seed=st.integers(0, 2**32))
def test_bare_lf_scan_matches_reference(tokens: list[bytes], seed: int) -> None:
    body = b"".join(tokens)
    rng = random.Random(seed)
    cuts = [rng.randrange(len(body) + 20) for _ in range(rng.randrange(6))]
    want, end, unstuffed = reference(body, bare_lf=True)
    raw, data, got_end, got_unstuffed = scan_in_pieces(b"", body, cuts, bare_lf=True)
    assert (data, got_end, got_unstuffed) == (want, end, unstuffed)
    assert raw == body[:end]


def test_dense_dots_and_dot_free_bodies_agree_with_reference() -> None:
    """Many dots inside lines (the pattern takes over) and none at all (memchr only)."""
    text = b"Hello there. Dots. Everywhere... in. lines.\r\n..stuffed\r\n" * 500
    plain = (b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\r\n" * 3000) + b"..x\r\n" + b"ab\r\n" * 9
    for body in (text + b".\r\n", plain + b".\r\n", text + plain + b".\r\n"):
        want, end, unstuffed = reference(body, bare_lf=False)
        raw, data, got_end, got_unstuffed = scan_in_pieces(b"", body, [], bare_lf=False)
        assert (data, got_end, got_unstuffed) == (want, end, unstuffed)
        assert raw + b".\r\n" == body
