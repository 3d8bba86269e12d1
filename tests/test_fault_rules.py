"""Fault rules: the grammar (round trip, errors that point), the matcher and the reply shaper."""

from __future__ import annotations

import itertools
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popproxy.core.events import State
from popproxy.faults import (
    FaultFileError,
    FaultSet,
    FaultSyntaxError,
    Rule,
    format_rule,
    load_rules,
    parse_rule,
    parse_rules,
)
from popproxy.faults import rules as r
from popproxy.faults.shape import (
    Close,
    Forward,
    Hang,
    Originate,
    Pause,
    ReplyShaper,
    Watch,
    Withhold,
    shape_whole,
)

# ------------------------------------------------------------------ examples


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("RETR 2: cut after 1000", Rule(r.Match("RETR", "2"), r.Cut(1000))),
        (
            "AUTH: -ERR [SYS/TEMP] try later",
            Rule(r.Match("AUTH"), r.Answer(b"-ERR [SYS/TEMP] try later\r\n")),
        ),
        (
            "*: delay 200ms p=0.1 seed=7",
            Rule(r.Match("*"), r.Delay(r.Fixed(0.2)), p=0.1, seed=7),
        ),
        ("retr 1: cut after rst", Rule(r.Match("RETR", "1"), r.Cut(None, "rst"))),
        ("RETR 1: cut", Rule(r.Match("RETR", "1"), r.Cut(0))),
        ("RETR 1: cut before", Rule(r.Match("RETR", "1"), r.Cut(0))),
        (
            "LIST: +ERR seen in the wild",
            Rule(r.Match("LIST"), r.Answer(b"+ERR seen in the wild\r\n")),
        ),
        ("RETR *: throttle 10KiB/s", Rule(r.Match("RETR", "*"), r.Throttle(10240))),
        ("STAT: stall", Rule(r.Match("STAT"), r.Stall())),
        ("RETR 1: stall after 4KiB", Rule(r.Match("RETR", "1"), r.Stall(4096))),
        ("greeting: delay 2s", Rule(r.Match("greeting"), r.Delay(r.Fixed(2.0)))),
        (
            "*: delay uniform(100ms, 1s)",
            Rule(r.Match("*"), r.Delay(r.Uniform(0.1, 1.0))),
        ),
        ("*: delay exp(50ms)", Rule(r.Match("*"), r.Delay(r.Exponential(0.05)))),
        ("TOP * *: corrupt bare-lf", Rule(r.Match("TOP", "* *"), r.Corrupt(r.Corruption.BARE_LF))),
        (
            "RETR 1: corrupt no-terminator nth=2 state=transaction",
            Rule(
                r.Match("RETR", "1", nth=2, state=State.TRANSACTION),
                r.Corrupt(r.Corruption.NO_TERMINATOR),
            ),
        ),
        ("NOOP: inactivity", Rule(r.Match("NOOP"), r.Inactivity())),
        (
            "NOOP: inactivity 2s -ERR autologout",
            Rule(r.Match("NOOP"), r.Inactivity(2.0, b"-ERR autologout\r\n")),
        ),
        ("*: idle 30s", Rule(r.Match("*"), r.Idle(30.0))),
        ("CAPA: advertise xoauth2", Rule(r.Match("CAPA"), r.Advertise("XOAUTH2"))),
        (
            "PASS: -ERR [IN-USE] locked user=al* session=2",
            Rule(r.Match("PASS", user="al*", session=2), r.Answer(b"-ERR [IN-USE] locked\r\n")),
        ),
        ('USER: "+OK\\r\\n\\x00"', Rule(r.Match("USER"), r.Answer(b"+OK\r\n\x00"))),
        ('NOOP: -ERR say "hi"', Rule(r.Match("NOOP"), r.Answer(b'-ERR say "hi"\r\n'))),
        ("NOOP: -ERR a=b", Rule(r.Match("NOOP"), r.Answer(b"-ERR a=b\r\n"))),
    ],
)
def test_examples_parse_and_round_trip(text: str, expected: Rule) -> None:
    rule = parse_rule(text)
    assert rule == expected
    assert parse_rule(format_rule(rule)) == rule


@pytest.mark.parametrize(
    ("text", "column", "words"),
    [
        ("RETR 1 cut", 11, "no ':'"),
        ("RETR 1: cutt after 10", 9, "unknown action 'cutt'"),
        ("RETR 1: cut after 1kb", 19, "not a byte count"),
        ("*: delay 2 sec", 10, "not a time: '2'"),
        ("*: delay 2s p=2", 15, "p= takes a probability"),
        ("*: delay 2s p=0.5 p=0.5", 19, "given twice"),
        ("R?TR: stall", 1, "not a POP3 command verb"),
        ("*  foo: stall", 4, "takes no argument pattern"),
        ("greeting: stall nth=2", 17, "no nth="),
        ("RETR: corrupt bits", 15, "unknown corruption"),
        ("RETR: stall later", 13, "expected 'after N'"),
        ('RETR: "-ERR x', 7, "unterminated string"),
        ('RETR: "-ERR \\q"', 13, "unknown escape"),
        ("RETR: delay lognormal(1s)", 13, "unknown distribution"),
        ("RETR: delay uniform(2s,1s)", 13, "low is above high"),
        ("RETR: delay uniform(1s,zz)", 24, "not a time: 'zz'"),
        ("RETR: state=nowhere", 7, "expected an action"),
        ("RETR: stall state=nowhere", 19, "state= takes"),
        ("LIST: advertise X", 1, "applies to CAPA"),
        ("RETR:", 6, "expected an action"),
        ("RETR: -ERR \u00e9t\u00e9", 12, "non-ASCII"),
        ("RETR: throttle fast", 16, "not a rate"),
        ("RETR: throttle 0B/s", 16, "at least 1B/s"),
        ("RETR: stall nth=0", 17, "whole number from 1"),
    ],
)
def test_errors_name_the_column(text: str, column: int, words: str) -> None:
    with pytest.raises(FaultSyntaxError) as info:
        parse_rule(text)
    assert words in info.value.message
    assert info.value.column == column, str(info.value)
    assert "\n" not in str(info.value)


def test_files_have_comments_blank_lines_and_point_at_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "faults.txt"
    path.write_text("# chaos for the nightly run\n\nRETR 1: cut after 500\n  *: delay 20ms  # no\n")
    with pytest.raises(FaultFileError) as info:
        load_rules(path)
    assert str(info.value).startswith(f"{path}:4:")  # "# no" is not a comment mid-line
    path.write_text("# chaos\n\nRETR 1: cut after 500\n   *: delay 20ms p=0.5\n")
    assert [x.text for x in load_rules(path)] == ["RETR 1: cut after 500", "*: delay 20ms p=0.5"]
    path.write_text("ok: stall\n   *: delay zz\n")
    with pytest.raises(FaultFileError) as info:
        load_rules(path)
    assert str(info.value) == f"{path}:2:13: not a time: 'zz' (e.g. 200ms, 1.5s, 2m)"
    path.write_bytes(b"RETR: stall\n\xff\n")
    with pytest.raises(FaultFileError, match=":2:1: not UTF-8"):
        load_rules(path)
    with pytest.raises(FaultFileError, match="cannot read"):
        load_rules(tmp_path / "missing")


# ------------------------------------------------------------------ properties of the grammar

_ms = st.integers(0, 10**7).map(lambda ms: ms / 1000)
_size = st.integers(0, 1 << 40)
_reply_text = st.text(string.ascii_letters + string.digits + " []/.,!?=-*'", max_size=40)
_bare_reply = st.builds(
    lambda status, text: (status + (" " + text.strip() if text.strip() else "")).encode() + b"\r\n",
    st.sampled_from(["+OK", "-ERR", "+ERR", "-", "+"]),
    _reply_text,
)
_reply = st.one_of(_bare_reply, st.binary(min_size=1, max_size=40))
_duration = st.one_of(
    st.builds(r.Fixed, _ms),
    st.tuples(_ms, _ms).map(lambda t: r.Uniform(min(t), max(t))),
    st.builds(r.Exponential, _ms),
    st.builds(r.Normal, _ms, _ms),
)
_action = st.one_of(
    st.builds(r.Answer, _reply),
    st.builds(r.Delay, _duration, _size),
    st.builds(r.Stall, _size),
    st.builds(r.Cut, st.one_of(st.none(), _size), st.sampled_from([r.FIN, r.RST])),
    st.builds(r.Throttle, st.integers(1, 1 << 40), _size),
    st.builds(r.Corrupt, st.sampled_from(list(r.Corruption))),
    st.builds(r.Inactivity, _ms, _reply),
    st.builds(r.Idle, _ms),
)
_word = st.text(string.ascii_letters + string.digits + "*?.[]!<>@", min_size=1, max_size=8)


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    verb = draw(st.sampled_from(["RETR", "TOP", "LIST", "USER", "PASS", "CAPA", "XTND", "*"]))
    action = draw(
        st.one_of(
            _action,
            st.builds(r.Advertise, st.from_regex(r"[A-Z0-9_-]{1,20}", fullmatch=True), _reply),
        )
        if verb in ("CAPA", "*")
        else _action
    )
    if draw(st.booleans()) and not isinstance(action, r.Advertise):
        verb = "greeting"
    args = None
    if verb not in ("*", "greeting"):
        args = draw(st.one_of(st.none(), st.lists(_word, min_size=1, max_size=3).map(" ".join)))
    single = verb == "greeting"
    match = r.Match(
        verb,
        args,
        nth=None if single else draw(st.one_of(st.none(), st.integers(1, 10**6))),
        session=draw(st.one_of(st.none(), st.integers(1, 10**6))),
        state=None if single else draw(st.one_of(st.none(), st.sampled_from(list(State)))),
        user=None if single else draw(st.one_of(st.none(), _word)),
    )
    p = draw(st.one_of(st.none(), st.floats(0, 1, exclude_min=True)))
    seed = draw(st.one_of(st.none(), st.integers(0, 1 << 40)))
    return Rule(match, action, p, seed)


@given(rules())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_rule_to_text_to_rule(rule: Rule) -> None:
    text = format_rule(rule)
    assert "\n" not in text
    assert parse_rule(text) == rule


@given(st.text(max_size=80))
@settings(max_examples=500)
def test_any_text_parses_or_fails_in_one_line(text: str) -> None:
    _parses_or_fails_in_one_line(text)


def _parses_or_fails_in_one_line(text: str) -> None:
    try:
        rule = parse_rule(text)
    except FaultSyntaxError as exc:
        assert 1 <= exc.column <= len(text) + 1
        assert "\n" not in str(exc)
    else:
        assert parse_rule(format_rule(rule)) == rule


@given(
    st.lists(
        st.sampled_from(
            [
                "RETR",
                "1:",
                "cut",
                "after",
                "-ERR",
                "x",
                "p=0.5",
                "delay",
                "2s",
                "*",
                '"',
                "\\",
                "(",
                ")",
                ",",
                "=",
                "uniform(1s,",
                "seed=1",
                "nth=2",
                "state=UPDATE",
                "user=a",
                "#",
                " ",
                "\t",
            ]
        ),
        max_size=10,
    ).map("".join)
)
@settings(max_examples=500)
def test_near_miss_texts_parse_or_fail_in_one_line(text: str) -> None:
    _parses_or_fails_in_one_line(text)


@given(st.text(max_size=300))
@settings(max_examples=200)
def test_any_file_reads_or_fails_in_one_line(text: str) -> None:
    try:
        parse_rules(text, "f")
    except FaultFileError as exc:
        assert str(exc).startswith("f:") and "\n" not in str(exc)


# ------------------------------------------------------------------ the matcher


def _fire(
    faults: FaultSet, commands: list[tuple[str, str | None]], session: int = 1
) -> list[int | None]:
    s = faults.session(session)
    out = []
    for verb, args in commands:
        inj = s.command(verb, args, State.TRANSACTION, "alice")
        out.append(None if inj is None else inj.index)
    return out


def test_nth_counts_what_the_rule_selects_even_when_an_earlier_rule_fires() -> None:
    faults = FaultSet([parse_rule("RETR 1: stall nth=1"), parse_rule("RETR: cut nth=2")])
    cmds = [("RETR", "1"), ("RETR", "2"), ("RETR", "3"), ("STAT", None)]
    assert _fire(faults, cmds) == [1, 2, None, None]


def test_state_user_session_and_argument_patterns() -> None:
    faults = FaultSet(
        [
            parse_rule("PASS: -ERR [IN-USE] locked state=AUTHORIZATION user=bob"),
            parse_rule("TOP * 0: stall"),
            parse_rule("RETR: stall session=2"),
        ]
    )
    s = faults.session(1)
    assert s.command("PASS", "x", State.AUTHORIZATION, "alice") is None
    assert s.command("PASS", "x", State.TRANSACTION, "bob") is None
    assert s.command("pass", "x", State.AUTHORIZATION, "bob") is not None
    assert s.command("TOP", "3  0", State.TRANSACTION, "bob") is not None  # spaces normalised
    assert s.command("TOP", "3 10", State.TRANSACTION, "bob") is None
    assert s.command("RETR", "1", State.TRANSACTION, "bob") is None
    assert faults.session(2).command("RETR", "1", State.TRANSACTION, "bob") is not None


def test_advertised_mechanism_is_refused() -> None:
    faults = FaultSet([parse_rule("CAPA: advertise XOAUTH2 -ERR [AUTH] no")])
    s = faults.session(1)
    assert s.command("AUTH", "XOAUTH2 abc", None, None) is None  # not advertised yet
    assert s.command("CAPA", None, None, None) is not None
    refusal = s.command("AUTH", "xoauth2 abc", None, None)
    assert refusal is not None and refusal.action == r.Answer(b"-ERR [AUTH] no\r\n")


_commands = st.lists(
    st.tuples(
        st.sampled_from(["RETR", "TOP", "LIST", "NOOP", "STAT"]),
        st.sampled_from([None, "1", "2", "1 0"]),
    ),
    max_size=40,
)


@given(st.lists(rules(), max_size=5), _commands, st.integers(0, 2**32), st.integers(1, 5))
@settings(max_examples=200)
def test_matching_is_reproducible_and_nth_fires_once(
    loaded: list[Rule], commands: list[tuple[str, str | None]], seed: int, session: int
) -> None:
    first = _fire(FaultSet(loaded, seed=seed), commands, session)
    assert _fire(FaultSet(loaded, seed=seed), commands, session) == first
    for index, rule in enumerate(loaded, 1):
        if rule.match.nth is not None:
            assert first.count(index) <= 1
        if rule.match.verb not in {v for v, _ in commands} | {"*"}:
            assert index not in first


@given(_commands, st.integers(0, 2**32))
def test_probability_draws_are_per_seed(commands: list[tuple[str, str | None]], seed: int) -> None:
    always = _fire(FaultSet([parse_rule(f"*: stall p=1 seed={seed}")]), commands)
    assert always == [1] * len(commands)
    half = [parse_rule(f"*: stall p=0.5 seed={seed}")]
    assert _fire(FaultSet(half, seed=1), commands) == _fire(FaultSet(half, seed=2), commands)


# ------------------------------------------------------------------ the shaper

BODY = b"+OK 40 octets\r\nSubject: x\r\n..dotted\r\n\r\nline\r\n.\r\n"


def _shape(rule: str, reply: bytes = BODY, multiline: bool = True) -> list[object]:
    inj = FaultSet([parse_rule(rule)]).session(1).command("RETR", "1", None, None)
    assert inj is not None
    return list(shape_whole(inj, reply, multiline=multiline))


def _wire(steps: list[object]) -> bytes:
    return b"".join(s.data for s in steps if isinstance(s, Forward | Originate))


def test_each_action_shapes_a_reply() -> None:
    assert _wire(_shape("RETR: cut after 10")) == BODY[:10]
    assert isinstance(_shape("RETR: cut after 10 rst")[1], Close)
    assert _shape("RETR: cut")[0] == Close(
        "fin", "fault rule 1 (RETR: cut before): cut before the reply (FIN)"
    )
    assert _wire(_shape("RETR: cut after")) == BODY and isinstance(
        _shape("RETR: cut after")[-1], Close
    )
    assert _wire(_shape("RETR: cut after 1000")) == BODY  # shorter than 1000: cut after it
    assert _wire(_shape("RETR: -ERR [IN-USE] busy")) == b"-ERR [IN-USE] busy\r\n"
    assert _wire(_shape("RETR: corrupt bare-lf")) == BODY.replace(b"\r\n", b"\n")
    assert _wire(_shape("RETR: corrupt unstuffed")) == BODY.replace(b"..dotted", b".dotted")
    assert _wire(_shape("RETR: corrupt no-terminator")) == BODY[:-3]
    assert _wire(_shape("RETR: corrupt unstuffed", b"-ERR ..x\r\n", False)) == b"-ERR ..x\r\n"
    stall = _shape("RETR: stall after 5")
    assert _wire(stall) == BODY[:5] and isinstance(stall[1], Hang)
    delay = _shape("RETR: delay 2s after 5")
    assert [type(s) for s in delay] == [Forward, Pause, Forward] and delay[1].seconds == 2.0  # type: ignore[attr-defined]
    throttle = _shape("RETR: throttle 20B/s")
    assert _wire(throttle) == BODY
    assert sum(s.seconds for s in throttle if isinstance(s, Pause)) == pytest.approx(len(BODY) / 20)
    watch = _shape("RETR: inactivity 1s")
    assert _wire(watch) == BODY and watch[-1] == Watch(1.0, r.INACTIVITY_REPLY, watch[-1].why)  # type: ignore[attr-defined]
    idle = _shape("RETR: idle 3s")
    assert isinstance(idle[-1], Watch) and idle[-1].reply is None


def test_advertise_adds_to_the_sasl_line_or_adds_one() -> None:
    capa = b"+OK\r\nTOP\r\nSASL PLAIN LOGIN\r\n.\r\n"
    inj = (
        FaultSet([parse_rule("CAPA: advertise XOAUTH2")])
        .session(1)
        .command("CAPA", None, None, None)
    )
    assert inj is not None
    assert (
        _wire(shape_whole(inj, capa, multiline=True))
        == b"+OK\r\nTOP\r\nSASL PLAIN LOGIN XOAUTH2\r\n.\r\n"
    )
    bare = b"+OK\r\nTOP\r\n.\r\n"
    assert _wire(shape_whole(inj, bare, multiline=True)) == b"+OK\r\nTOP\r\nSASL XOAUTH2\r\n.\r\n"


_shaping_rules = st.sampled_from(
    [
        "RETR: cut after 7",
        "RETR: cut after",
        "RETR: cut",
        "RETR: stall after 12",
        "RETR: delay 1s after 3",
        "RETR: throttle 7B/s after 2",
        "RETR: corrupt bare-lf",
        "RETR: corrupt unstuffed",
        "RETR: corrupt no-terminator",
        "RETR: -ERR no",
        "RETR: idle 1s",
        "RETR: inactivity",
    ]
)
_bodies = st.lists(
    st.sampled_from([b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"x\r\n", b"..x\r\n", b".\r\n"]),
    max_size=20,
).map(lambda parts: b"+OK\r\n" + b"".join(parts) + b"\r\n.\r\n")


@given(_shaping_rules, _bodies, st.lists(st.integers(0, 200), max_size=6))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_shaping_accounts_for_every_byte_whatever_the_segmentation(
    rule: str, reply: bytes, cuts: list[int]
) -> None:
    inj = FaultSet([parse_rule(rule)]).session(1).command("RETR", "1", None, None)
    assert inj is not None
    whole = shape_whole(inj, reply, multiline=True)
    shaper = ReplyShaper(inj, multiline=True)
    steps = list(shaper.begin())
    bounds = sorted({min(c, len(reply)) for c in cuts} | {0, len(reply)})
    for lo, hi in itertools.pairwise(bounds):
        steps += shaper.feed(reply[lo:hi])
    steps += shaper.finish()
    fed = b"".join(s.data for s in steps if isinstance(s, Forward | Withhold))
    assert fed == reply  # every byte forwarded or withheld, once, in order
    assert _wire(steps) == _wire(list(whole))  # what the client gets does not depend on reads
    ends = [type(s) for s in steps if isinstance(s, Close | Hang)]
    assert ends == [type(s) for s in whole if isinstance(s, Close | Hang)]


@given(st.binary(max_size=400))
@settings(max_examples=200)
def test_any_file_bytes_read_or_fail_in_one_line(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("f") / "faults.txt"
    path.write_bytes(data)
    try:
        load_rules(path)
    except FaultFileError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
