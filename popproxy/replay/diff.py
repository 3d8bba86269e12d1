"""``popproxy diff``: two captures compared exchange by exchange, and who made, withheld or cut
what (three actors: client, server, popproxy; docs/diff.md)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from typing import Any

from popproxy.capture.format import CaptureError
from popproxy.capture.reader import CaptureReader
from popproxy.core.transcript import Exchange, SessionSummary
from popproxy.replay.compare import (
    CaptureExchanges,
    Difference,
    align_sessions,
    compare_exchanges,
    first_body_differences,
)

SCHEMA_VERSION = 1  # docs/diff.schema.json
MAX_BODY_OFFSETS = 1000  # bodies whose first differing offset is looked up
Meter = Callable[[pathlib.Path, int], Callable[[int], None] | None]


def compare_pair(expected: Exchange, actual: Exchange, strict: bool) -> list[Difference]:
    """Two aligned exchanges: who made each part first, then what they say."""
    return actor_differences(expected, actual, strict=strict) + compare_exchanges(
        expected, actual, strict=strict
    )


def actor_differences(e: Exchange, a: Exchange, *, strict: bool = False) -> list[Difference]:
    """Where the two exchanges differ in who made, withheld or cut their bytes."""
    seq = e.seq
    out: list[Difference] = []
    if e.command_by != a.command_by:
        note = _which(e.command_by, a.command_by, "popproxy sent this command itself")
        out.append(Difference(seq, "command_by", e.command_by, a.command_by, note))
    if e.reply_by != a.reply_by:
        side, ex = ("A", e) if e.reply_by == "popproxy" else ("B", a)
        what = "withheld the server's reply" if ex.status is None else "answered"
        note = f"popproxy {what} in {side}" + (f": {ex.reply_why}" if ex.reply_why else "")
        out.append(Difference(seq, "reply_by", e.reply_by, a.reply_by, note))
    if _withheld_key(e, strict) != _withheld_key(a, strict):
        out.append(
            Difference(
                seq,
                "withheld",
                _withheld(e),
                _withheld(a),
                "the server's reply popproxy kept from the client",
            )
        )
    if _drop_keys(e.dropped, strict) != _drop_keys(a.dropped, strict):
        out.append(
            Difference(
                seq,
                "dropped",
                e.dropped or None,
                a.dropped or None,
                _dropped_note(e.dropped, a.dropped),
            )
        )
    if (e.truncated or a.truncated) and e.truncated_by != a.truncated_by:
        note = _which(e.truncated_by, a.truncated_by, "popproxy's close cut the body off")
        out.append(Difference(seq, "truncated_by", e.truncated_by, a.truncated_by, note))
    return out


def session_differences(
    e: SessionSummary,
    a: SessionSummary,
    e_whys: set[str],
    a_whys: set[str],
    *,
    strict: bool = False,
) -> list[Difference]:
    """Who ended each session, and popproxy's drops outside every exchange (``*_whys``:
    the drops the exchanges already carry)."""
    out: list[Difference] = []
    e_end, a_end = _first_close(e), _first_close(a)
    if e_end != a_end and (strict or "popproxy" in (_by(e_end), _by(a_end))):
        note = _which(_by(e_end), _by(a_end), "popproxy ended the session")
        out.append(Difference(None, "closed", e_end, a_end, f"who closed first; {note}"))
    carried = e_whys | a_whys
    e_rest = [d for d in e.dropped if d["why"] not in carried]
    a_rest = [d for d in a.dropped if d["why"] not in carried]
    if _drop_keys(e_rest, strict) != _drop_keys(a_rest, strict):
        note = _dropped_note(e_rest, a_rest) + " (outside any exchange)"
        out.append(Difference(None, "dropped", e_rest or None, a_rest or None, note))
    return out


def _which(e_by: str | None, a_by: str | None, what: str) -> str:
    if e_by == "popproxy" and a_by == "popproxy":
        return what + " in both, differently"
    if e_by == "popproxy":
        return what + " in A"
    return what + " in B" if a_by == "popproxy" else "a different peer in each"


def _withheld(ex: Exchange) -> dict[str, Any] | None:
    w = ex.withheld
    if w is None:
        return None
    return {k: w.get(k) for k in ("status", "code", "text", "why")}


def _withheld_key(ex: Exchange, strict: bool) -> tuple[Any, ...] | None:
    w = ex.withheld
    if w is None:
        return None
    # The free text after the status is volatile (RFC 1939 §3 leaves it to the server).
    return (w.get("status"), w.get("code"), w.get("why"), w.get("text") if strict else None)


def _drop_keys(dropped: list[dict[str, Any]], strict: bool) -> set[tuple[Any, ...]]:
    return {(d["from"], d["why"], d["octets"] if strict else None) for d in dropped}


def _dropped_note(e: list[dict[str, Any]], a: list[dict[str, Any]]) -> str:
    if e and a:
        return "popproxy did not forward different bytes in A and B"
    side = "A" if e else "B"
    if any(d["from"] == "client" for d in e or a):
        return f"popproxy did not forward the client's bytes in {side}: the server never got them"
    return f"popproxy did not forward the server's bytes in {side}: the client never got them"


def _first_close(session: SessionSummary) -> dict[str, Any] | None:
    if not session.closes:
        return None
    first = session.closes[0]
    return {"by": first["by"], "why": first["why"]}


def _by(close: dict[str, Any] | None) -> str | None:
    return None if close is None else close["by"]


def diff_captures(
    expected: pathlib.Path,
    actual: pathlib.Path,
    *,
    strict: bool = False,
    progress: Meter | None = None,
) -> tuple[list[Difference], list[str]]:
    """Every difference between two captures (aligned, bodies annotated with their first
    differing offset), and the readers' warnings. ``progress(path, size)`` may return a
    callback that is told the bytes read."""
    with CaptureReader(expected) as ra, CaptureReader(actual) as rb:
        side_a = CaptureExchanges(ra, progress(expected, ra.size) if progress else None)
        side_b = CaptureExchanges(rb, progress(actual, rb.size) if progress else None)
        carried: tuple[set[str], set[str]] = (set(), set())
        differences = list(
            align_sessions(
                _carrying(side_a, carried[0]),
                _carrying(side_b, carried[1]),
                strict=strict,
                pair=compare_pair,
            )
        )
        differences += session_differences(side_a.session, side_b.session, *carried, strict=strict)
        warnings = [str(w) for w in ra.warnings + rb.warnings]
    bodies = [d for d in differences if d.field == "body"][:MAX_BODY_OFFSETS]
    if not bodies:
        return differences, warnings
    pairs = [(int(d.expected["seq"]), int(d.actual["seq"])) for d in bodies]
    try:
        offsets = first_body_differences(expected, actual, pairs)
    except CaptureError as exc:  # the comparison above stands without offsets
        return differences, [*warnings, f"no body offsets: {exc}"]
    out = []
    for d in differences:
        if d.field == "body":
            offset = offsets.get((int(d.expected["seq"]), int(d.actual["seq"])))
            if offset is not None:
                note = f"{d.note}; first difference at body octet {offset}"
                d = Difference(d.seq, d.field, d.expected, d.actual, note)
        out.append(d)
    return out, warnings


def _carrying(side: CaptureExchanges, whys: set[str]) -> Iterator[Exchange]:
    """``side``'s exchanges, noting the whys of the drops they carry."""
    for ex in side:
        whys.update(d["why"] for d in ex.dropped)
        yield ex
