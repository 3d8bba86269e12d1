"""The filter language: parser, printer, errors, and verdicts on real Dovecot sessions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.capture.events import replay_events
from popproxy.capture.reader import CaptureReader
from popproxy.cli.main import main
from popproxy.inspect.filter import (
    OPERATORS,
    And,
    Each,
    Expr,
    FilterError,
    Not,
    Or,
    Pred,
    Scan,
    SessionFacts,
    parse,
    quick,
)
from popproxy.inspect.select import capture_matches, reader_facts
from tests.support.dovecot import DovecotServer
from tests.support.samples import record_samples

# ------------------------------------------------------------------- syntax


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("~c RETR", "~c RETR"),
        ("~c RETR & ~e", "~c RETR & ~e"),
        ("~c RETR ~e", "~c RETR & ~e"),  # juxtaposition is "and", as in mitmproxy
        ("~u alice | ~u bob & ~tls", "~u alice | ~u bob & ~tls"),
        ("(~u alice | ~u bob) & ~tls", "(~u alice | ~u bob) & ~tls"),
        ("!~e", "!~e"),
        ("not ~e and (~c TOP or ~c RETR)", "!~e & (~c TOP | ~c RETR)"),
        ("~e && !~tlsu || ~a bare-lf", "~e & !~tlsu | ~a bare-lf"),
        ("{~c RETR & ~e}", "{~c RETR & ~e}"),
        ('~b "hello world"', '~b "hello world"'),
        ("~b 'say \"hi\"'", '~b "say \\"hi\\""'),
        (r'~t "\d+"', r"~t \d+"),
        ("~h example.net:995", "~h example.net:995"),
        ("~u and", "~u and"),  # a keyword in a pattern's place is a pattern
    ],
)
def test_parse_and_print(text: str, canonical: str) -> None:
    expr = parse(text)
    assert str(expr) == canonical
    assert parse(canonical) == expr


def test_precedence_and_grouping() -> None:
    a, b, c = Pred("u", "a"), Pred("u", "b"), Pred("u", "c")
    assert parse("~u a | ~u b & ~u c") == Or(a, And(b, c))
    assert parse("!~u a & ~u b") == And(Not(a), b)
    assert parse("~u a & (~u b | ~u c)") == And(a, Or(b, c))
    assert parse("~u a & ~u b & ~u c") == And(And(a, b), c)
    assert parse("{~e}") == Each(Pred("e"))


@pytest.mark.parametrize(
    ("text", "column", "words"),
    [
        ("", 1, "empty filter"),
        ("~c", 3, "~c needs a pattern"),
        ("~c RETR &", 10, "expected a filter term"),
        ("(~e", 4, "expected ')'"),
        ("~e)", 3, "unexpected ')'"),
        ("~zz", 1, "unknown operator ~zz"),
        ("~", 1, "must be followed by an operator name"),
        ("alice", 1, "not a filter term"),
        ('~b "open', 4, "unterminated quoted string"),
        ("~b a[", 4, "bad pattern for ~b"),
        ("{~e", 4, "expected '}'"),
        ("(" * 100 + "~e" + ")" * 100, 65, "nested deeper"),
    ],
)
def test_errors_are_one_line_with_a_column(text: str, column: int, words: str) -> None:
    with pytest.raises(FilterError) as info:
        parse(text)
    assert info.value.column == column
    assert words in str(info.value)
    assert "\n" not in str(info.value)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([*"~()&|!{}\"'\\ abceu.*[x", "~c", "~tls", "and", "not"])))
def test_no_unexpected_exception_on_any_input(pieces: list[str]) -> None:
    text = "".join(pieces)
    try:
        expr = parse(text)
    except FilterError:
        return
    assert parse(str(expr)) == expr


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_no_unexpected_exception_on_any_unicode(text: str) -> None:
    try:
        expr = parse(text)
    except FilterError:
        return
    assert parse(str(expr)) == expr


_patterns = st.text(min_size=1, max_size=8).filter(lambda s: _compiles(s))


def _compiles(text: str) -> bool:
    try:
        parse(f"~u {json.dumps(text)}")
    except FilterError:
        return False
    return True


def _pred(name: str) -> st.SearchStrategy[Expr]:
    if OPERATORS[name].takes_arg:
        return _patterns.map(lambda arg: parse(f"~{name} " + _quoted(arg)))
    return st.just(Pred(name))


def _quoted(arg: str) -> str:
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


expressions: st.SearchStrategy[Expr] = st.recursive(
    st.one_of(*(_pred(name) for name in OPERATORS)),
    lambda inner: st.one_of(
        inner.map(Not),
        inner.map(Each),
        st.tuples(inner, inner).map(lambda p: And(*p)),
        st.tuples(inner, inner).map(lambda p: Or(*p)),
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(expressions)
def test_print_then_parse_is_identity(expr: Expr) -> None:
    assert parse(str(expr)) == expr


# ------------------------------------------------------------- facts alone


def test_quick_answers_from_the_end_record_or_says_it_cannot() -> None:
    facts = SessionFacts(
        path="x.popcap",
        client="127.0.0.1:5000",
        upstream="mail.example.net:995",
        user="alice",
        how="quit",
        commands=4,
        anomalies=0,
        anomaly_kinds={},
        errors=0,
        verbs={"USER": 1, "PASS": 1, "RETR": 1, "QUIT": 1},
        tls=frozenset({"upstream"}),
    )
    assert quick(parse("~u ALI"), facts) is True
    assert quick(parse("~h example.net & ~tlsu & !~tlsc"), facts) is True
    assert quick(parse("~c retr"), facts) is True
    assert quick(parse("~c RET"), facts) is False  # the whole verb
    assert quick(parse("~e | ~a ."), facts) is False
    assert quick(parse("~b x"), facts) is None
    assert quick(parse("~u alice | ~b x"), facts) is True  # decided without the bodies
    assert quick(parse("~u bob & ~b x"), facts) is False
    assert quick(parse("{~c RETR}"), facts) is None
    old = SessionFacts(user="alice", how="quit", commands=3, anomalies=0)  # an older end record
    assert quick(parse("~c RETR"), old) is None
    assert quick(parse("~a bare-lf"), old) is False
    assert quick(parse("~tls"), old) is None
    unfinished = SessionFacts(upstream="h:110", how="unfinished")
    assert quick(parse("~h h:110"), unfinished) is True
    assert quick(parse("~u alice"), unfinished) is None


# ----------------------------------------------------------- real sessions


@pytest.fixture(scope="module")
def samples(dovecot: DovecotServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    for user in dovecot.users:
        dovecot.reset_mailbox(user)
    return record_samples(dovecot, tmp_path_factory.mktemp("samples"))


def _full(expr: Expr, path: Path) -> bool:
    with CaptureReader(path) as reader:
        scan = Scan(expr, reader_facts(reader))
        for record, t, events in replay_events(reader):
            scan.feed(record, t, events)
        return scan.result()


def _selected(expr: str, samples: dict[str, Path]) -> set[str]:
    parsed = parse(expr)
    chosen = set()
    for name, path in samples.items():
        with CaptureReader(path) as reader:
            if capture_matches(parsed, reader):
                chosen.add(name)
        assert _full(parsed, path) == (name in chosen), (expr, name)
    return chosen


@pytest.mark.dovecot
@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("~all", {"alice", "bob", "refused"}),
        ("~u alice", {"alice"}),
        ("~u bob", {"bob", "refused"}),
        ("~c RETR", {"alice"}),
        ("~c UIDL & !~c RETR", {"bob"}),
        ("~e", {"refused"}),
        ("!~e", {"alice", "bob"}),
        ("{~c PASS & ~e}", {"refused"}),
        ("{~c RETR & ~e}", set()),
        ("~c PASS & ~e", {"refused"}),
        ("~t 'TOP 1 0'", {"alice", "bob"}),
        ("~t not-bobs", set()),  # the password is masked, never matched
        ("~r 'Logged in'", {"alice", "bob"}),
        ("~r 'authentication failed'", {"refused"}),
        ("~b 'report\\.pdf'", {"alice"}),
        ("{~c TOP & ~b 'Subject: Hello'}", {"alice", "bob"}),
        ("{~c RETR & ~b '^\\.single dot'}", {"alice"}),  # dot-unstuffed: one dot
        ("~h 127\\.0\\.0\\.1", {"alice", "bob", "refused"}),
        ("~end quit", {"alice", "bob", "refused"}),
        ("~tls", set()),
        ("~a .", set()),
    ],
)
def test_filters_select_real_sessions(expr: str, names: set[str], samples: dict[str, Path]) -> None:
    assert _selected(expr, samples) == names


@pytest.mark.dovecot
@settings(max_examples=60, deadline=None)
@given(expr=expressions)
def test_quick_never_contradicts_the_full_read(expr: Expr, samples: dict[str, Path]) -> None:
    for path in samples.values():
        with CaptureReader(path) as reader:
            verdict = quick(expr, reader_facts(reader))
        if verdict is not None:
            assert verdict == _full(expr, path), (str(expr), path.name)


@pytest.mark.dovecot
def test_cli_filter_on_list_show_stats(
    samples: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = str(samples["alice"].parent)
    capsys.readouterr()
    assert main(["list", "--json", "--filter", "~u bob & !~e", folder]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in rows] == [str(samples["bob"])]
    assert main(["show", "--json", "--filter", "~e", folder]) == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["path"] for d in docs] == [str(samples["refused"])]
    assert main(["stats", "--json", "--filter", "~c RETR", folder]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["captures"] == [str(samples["alice"])]


def test_cli_bad_filter_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("list", "show", "stats"):
        with pytest.raises(SystemExit) as info:
            main([command, "--filter", "~c RETR &", str(tmp_path)])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "argument --filter: '~c RETR &': expected a filter term" in err
        assert "column 10" in err
        assert "Traceback" not in err
