"""Structural comparison of two POP3 sessions, exchange by exchange (for ``diff`` and replay)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from difflib import SequenceMatcher
from itertools import zip_longest
from typing import Any

from popproxy.capture.events import replay_events
from popproxy.capture.reader import CaptureReader
from popproxy.core.events import BodyChunk, BodyEnd, PopproxyDropped
from popproxy.core.transcript import Exchange, SessionSummary, TranscriptBuilder
from popproxy.inspect import metered_events

MASK = "#"
MAX_LISTING_DIFFS = 20  # per exchange; the rest is summed up in one more difference
MAX_OTHER = 10_000  # greetings and unsolicited lines kept aside while commands stream
VOLATILE_CAPABILITIES = frozenset({"IMPLEMENTATION"})  # RFC 2449 §6.9: free text


@dataclass(frozen=True, slots=True)
class Difference:
    """One way ``actual`` departs from ``expected``; ``seq`` is the expected exchange's.

    ``seq`` is None for session-level differences (greeting, unsolicited lines).
    """

    seq: int | None
    field: str
    expected: Any
    actual: Any
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "field": self.field,
            "expected": self.expected,
            "actual": self.actual,
            "note": self.note,
        }


def args_match(expected: str | None, actual: str | None, verb: str | None = None) -> bool:
    """Arguments are equal when each position matches or either side has ``#`` filler there.

    Credentials are compared by structure only: a PASS or RPOP matches whatever its
    password's length or leading blanks, an APOP when the user names match, an AUTH when
    the mechanism and the presence of an initial response match (the secrets themselves
    are redacted in the capture, docs/capture-format.md).
    """
    if expected is None or actual is None:
        return expected is actual
    if verb in ("PASS", "RPOP"):
        return True
    if verb in ("APOP", "AUTH"):
        want, got = expected.split(), actual.split()
        if verb == "AUTH":
            return [w.upper() for w in want[:1]] == [g.upper() for g in got[:1]] and (
                len(want) > 1
            ) == (len(got) > 1)
        return want[:1] == got[:1] and len(want) == len(got)
    if len(expected) != len(actual):
        return False
    return all(x in (y, MASK) or y == MASK for x, y in zip(expected, actual, strict=True))


Pair = Callable[[Exchange, Exchange, bool], list[Difference]]  # two aligned exchanges, strict


def label(ex: Exchange) -> str:
    """``VERB args`` of a command exchange, or the kind of any other one."""
    if ex.kind != "command":
        return ex.kind
    return f"{ex.command or '?'}{' ' + ex.args if ex.args else ''}"


def compare_exchanges(
    expected: Exchange, actual: Exchange, *, strict: bool = False
) -> list[Difference]:
    """Differences between two exchanges built with ``TranscriptBuilder(hash_bodies=True)``.

    Free text after the status (greeting banner, ``+OK Logged in.``, ``n octets``, APOP
    timestamps) is volatile and compared only with ``strict``; so are SASL challenges.
    """
    seq = expected.seq
    out: list[Difference] = []
    if expected.kind != actual.kind:
        return [Difference(seq, "kind", expected.kind, actual.kind)]
    if expected.kind == "command":
        if expected.command != actual.command:
            return [
                Difference(
                    seq,
                    "command",
                    label(expected),
                    label(actual),
                    "a different command: the sessions diverge here",
                )
            ]
        if not args_match(expected.args, actual.args, expected.command):
            out.append(Difference(seq, "args", expected.args, actual.args))
    if expected.status != actual.status:
        out.append(Difference(seq, "status", expected.status, actual.status))
        return out  # the rest of two different replies cannot be compared
    if expected.code != actual.code:
        out.append(Difference(seq, "code", expected.code, actual.code, "response code"))
    if strict and (expected.text or "") != (actual.text or ""):
        out.append(Difference(seq, "text", expected.text, actual.text))
    out.extend(_compare_value(expected, actual))
    if expected.multiline != actual.multiline:
        out.append(Difference(seq, "multiline", expected.multiline, actual.multiline))
        return out
    if expected.multiline:
        out.extend(_compare_body(expected, actual, strict))
    out.extend(_compare_sasl(expected, actual, strict))
    return out


def _compare_value(e: Exchange, a: Exchange) -> list[Difference]:
    """Single-line values: STAT's drop listing (RFC 1939 §5), ``LIST n``/``UIDL n`` (§5, §7)."""
    if e.value == a.value:
        return []
    names = {
        "STAT": ("stat.count", "stat.octets"),
        "LIST": ("list.msg", "list.size"),
        "UIDL": ("uidl.msg", "uidl.uid"),
    }.get(e.command or "")
    if names is None or e.value is None or a.value is None or len(e.value) != len(a.value):
        return [Difference(e.seq, "value", _plain(e.value), _plain(a.value), "parsed reply value")]
    return [
        Difference(e.seq, name, x, y)
        for name, x, y in zip(names, e.value, a.value, strict=False)
        if x != y
    ]


def _plain(value: tuple[object, ...] | None) -> list[object] | None:
    return None if value is None else list(value)


def _compare_body(e: Exchange, a: Exchange, strict: bool) -> list[Difference]:
    out: list[Difference] = []
    if e.truncated != a.truncated:
        out.append(Difference(e.seq, "truncated", e.truncated, a.truncated))
    if e.listing is not None and a.listing is not None:
        return out + _compare_listing(e, a, strict)
    if e.body_sha256 != a.body_sha256 or e.body_octets != a.body_octets:
        out.append(
            Difference(
                e.seq,
                "body",
                _body_ref(e),
                _body_ref(a),
                "message bodies differ (unstuffed octets and SHA-256)",
            )
        )
    return out


def _body_ref(ex: Exchange) -> dict[str, Any]:
    return {
        "seq": ex.seq,
        "octets": ex.body_octets,
        "lines": ex.body_lines,
        "sha256": ex.body_sha256,
    }


def _compare_listing(e: Exchange, a: Exchange, strict: bool) -> list[Difference]:
    assert e.listing is not None and a.listing is not None
    seq, verb = e.seq, e.command or ""
    if verb == "CAPA":

        def caps(listing: tuple[tuple[str, ...], ...]) -> set[str]:
            return {
                " ".join(x)
                for x in listing
                if x and (strict or x[0].upper() not in VOLATILE_CAPABILITIES)
            }

        have, got = caps(e.listing), caps(a.listing)
        if have == got:
            return []
        return [
            Difference(
                seq,
                "capabilities",
                sorted(have - got),
                sorted(got - have),
                "capabilities only in expected / only in actual",
            )
        ]
    if verb not in ("LIST", "UIDL"):
        if e.listing == a.listing:
            return []
        return [
            Difference(
                seq, "listing", [" ".join(x) for x in e.listing], [" ".join(x) for x in a.listing]
            )
        ]
    # RFC 1939 §5 scan listings and §7 unique-id listings: "msg value" per message.
    what = "size" if verb == "LIST" else "uid"
    mine = {x[0]: " ".join(x[1:]) for x in e.listing if x}
    theirs = {x[0]: " ".join(x[1:]) for x in a.listing if x}
    out: list[Difference] = []
    if len(e.listing) != len(a.listing):
        out.append(
            Difference(
                seq, "listing.count", len(e.listing), len(a.listing), "number of messages listed"
            )
        )
    differing = [
        n for n in _numeric_order(mine.keys() | theirs.keys()) if mine.get(n) != theirs.get(n)
    ]
    for n in differing[:MAX_LISTING_DIFFS]:
        note = (
            f"message {n} missing from actual"
            if n not in theirs
            else f"message {n} not in expected"
            if n not in mine
            else f"message {n} {what}"
        )
        out.append(Difference(seq, f"listing[{n}]", mine.get(n), theirs.get(n), note))
    if len(differing) > MAX_LISTING_DIFFS:
        out.append(
            Difference(
                seq,
                "listing",
                None,
                None,
                f"{len(differing) - MAX_LISTING_DIFFS} more messages differ",
            )
        )
    return out


def _numeric_order(keys: Iterable[str]) -> list[str]:
    return sorted(keys, key=lambda k: (0, int(k), k) if k.isdigit() else (1, 0, k))


def _compare_sasl(e: Exchange, a: Exchange, strict: bool) -> list[Difference]:
    if len(e.sasl) != len(a.sasl):
        return [
            Difference(
                e.seq,
                "sasl.steps",
                len(e.sasl),
                len(a.sasl),
                "number of SASL challenge/response lines (RFC 5034 §4)",
            )
        ]
    if not strict:
        return []  # challenges carry nonces (CRAM-MD5, SCRAM): volatile
    out = []
    for i, (x, y) in enumerate(zip(e.sasl, a.sasl, strict=True)):
        if x.get("from") == "server" and x.get("line") != y.get("line"):
            out.append(Difference(e.seq, f"sasl[{i}]", x.get("line"), y.get("line")))
    return out


def _pair(expected: Exchange, actual: Exchange, strict: bool) -> list[Difference]:
    return compare_exchanges(expected, actual, strict=strict)


def _only(ex: Exchange, note: str) -> str:
    """A note on an exchange one side lacks, naming what popproxy made of it."""
    if ex.command_by == "popproxy":
        return f"{note}: popproxy's own command"
    if ex.reply_by != "popproxy":
        return note
    if ex.kind != "command":
        return f"{note}: popproxy's own line"
    return f"{note}: popproxy answered it" + (f" ({ex.reply_why})" if ex.reply_why else "")


def compare_sessions(
    expected: Iterable[Exchange],
    actual: Iterable[Exchange],
    *,
    strict: bool = False,
    pair: Pair = _pair,
) -> Iterator[Difference]:
    """Compare two sessions' exchanges as they stream (both in capture order).

    Command exchanges are aligned by position (POP3 has no tags; order is the only key,
    RFC 2449 §6.6); a longer side yields "missing"/"extra" exchange differences.  The
    greeting and unsolicited lines are compared separately, after the commands, so that an
    extra ``-ERR Disconnected for inactivity`` does not shift every command.
    """
    e_other: list[Exchange] = []
    a_other: list[Exchange] = []
    pairs = zip_longest(_commands(expected, e_other), _commands(actual, a_other))
    for e, a in pairs:
        if e is None:
            assert a is not None
            note = _only(a, "extra exchange in actual")
            yield Difference(a.seq, "exchange", None, label(a), note)
        elif a is None:
            yield Difference(e.seq, "exchange", label(e), None, _only(e, "missing from actual"))
        else:
            yield from pair(e, a, strict)
    yield from _compare_others(e_other, a_other, strict, pair)


def _commands(exchanges: Iterable[Exchange], others: list[Exchange]) -> Iterator[Exchange]:
    for ex in exchanges:
        if ex.kind == "command":
            yield ex
        elif len(others) < MAX_OTHER:
            others.append(ex)


def _compare_others(
    e_other: list[Exchange], a_other: list[Exchange], strict: bool, pair: Pair = _pair
) -> Iterator[Difference]:
    e_greet = [x for x in e_other if x.kind == "greeting"]
    a_greet = [x for x in a_other if x.kind == "greeting"]
    for e, a in zip_longest(e_greet, a_greet):
        if e is None or a is None:
            yield Difference(
                None, "greeting", e and e.status, a and a.status, "greeting missing from one side"
            )
        else:
            for d in pair(e, a, strict):
                yield Difference(None, f"greeting.{d.field}", d.expected, d.actual, d.note)
    e_uns = [x for x in e_other if x.kind == "unsolicited"]
    a_uns = [x for x in a_other if x.kind == "unsolicited"]
    for i, (e, a) in enumerate(zip_longest(e_uns, a_uns)):
        if e is None or a is None:
            shown_e = e and f"{e.status} {e.text}"
            shown_a = a and f"{a.status} {a.text}"
            yield Difference(
                None,
                f"unsolicited[{i}]",
                shown_e,
                shown_a,
                _only(e or a, "unsolicited line on one side only"),
            )
        else:
            for d in pair(e, a, strict):
                yield Difference(None, f"unsolicited[{i}].{d.field}", d.expected, d.actual, d.note)


def capture_exchanges(
    reader: CaptureReader, progress: Callable[[int], None] | None = None
) -> Iterator[Exchange]:
    """A capture's exchanges in order, bodies hashed, unanswered ones last (streaming).

    ``progress`` is called now and then with the capture bytes read so far.
    """
    return iter(CaptureExchanges(reader, progress))


class CaptureExchanges:
    """``capture_exchanges``, with the session summary once they are all read."""

    def __init__(
        self, reader: CaptureReader, progress: Callable[[int], None] | None = None
    ) -> None:
        self._reader, self._progress = reader, progress
        self._builder = TranscriptBuilder(hash_bodies=True)

    @property
    def session(self) -> SessionSummary:
        return self._builder.session

    def __iter__(self) -> Iterator[Exchange]:
        builder = self._builder
        # An exchange is passed on once the observer has moved past it: the drop records
        # that say popproxy withheld its bytes follow them (docs/capture-format.md).
        done: list[Exchange] = []
        for _record, t, events in metered_events(self._reader, self._progress):
            items = builder.feed(t, events)
            moved = any(not isinstance(e, PopproxyDropped) for e in events)
            if done and moved and not builder.waiting:
                yield from done
                done = []
            done += [i.exchange for i in items if i.what == "done" and i.exchange is not None]
        yield from done
        yield from builder.unfinished()


# ----------------------------------------------------------------- body offsets

Path = str | os.PathLike[str]


def first_body_difference(path_a: Path, seq_a: int, path_b: Path, seq_b: int) -> int | None:
    """The first offset (in unstuffed body octets) where two recorded bodies differ.

    Streams both captures; None when the bodies are equal.  A shorter body differs at its
    own length.
    """
    return first_body_differences(path_a, path_b, [(seq_a, seq_b)]).get((seq_a, seq_b))


def first_body_differences(
    path_a: Path, path_b: Path, pairs: list[tuple[int, int]]
) -> dict[tuple[int, int], int | None]:
    """``first_body_difference`` for many (seq in A, seq in B) pairs in one pass of each file.

    Pairs must be in increasing order on both sides (exchanges are answered in order).
    """
    result: dict[tuple[int, int], int | None] = {}
    with CaptureReader(path_a) as ra, CaptureReader(path_b) as rb:
        bodies_a = _Bodies(ra, {p[0] for p in pairs})
        bodies_b = _Bodies(rb, {p[1] for p in pairs})
        for seq_a, seq_b in sorted(pairs):
            result[(seq_a, seq_b)] = _first_difference(bodies_a.read(seq_a), bodies_b.read(seq_b))
    return result


class _Bodies:
    """The unstuffed body chunks of wanted exchanges, read forward only."""

    def __init__(self, reader: CaptureReader, seqs: set[int]) -> None:
        self._it = self._chunks(reader, seqs)
        self._peek: tuple[int, bytes | None] | None = None

    @staticmethod
    def _chunks(reader: CaptureReader, seqs: set[int]) -> Iterator[tuple[int, bytes | None]]:
        for _record, _t, events in replay_events(reader):
            for event in events:
                if isinstance(event, BodyChunk) and event.seq in seqs and event.data:
                    yield event.seq, event.data
                elif isinstance(event, BodyEnd) and event.seq in seqs:
                    yield event.seq, None  # the end of that body

    def read(self, seq: int) -> Iterator[bytes]:
        while True:
            item = self._peek if self._peek is not None else next(self._it, None)
            self._peek = None
            if item is None:
                return
            got, data = item
            if got < seq:
                continue  # a body we are not asked about (or already past)
            if got > seq:
                self._peek = item
                return
            if data is None:
                return
            yield data


def _first_difference(a: Iterator[bytes], b: Iterator[bytes]) -> int | None:
    offset = 0
    buf_a = buf_b = b""
    while True:
        if not buf_a:
            buf_a = next(a, b"")
        if not buf_b:
            buf_b = next(b, b"")
        if not buf_a and not buf_b:
            return None
        if not buf_a or not buf_b:
            return offset  # one body ended here
        n = min(len(buf_a), len(buf_b))
        if buf_a[:n] != buf_b[:n]:
            return offset + next(i for i in range(n) if buf_a[i] != buf_b[i])
        offset += n
        buf_a, buf_b = buf_a[n:], buf_b[n:]


# ----------------------------------------------------------------- aligned comparison

MAX_ALIGNED = 50_000  # commands per side compared by alignment; beyond, by position
_UNKEYED_ARGS = frozenset({"PASS", "APOP", "AUTH", "RPOP"})  # credentials: the verb is the key


def align_key(ex: Exchange) -> str:
    """What must be equal for two command exchanges to be "the same step" of a session."""
    verb = (ex.command or "?").upper()
    if verb in _UNKEYED_ARGS:
        return verb
    return f"{verb} {ex.args}" if ex.args else verb


def align_sessions(
    expected: Iterable[Exchange],
    actual: Iterable[Exchange],
    *,
    strict: bool = False,
    pair: Pair = _pair,
) -> Iterator[Difference]:
    """Compare two recorded sessions of possibly different clients (``popproxy diff``).

    Command exchanges are aligned as sequences (the longest matching blocks, as ``diff``
    aligns lines), so one extra or missing command is one difference, not a shift of
    every later one. Aligned pairs are compared field by field; commands only one side has
    are reported as missing or extra; a run replaced by another is paired in order.
    """
    e_other: list[Exchange] = []
    a_other: list[Exchange] = []
    e_cmds = list(_commands(expected, e_other))
    a_cmds = list(_commands(actual, a_other))
    if len(e_cmds) > MAX_ALIGNED or len(a_cmds) > MAX_ALIGNED:
        yield from compare_sessions(e_cmds + e_other, a_cmds + a_other, strict=strict, pair=pair)
        return
    matcher = SequenceMatcher(
        None, [align_key(x) for x in e_cmds], [align_key(x) for x in a_cmds], autojunk=False
    )
    for op, e0, e1, a0, a1 in matcher.get_opcodes():
        if op == "equal":
            for e, a in zip(e_cmds[e0:e1], a_cmds[a0:a1], strict=True):
                yield from pair(e, a, strict)
            continue
        for e, a in zip_longest(e_cmds[e0:e1], a_cmds[a0:a1]):
            if e is None:
                assert a is not None
                note = _only(a, "only in actual (inserted)")
                yield Difference(a.seq, "exchange", None, label(a), note)
            elif a is None:
                note = _only(e, "only in expected (deleted)")
                yield Difference(e.seq, "exchange", label(e), None, note)
            else:
                yield Difference(e.seq, "command", label(e), label(a), "changed")
    yield from _compare_others(e_other, a_other, strict, pair)
