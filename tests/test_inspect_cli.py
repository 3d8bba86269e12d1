"""list, stats, diff and lint: on recorded Dovecot sessions and on scripted byte sequences."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popproxy.capture import format as fmt
from popproxy.capture.reader import CaptureReader
from popproxy.cli import diff as diff_cli
from popproxy.cli import list as list_cli
from popproxy.cli import stats as stats_cli
from popproxy.cli.lint import render_findings
from popproxy.cli.main import main
from popproxy.core import Direction
from popproxy.core.transcript import Exchange
from popproxy.inspect.lint_rules import Finding
from popproxy.inspect.stats import StatsCollector, collect, percentile
from popproxy.inspect.summary import row_from_end
from popproxy.replay.compare import (
    args_match,
    capture_exchanges,
    compare_exchanges,
    compare_sessions,
    first_body_difference,
)
from popproxy.replay.diff import diff_captures
from popproxy.views.theme import make_console
from tests.support.captures import fixture_steps, make_capture

C, S = Direction.CLIENT, Direction.SERVER
FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))

Step = tuple[str, float, bytes]  # (direction "c"/"s", time, bytes); b"" closes that direction


# ----------------------------------------------------------------- building captures


def script(
    *exchanges: tuple[bytes, bytes],
    greeting: bytes = b"+OK ready <1.2@host>\r\n",
    step: float = 0.01,
) -> list[Step]:
    """Greeting, then (client bytes, server bytes) pairs; an empty side sends nothing."""
    steps: list[Step] = [("s", 0.0, greeting)]
    t = 0.0
    for client, server in exchanges:
        for d, data in (("c", client), ("s", server)):
            if data:
                t += step
                steps.append((d, round(t, 6), data))
    return steps


LOGIN = ((b"USER alice\r\n", b"+OK\r\n"), (b"PASS secret\r\n", b"+OK Logged in.\r\n"))
QUIT = (b"QUIT\r\n", b"+OK Logging out.\r\n")


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any]:
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


@pytest.fixture
def fixture_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "fixtures"
    folder.mkdir()
    for i, name in enumerate(FIXTURE_NAMES):
        make_capture(
            folder / f"{name}{fmt.SUFFIX}",
            fixture_steps(name),
            {"start": f"2024-01-01T10:00:0{i}Z"},
        )
    return folder


# ----------------------------------------------------------------- lint

# name -> (exchanges after the greeting, rule expected, severity expected)
LINT_CASES: dict[str, tuple[tuple[tuple[bytes, bytes], ...], str, str]] = {
    "bare-lf": ((*LOGIN, (b"STAT\r\n", b"+OK 1 10\n"), QUIT), "bare-lf", "warning"),
    "truncated": ((*LOGIN, (b"RETR 1\r\n", b"+OK 5 octets\r\nabc\r\n")), "body-truncated", "error"),
    "unstuffed-dot": (
        (*LOGIN, (b"RETR 1\r\n", b"+OK\r\n.hidden\r\n.\r\n"), QUIT),
        "unstuffed-dot",
        "error",
    ),
    "multiline-single": (
        (*LOGIN, (b"LIST 1\r\n", b"+OK 1 120\r\n1 120\r\n.\r\n"), QUIT),
        "multiline-reply-to-single",
        "error",
    ),
    "no-reply": ((*LOGIN, (b"STAT\r\n", b"")), "no-reply", "warning"),
    "quit-err": (
        (*LOGIN, (b"QUIT\r\n", b"-ERR some deleted messages not removed\r\n")),
        "quit-not-ok",
        "warning",
    ),
    "quit-silent": ((*LOGIN, (b"QUIT\r\n", b"")), "quit-not-ok", "warning"),
    "command-too-long": (
        (*LOGIN, (b"NOOP " + b"x" * 300 + b"\r\n", b"+OK\r\n"), QUIT),
        "command-too-long",
        "warning",
    ),
    "status-too-long": (
        (*LOGIN, (b"NOOP\r\n", b"+OK " + b"y" * 600 + b"\r\n"), QUIT),
        "status-too-long",
        "warning",
    ),
    "drop-listing": (
        (*LOGIN, (b"STAT\r\n", b"+OK lots\r\n"), QUIT),
        "malformed-drop-listing",
        "error",
    ),
    "scan-listing": (
        (*LOGIN, (b"LIST\r\n", b"+OK\r\n1 abc\r\n.\r\n"), QUIT),
        "malformed-scan-listing",
        "error",
    ),
    "scan-listing-single": (
        (*LOGIN, (b"LIST 2\r\n", b"+OK 3 120\r\n"), QUIT),
        "malformed-scan-listing",
        "error",
    ),
    "uid-too-long": (
        (*LOGIN, (b"UIDL\r\n", b"+OK\r\n1 " + b"z" * 71 + b"\r\n.\r\n"), QUIT),
        "malformed-unique-id-listing",
        "error",
    ),
    "uid-bad-char": (
        (*LOGIN, (b"UIDL 1\r\n", b"+OK 1 abc\x01def\r\n"), QUIT),
        "malformed-unique-id-listing",
        "error",
    ),
    "octets": (
        (*LOGIN, (b"RETR 1\r\n", b"+OK 99 octets\r\nabc\r\n.\r\n"), QUIT),
        "octets-mismatch",
        "warning",
    ),
    "wrong-state-stat": (
        ((b"STAT\r\n", b"-ERR not yet\r\n"), *LOGIN, QUIT),
        "wrong-state",
        "advice",
    ),
    "wrong-state-user": (
        (*LOGIN, (b"USER bob\r\n", b"-ERR already\r\n"), QUIT),
        "wrong-state",
        "advice",
    ),
    "pipelining": (
        (*LOGIN, (b"STAT\r\nNOOP\r\n", b"+OK 0 0\r\n+OK\r\n"), QUIT),
        "pipelining-not-advertised",
        "advice",
    ),
    "unsolicited": (
        (*LOGIN, (b"", b"-ERR Disconnected for inactivity.\r\n")),
        "unsolicited-reply",
        "warning",
    ),
    "stls-injection": (
        ((b"STLS\r\n", b"+OK Begin TLS\r\n+OK injected\r\n"),),
        "plaintext-after-stls",
        "error",
    ),
    "client-injection": (
        ((b"STLS\r\nUSER mallory\r\n", b"+OK Begin TLS\r\n"),),
        "plaintext-after-stls",
        "error",
    ),
    "plus-err": ((*LOGIN, (b"STAT\r\n", b"+ERR no\r\n"), QUIT), "nonstandard-status", "error"),
    "lowercase": ((*LOGIN, (b"STAT\r\n", b"+ok 1 2\r\n"), QUIT), "status-case", "error"),
    "continuation": (
        (*LOGIN, (b"NOOP\r\n", b"+ \r\n"), QUIT),
        "continuation-outside-auth",
        "error",
    ),
}


@pytest.mark.parametrize("name", sorted(LINT_CASES))
def test_lint_finds_each_issue(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exchanges, rule, severity = LINT_CASES[name]
    path = make_capture(tmp_path / f"{name}{fmt.SUFFIX}", script(*exchanges))
    code, doc = run_json(["lint", "--json", str(path)], capsys)
    findings = doc["captures"][0]["findings"]
    hits = [f for f in findings if f["rule"] == rule]
    assert hits, findings
    assert hits[0]["severity"] == severity
    assert hits[0]["rfc"].startswith("RFC ")
    assert hits[0]["message"] and "\n" not in hits[0]["message"]
    worst = max((f["severity"] for f in findings), key=["advice", "warning", "error"].index)
    assert code == (0 if worst == "advice" else 1)


def test_lint_names_exchange_and_direction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exchanges, _, _ = LINT_CASES["octets"]
    path = make_capture(tmp_path / f"x{fmt.SUFFIX}", script(*exchanges))
    _, doc = run_json(["lint", "--json", str(path)], capsys)
    hit = next(f for f in doc["captures"][0]["findings"] if f["rule"] == "octets-mismatch")
    assert (hit["seq"], hit["command"], hit["direction"]) == (3, "RETR", "server")
    assert hit["rfc"] == "RFC 1939 §11"


def test_lint_counts_bare_lf_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A CRLF split across two chunks is not a bare LF; three body lines end in LF alone.
    steps = script(*LOGIN, (b"RETR 1\r", b"+OK\r\na\nb\nc\n.\r\n"), QUIT)
    steps.insert(6, ("c", 0.055, b"\n"))
    path = make_capture(tmp_path / f"lf{fmt.SUFFIX}", steps)
    _, doc = run_json(["lint", "--json", str(path)], capsys)
    bare = [f for f in doc["captures"][0]["findings"] if f["rule"] == "bare-lf"]
    assert [f["direction"] for f in bare] == ["server"]
    assert bare[0]["message"].startswith("3 of ")


def test_lint_sasl_lines_are_exempt_from_length_limits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # RFC 5034 §4: SASL responses have no line limit.
    response = base64.b64encode(b"\0alice\0" + b"p" * 400) + b"\r\n"
    steps = script((b"AUTH PLAIN\r\n", b"+ \r\n"), (response, b"+OK Logged in.\r\n"), QUIT)
    path = make_capture(tmp_path / f"sasl{fmt.SUFFIX}", steps)
    code, doc = run_json(["lint", "--json", str(path)], capsys)
    assert doc["captures"][0]["findings"] == []
    assert code == 0


def test_lint_pipelining_advertised_is_fine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capa = (b"CAPA\r\n", b"+OK\r\nUSER\r\nPIPELINING\r\n.\r\n")
    steps = script(capa, *LOGIN, (b"STAT\r\nNOOP\r\n", b"+OK 0 0\r\n+OK\r\n"), QUIT)
    path = make_capture(tmp_path / f"pipe{fmt.SUFFIX}", steps)
    code, doc = run_json(["lint", "--json", str(path)], capsys)
    assert doc["captures"][0]["findings"] == []
    assert code == 0


def test_lint_dovecot_fixtures_are_clean(
    fixture_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = run_json(["lint", "--json", str(fixture_dir)], capsys)
    assert len(doc["captures"]) == len(FIXTURE_NAMES)
    for capture in doc["captures"]:
        above = [f for f in capture["findings"] if f["severity"] != "advice"]
        assert above == [], capture["path"]
    assert code == 0
    pipelined = next(c for c in doc["captures"] if "pipelined" in c["path"])
    assert [f["rule"] for f in pipelined["findings"]] == ["pipelining-not-advertised"]


def test_lint_text_output(tmp_path: Path) -> None:
    console = make_console(io.StringIO(), width=100)
    render_findings(
        console,
        "x.popcap",
        [
            Finding(
                "bare-lf",
                "warning",
                "RFC 1939 §3",
                "1 of 2 lines end in a bare LF",
                3,
                "STAT",
                "server",
            )
        ],
    )
    render_findings(console, "y.popcap", [])
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "RFC 1939 §3" in text and "bare LF" in text and "y.popcap: clean" in text


def test_lint_unreadable_capture_is_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / f"bad{fmt.SUFFIX}"
    bad.write_bytes(b"hello\n")
    assert main(["lint", str(bad)]) == 2


# ----------------------------------------------------------------- diff


def _altered(name: str, old: bytes, new: bytes) -> list[Step]:
    steps = fixture_steps(name)
    hits = [i for i, s in enumerate(steps) if old in s[2]]
    assert len(hits) == 1
    i = hits[0]
    steps[i] = (steps[i][0], steps[i][1], steps[i][2].replace(old, new))
    return steps


def test_diff_identical_is_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_capture(tmp_path / f"a{fmt.SUFFIX}", fixture_steps("poplib_userpass"))
    b = make_capture(tmp_path / f"b{fmt.SUFFIX}", fixture_steps("poplib_userpass"))
    code, doc = run_json(["diff", "--json", str(a), str(b)], capsys)
    assert (code, doc["equal"], doc["differences"]) == (0, True, [])
    assert main(["diff", str(a), str(b)]) == 0


def test_diff_finds_changed_stat(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_capture(tmp_path / f"a{fmt.SUFFIX}", fixture_steps("poplib_userpass"))
    b = make_capture(
        tmp_path / f"b{fmt.SUFFIX}",
        _altered("poplib_userpass", b"+OK 4 210971\r\n", b"+OK 5 210971\r\n"),
    )
    code, doc = run_json(["diff", "--json", str(a), str(b)], capsys)
    assert code == 1
    assert [(d["seq"], d["field"], d["expected"], d["actual"]) for d in doc["differences"]] == [
        (4, "stat.count", 4, 5)
    ]
    assert main(["diff", str(a), str(b)]) == 1


def test_diff_ignores_volatile_text_unless_strict(tmp_path: Path) -> None:
    a = make_capture(tmp_path / f"a{fmt.SUFFIX}", fixture_steps("poplib_userpass"))
    b = make_capture(
        tmp_path / f"b{fmt.SUFFIX}",
        _altered("poplib_userpass", b"KCUYD2nnLbPndAsDbz826A", b"X" * 22),
    )
    assert main(["diff", str(a), str(b)]) == 0
    assert main(["diff", "--strict", str(a), str(b)]) == 1


def test_diff_body_and_listing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_capture(tmp_path / f"a{fmt.SUFFIX}", fixture_steps("poplib_userpass"))
    steps = _altered(
        "poplib_userpass",
        b"Subject: Lines that need dot-stuffing",
        b"Subject: Lines that need dot-stuffinG",
    )
    steps = [
        (d, t, data.replace(b"2 1704103202.M000002P1", b"2 1704103202.M000009P1"))
        for d, t, data in steps
    ]
    b = make_capture(tmp_path / f"b{fmt.SUFFIX}", steps)
    code, doc = run_json(["diff", "--json", str(a), str(b)], capsys)
    assert code == 1
    fields = {d["field"]: d for d in doc["differences"]}
    assert fields["listing[2]"]["seq"] == 6 and "uid" in fields["listing[2]"]["note"]
    body = fields["body"]
    assert body["seq"] == 9 and body["expected"]["octets"] == body["actual"]["octets"]
    with CaptureReader(a) as ra:
        text = ra.path.read_bytes()
    start = text.index(b"+OK 446 octets\r\n") + len(b"+OK 446 octets\r\n")
    offset = text.index(b"dot-stuffing", start) + len(b"dot-stuffin") - start
    assert first_body_difference(a, 9, b, 9) == offset
    assert f"first difference at body octet {offset}" in body["note"]
    assert first_body_difference(a, 8, b, 8) is None


def test_diff_reports_missing_exchanges(tmp_path: Path) -> None:
    full = script(*LOGIN, (b"STAT\r\n", b"+OK 0 0\r\n"), QUIT)
    short = script(*LOGIN, QUIT)
    a = make_capture(tmp_path / f"a{fmt.SUFFIX}", full)
    b = make_capture(tmp_path / f"b{fmt.SUFFIX}", short)
    with CaptureReader(a) as ra, CaptureReader(b) as rb:
        diffs = list(compare_sessions(capture_exchanges(ra), capture_exchanges(rb)))
    assert [(d.seq, d.field) for d in diffs] == [(3, "command"), (4, "exchange")]
    assert diffs[1].expected == "QUIT" and diffs[1].actual is None


def test_compare_exchanges_api() -> None:
    assert args_match("alice ######", "alice secret")
    assert not args_match("alice ######", "alice secrets")
    e = Exchange("command", 3, "PASS", "######", status="+OK", text="Logged in.")
    a = Exchange("command", 3, "PASS", "hunter", status="+OK", text="Welcome")
    assert compare_exchanges(e, a) == []
    assert [d.field for d in compare_exchanges(e, a, strict=True)] == ["text"]
    e = Exchange("command", 4, "LIST", "1", status="+OK", value=(1, 120))
    a = Exchange("command", 4, "LIST", "1", status="-ERR", code="SYS/TEMP")
    assert [(d.field, d.expected, d.actual) for d in compare_exchanges(e, a)] == [
        ("status", "+OK", "-ERR")
    ]


def test_diff_text_output(tmp_path: Path) -> None:
    a = make_capture(tmp_path / f"a{fmt.SUFFIX}", fixture_steps("poplib_userpass"))
    b = make_capture(
        tmp_path / f"b{fmt.SUFFIX}",
        _altered("poplib_userpass", b"+OK 4 210971\r\n", b"+OK 5 210971\r\n"),
    )
    console = make_console(io.StringIO(), width=100)
    diff_cli.render_diff(console, "a", "b", diff_captures(a, b)[0])
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "stat.count" in text and "1 difference" in text


def test_diff_text_names_the_actors_and_is_terminal_safe(tmp_path: Path) -> None:
    """A reply popproxy withheld and replaced, from a capture whose texts carry terminal
    controls: the table says who answered, and no control reaches the terminal."""
    hostile = "\x1b]52;c;aGFja2Vk\x07\x1b[2J\u202e"
    greeting, noop = b"+OK ready\r\n", b"+OK " + hostile.encode() + b"\r\n"
    steps = [("s", 0.01, greeting), ("c", 0.02, b"NOOP\r\n"), ("s", 0.03, noop)]
    a = make_capture(tmp_path / f"a{fmt.SUFFIX}", steps)
    b = make_capture(
        tmp_path / f"b{fmt.SUFFIX}",
        [
            *steps,
            ("drop", "s", len(greeting), len(noop), f"held {hostile}"),
            ("p", "s", 0.04, b"-ERR [SYS/TEMP] popproxy: no\r\n", f"refused {hostile}"),
        ],
    )
    differences, _ = diff_captures(a, b)
    assert [(d.field, d.expected, d.actual) for d in differences[:2]] == [
        ("reply_by", "server", "popproxy"),
        (
            "withheld",
            None,
            {"status": "+OK", "code": None, "text": hostile, "why": f"held {hostile}"},
        ),
    ]
    out = io.StringIO()
    console = make_console(out, width=300, force_terminal=True)
    diff_cli.render_diff(console, "a", "b", differences)
    text = out.getvalue()
    assert "server answered" in text and "popproxy answered" in text and "withheld +OK" in text
    assert "\x1b]52" not in text and "\x07" not in text and "\u202e" not in text
    assert "\x1b[2J" not in text


# ----------------------------------------------------------------- list

BIG = 30 * 1024 * 1024


@pytest.fixture(scope="module")
def big_capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    line = b"x" * 1022 + b"\r\n"
    chunk = line * 1024  # 1 MiB
    steps: list[Step] = list(script(*LOGIN, (b"RETR 1\r\n", f"+OK {BIG} octets\r\n".encode())))
    t = steps[-1][1]
    for i in range(BIG // len(chunk)):
        steps.append(("s", t + 0.001 * (i + 1), chunk))
    steps.append(("s", t + 0.1, b".\r\n"))
    steps.extend(script(QUIT)[1:])
    steps[-2:] = [(d, t + 0.2 + 0.01 * i, data) for i, (d, _, data) in enumerate(steps[-2:])]
    return make_capture(tmp_path_factory.mktemp("big") / f"big{fmt.SUFFIX}", steps)


def test_list_reads_only_end_records(
    big_capture: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "captures"
    folder.mkdir()
    for i in range(3):
        shutil.copy(big_capture, folder / f"2024010{i}-big{fmt.SUFFIX}")
    unfinished = make_capture(
        folder / f"zz-unfinished{fmt.SUFFIX}",
        script(*LOGIN, (b"STAT\r\n", b"+OK 0 0\r\n")),
        {"start": "2023-12-31T23:00:00Z", "client": "10.0.0.9:1"},
        end=False,
    )
    read: list[Path] = []
    original = CaptureReader.records

    def spy(self: CaptureReader, *args: Any, **kwargs: Any) -> Iterator[fmt.Record]:
        read.append(self.path)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CaptureReader, "records", spy)
    code, rows = run_json(["list", "--json", str(folder)], capsys)
    assert code == 0
    assert read == [unfinished]  # the 30 MB captures were never read record by record
    assert len(rows) == 4
    assert rows[0]["unfinished"] and rows[0]["how"] == "unfinished"
    assert (rows[0]["commands"], rows[0]["user"]) == (3, "alice")
    for row in rows[1:]:
        assert row["how"] == "quit" and not row["unfinished"]
        assert row["server_octets"] > BIG and row["commands"] == 4 and row["user"] == "alice"
        assert row["anomalies"] == 0
    assert [r["start"] for r in rows] == sorted(r["start"] for r in rows)


def test_list_text_and_errors(fixture_dir: Path, tmp_path: Path) -> None:
    rows = json.loads(json.dumps([row_from_end(r, e) for r, e in _ends(fixture_dir)]))
    console = make_console(io.StringIO(), width=200)
    list_cli.render_list(console, rows)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "alice" in text and "quit" in text and f"{len(FIXTURE_NAMES)} capture(s)" in text
    assert main(["list", str(tmp_path / "nowhere")]) == 2


def _ends(folder: Path) -> Iterator[tuple[CaptureReader, dict[str, Any]]]:
    for path in sorted(folder.glob(f"*{fmt.SUFFIX}")):
        with CaptureReader(path) as reader:
            end = reader.end()
            assert end is not None
            yield reader, end


# ----------------------------------------------------------------- stats


def test_percentile_nearest_rank() -> None:
    values = [0.1 * i for i in range(1, 11)]
    assert percentile(values, 50) == pytest.approx(0.5)
    assert percentile(values, 90) == pytest.approx(0.9)
    assert percentile(values, 99) == pytest.approx(1.0)
    assert percentile([], 50) is None


def test_stats_json_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    steps: list[Step] = [
        ("s", 0.0, b"+OK ready\r\n"),
        ("c", 1.0, b"USER alice\r\n"),
        ("s", 1.1, b"+OK\r\n"),
        ("c", 2.0, b"PASS secret\r\n"),
        ("s", 2.5, b"+OK Logged in.\r\n"),
        # Pipelined: NOOP waits for STAT's reply; its latency starts at 3.2, not 3.0.
        ("c", 3.0, b"STAT\r\nNOOP\r\n"),
        ("s", 3.2, b"+OK 1 5\r\n"),
        ("s", 3.5, b"+OK\r\n"),
        ("c", 4.0, b"RETR 9\r\n"),
        ("s", 4.05, b"-ERR no such message\r\n"),
        ("c", 4.5, b"RETR 1\r\n"),
        ("s", 4.6, b"+OK 5 octets\r\nab"),
        ("s", 4.9, b"c\r\n.\r\n"),
        ("c", 5.0, b"QUIT\r\n"),
        ("s", 5.01, b"+OK bye\r\n"),
    ]
    path = make_capture(tmp_path / f"s{fmt.SUFFIX}", steps)
    code, doc = run_json(["stats", "--json", str(path)], capsys)
    assert code == 0 and doc["sessions"] == 1
    cmds = doc["commands"]
    assert set(cmds) == {"USER", "PASS", "STAT", "NOOP", "RETR", "QUIT"}
    assert cmds["NOOP"]["latency"]["p50"] == pytest.approx(0.3)
    assert cmds["STAT"]["latency"]["max"] == pytest.approx(0.2)
    assert cmds["PASS"]["latency"]["p90"] == pytest.approx(0.5)
    retr = cmds["RETR"]
    assert (retr["count"], retr["errors"], retr["error_rate"]) == (2, 1, 0.5)
    assert retr["latency"]["p50"] == pytest.approx(0.05)
    assert retr["latency"]["max"] == pytest.approx(0.4)
    assert retr["body_octets"] == 5
    assert retr["client_octets"] == 16
    assert retr["server_octets"] == len(b"-ERR no such message\r\n+OK 5 octets\r\nabc\r\n.\r\n")
    assert cmds["USER"]["client_octets"] == 12 and cmds["USER"]["server_octets"] == 5
    total = doc["total"]
    assert (total["count"], total["errors"], total["no_reply"]) == (7, 1, 0)


def test_stats_over_fixtures_and_text(
    fixture_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = run_json(["stats", "--json", str(fixture_dir)], capsys)
    assert code == 0 and doc["sessions"] == len(FIXTURE_NAMES)
    assert doc["commands"]["QUIT"]["count"] == len(FIXTURE_NAMES)
    assert doc["commands"]["RETR"]["latency"]["samples"] == doc["commands"]["RETR"]["count"]
    stats = StatsCollector()
    for path in sorted(fixture_dir.glob(f"*{fmt.SUFFIX}")):
        with CaptureReader(path) as reader:
            collect(reader, stats)
    console = make_console(io.StringIO(), width=100)
    stats_cli.render_stats(console, stats)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "RETR" in text and "p99" in text and "█" in text


# ----------------------------------------------------------------- entry point


def test_subprocess_smoke(fixture_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "popproxy", "list", "--json", str(fixture_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert len(rows) == len(FIXTURE_NAMES) and done.stderr == ""
    done = subprocess.run(
        [sys.executable, "-m", "popproxy", "lint", str(fixture_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_list_n_answered_with_a_list_keeps_it_in_its_exchange(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    steps = script(
        *LOGIN, (b"LIST 1\r\n", b"+OK 1 120\r\n1 120\r\n.\r\n"), (b"NOOP\r\n", b"+OK\r\n")
    )
    path = make_capture(tmp_path / f"list{fmt.SUFFIX}", steps)
    _, doc = run_json(["show", "--json", str(path)], capsys)
    commands = [(ex["command"], ex["status"]) for ex in doc["exchanges"][1:]]
    assert commands == [("USER", "+OK"), ("PASS", "+OK"), ("LIST", "+OK"), ("NOOP", "+OK")]
    (listed,) = [ex for ex in doc["exchanges"] if ex["command"] == "LIST"]
    assert listed["multiline"] and listed["body_lines"] == 1
    assert [a["kind"] for a in doc["anomalies"]] == ["multiline-reply-to-single"]
    code = main(["show", str(path)])
    assert code == 0 and "(no reply)" not in capsys.readouterr().out
