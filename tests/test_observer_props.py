"""Property tests for the observer: no exceptions, no lost bytes, segmentation independence."""

from __future__ import annotations

import base64
import random

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from popproxy.core import (
    BodyChunk,
    Command,
    Direction,
    Observer,
    Reply,
    SaslResponse,
    Unsolicited,
)
from tests.test_observer import (
    CASES,
    GREETING,
    Case,
    GoOpaque,
    Step,
    Tls,
    assert_contiguous,
    bytewise,
    canonical,
    covered,
    feed,
    of,
    random_splitter,
    rebuild,
    script_input,
    whole,
)

C = Direction.CLIENT
S = Direction.SERVER

SETTINGS = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- (a) fuzz

FRAGMENTS = [
    b"+OK",
    b"-ERR",
    b"+ ",
    b"+",
    b"+ERR",
    b".",
    b"..",
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"AUTH PLAIN",
    b"AUTH LOGIN",
    b"AUTH",
    b"STLS",
    b"RETR 1",
    b"LIST",
    b"LIST 1",
    b"UIDL",
    b"CAPA",
    b"PASS secretpw",
    b"APOP u 0123",
    b"QUIT",
    b"*",
    b"TOP 1 0",
    b"dGVzdA==",
    b"<1.2@h>",
    b"\x00",
    b"\xff",
]

chunk = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=12)), max_size=12).map(
    b"".join
)

fuzz_step: st.SearchStrategy[Step] = st.one_of(
    st.tuples(st.sampled_from([C, S]), chunk),
    st.tuples(st.sampled_from([C, S]), st.just(b"")),
    st.builds(Tls, st.sampled_from([C, S]), st.booleans()),
    st.builds(GoOpaque, st.sampled_from([C, S])),
)


@SETTINGS
@given(
    steps=st.lists(fuzz_step, max_size=40),
    max_line=st.sampled_from([4, 16, 8192]),
    max_pending=st.sampled_from([2, 100_000]),
)
def test_arbitrary_input_never_raises_and_loses_nothing(
    steps: list[Step], max_line: int, max_pending: int
) -> None:
    events, obs = feed(steps, whole, Observer(max_line=max_line, max_pending=max_pending))
    # Every byte fed lands in exactly one RawEvent, in stream order, once the peers close.
    events += obs.receive_data(C, b"") + obs.receive_data(S, b"")
    assert rebuild(events) == script_input(steps)
    assert_contiguous(events)
    assert obs.settled(C) <= len(script_input(steps)[C])


@SETTINGS
@given(
    steps=st.lists(st.tuples(st.sampled_from([C, S]), chunk), max_size=30),
    seed=st.integers(0, 2**32),
)
def test_arbitrary_input_is_segmentation_independent(steps: list[Step], seed: int) -> None:
    ref, _ = feed([*steps, (C, b""), (S, b"")], whole, Observer(max_line=16))
    got, _ = feed(
        [*steps, (C, b""), (S, b"")], random_splitter(random.Random(seed)), Observer(max_line=16)
    )
    assert canonical(got) == canonical(ref)


# --------------------------------------------------------------------------- (b) scripts


@SETTINGS
@given(
    c=st.sampled_from([c for c in CASES if c.name != "pipelining-10000"]),
    seed=st.integers(0, 2**32),
)
def test_scripts_random_splits(c: Case, seed: int) -> None:
    ref, _ = feed(c.steps, whole, Observer(**c.options))
    got, obs = feed(c.steps, random_splitter(random.Random(seed), 30), Observer(**c.options))
    assert rebuild(got) == script_input(c.steps)
    assert canonical(got) == canonical(ref)
    c.check(canonical(got), obs, script_input(c.steps))


def test_pipelining_script_random_splits() -> None:
    (c,) = [c for c in CASES if c.name == "pipelining-10000"]
    ref = canonical(feed(c.steps)[0])
    for seed in range(3):
        got, _ = feed(c.steps, random_splitter(random.Random(seed), 500))
        assert canonical(got) == ref


# ------------------------------------------------------------------ (b) generated sessions

body_line = st.one_of(
    st.sampled_from([b"", b".", b"..", b".x", b"+OK", b"-ERR x", b"+ ", b"+", b"\r"]),
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")),
)


@st.composite
def exchange(draw: st.DrawFn, eol: bytes) -> tuple[bytes, bytes, str, bytes | None]:
    """(client line, server reply, verb, unstuffed body or None)."""
    kind = draw(
        st.sampled_from(
            ["NOOP", "STAT", "RETR", "RETR-ERR", "LIST", "UIDL1", "TOP", "CAPA", "XFOO"]
        )
    )
    if kind in ("RETR", "TOP"):
        lines = draw(st.lists(body_line, max_size=8))
        data = b"".join(line + eol for line in lines)
        stuffed = b"".join((b"." + x if x.startswith(b".") else x) + eol for x in lines)
        cmd = b"RETR 1" if kind == "RETR" else b"TOP 1 3"
        return cmd + eol, b"+OK" + eol + stuffed + b"." + eol, kind, data
    if kind == "LIST":
        n = draw(st.integers(0, 4))
        data = b"".join(b"%d %d" % (i, i * 10) + eol for i in range(1, n + 1))
        return b"LIST" + eol, b"+OK %d messages" % n + eol + data + b"." + eol, kind, data
    if kind == "CAPA":
        data = b"TOP" + eol + b"UIDL" + eol
        return b"CAPA" + eol, b"+OK" + eol + data + b"." + eol, kind, data
    reply = {
        "NOOP": b"+OK",
        "STAT": b"+OK 2 20",
        "RETR-ERR": b"-ERR no such message",
        "UIDL1": b"+OK 1 abc",
        "XFOO": b"-ERR unknown",
    }[kind]
    cmd = {
        "NOOP": b"NOOP",
        "STAT": b"STAT",
        "RETR-ERR": b"RETR 9",
        "UIDL1": b"UIDL 1",
        "XFOO": b"XFOO bar",
    }[kind]
    return cmd + eol, reply + eol, cmd.split()[0].decode(), None


@st.composite
def session(draw: st.DrawFn) -> tuple[list[Step], list[tuple[str, bytes | None]]]:
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    steps: list[Step] = [
        (S, b"+OK ready" + eol),
        (C, b"USER u" + eol + b"PASS p w" + eol),
        (S, b"+OK" + eol + b"+OK" + eol),
    ]
    expected: list[tuple[str, bytes | None]] = [("USER", None), ("PASS", None)]
    batches = draw(st.lists(st.lists(exchange(eol), min_size=1, max_size=4), max_size=6))
    for batch in batches:  # a pipelined batch: commands in one write, replies in one write
        steps.append((C, b"".join(x[0] for x in batch)))
        steps.append((S, b"".join(x[1] for x in batch)))
        expected += [(x[2], x[3]) for x in batch]
    steps += [(C, b"QUIT" + eol), (S, b"+OK bye" + eol), (S, b""), (C, b"")]
    return steps, [*expected, ("QUIT", None)]


@SETTINGS
@given(s=session(), seed=st.integers(0, 2**32))
def test_generated_sessions(
    s: tuple[list[Step], list[tuple[str, bytes | None]]], seed: int
) -> None:
    steps, expected = s
    ref, _ = feed(steps)
    got, _ = feed(steps, random_splitter(random.Random(seed), 40))
    assert rebuild(got) == script_input(steps)
    events = canonical(got)
    assert events == canonical(ref)
    cmds = of(events, Command)
    reps = of(events, Reply)
    assert [c.verb for c in cmds] == [v.split("-")[0] for v, _ in expected]
    assert [r.seq for r in reps] == [c.seq for c in cmds]
    for cmd, (_, body) in zip(cmds, expected, strict=True):
        if body is not None:
            assert b"".join(b.data for b in of(events, BodyChunk) if b.seq == cmd.seq) == body
    assert of(events, Unsolicited) == []


def test_generated_session_bytewise_example() -> None:
    steps: list[Step] = [(S, GREETING), (C, b"RETR 1\r\n"), (S, b"+OK\r\n..\r\n.\r\n")]
    assert canonical(feed(steps, bytewise)[0]) == canonical(feed(steps)[0])


# --------------------------------------------------------------------------- (c) secrets

password = (
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40)
    .filter(lambda p: p.strip() != "")
    .map(lambda p: p.encode())
)


def _covers(events: list[object], stream: bytes, needle: bytes) -> None:
    at = stream.rindex(needle)  # the credential is the last occurrence in these scripts
    missing = set(range(at, at + len(needle))) - covered(events, C)  # type: ignore[arg-type]
    assert not missing, (needle, sorted(missing)[:10])


@SETTINGS
@example(pw=b"  lead and trail  ", how="pass", ok=False, seed=0)
@example(pw=b"user", how="pass", ok=True, seed=0)
@example(pw=b"*", how="pass", ok=True, seed=0)
@given(
    pw=password,
    how=st.sampled_from(["pass", "plain-ir", "plain", "login", "pipelined"]),
    ok=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_password_bytes_always_covered(pw: bytes, how: str, ok: bool, seed: int) -> None:
    final = b"+OK Logged in.\r\n" if ok else b"-ERR [AUTH] Authentication failed.\r\n"
    plain = base64.b64encode(b"\x00user\x00" + pw)
    if how == "pass":
        line = b"PASS " + pw + b"\r\n"
        steps: list[Step] = [
            (S, GREETING),
            (C, b"USER user\r\n"),
            (S, b"+OK\r\n"),
            (C, line),
            (S, final),
        ]
        needles = [pw]
    elif how == "plain-ir":
        steps = [(S, GREETING), (C, b"AUTH PLAIN " + plain + b"\r\n"), (S, final)]
        needles = [plain]
    elif how == "plain":
        steps = [
            (S, GREETING),
            (C, b"AUTH PLAIN\r\n"),
            (S, b"+ \r\n"),
            (C, plain + b"\r\n"),
            (S, final),
        ]
        needles = [plain]
    elif how == "login":
        b64 = base64.b64encode(pw)
        steps = [
            (S, GREETING),
            (C, b"AUTH LOGIN\r\n"),
            (S, b"+ VXNlcm5hbWU6\r\n"),
            (C, b"dXNlcg==\r\n"),
            (S, b"+ UGFzc3dvcmQ6\r\n"),
            (C, b64 + b"\r\n"),
            (S, final),
        ]
        needles = [b64]
    else:  # client sends the SASL response without waiting for the challenge
        steps = [
            (S, GREETING),
            (C, b"AUTH PLAIN\r\n" + plain + b"\r\nNOOP\r\n"),
            (S, b"+ \r\n"),
            (S, final + b"+OK\r\n"),
        ]
        needles = [plain]
    events, obs = feed(steps, random_splitter(random.Random(seed), 10))
    stream = script_input(steps)[C]
    for needle in needles:
        _covers(events, stream, needle)  # type: ignore[arg-type]
    assert obs.settled(C) == len(stream)
    text_fields = [getattr(e, f, None) for e in events for f in ("args", "text")]
    public = GREETING + b"USER user NOOP Logged in. [AUTH] Authentication failed. PLAIN LOGIN"
    if len(pw.strip()) >= 4 and pw not in public:
        assert all(pw.decode() not in t for t in text_fields if isinstance(t, str))
    if how == "pipelined":
        assert [r.raw for r in of(events, SaslResponse)] == [plain + b"\r\n"]
