"""``popproxy diff`` aligns two sessions (an extra or missing command is one difference) and
tells who made each part: the server, or popproxy answering, withholding, cutting."""

from __future__ import annotations

import io
import json
import ssl
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import trio
from rich.console import Console

from popproxy.capture import format as fmt
from popproxy.capture.reader import CaptureReader
from popproxy.cli.diff import render_diff
from popproxy.cli.main import main
from popproxy.faults import FaultSet, parse_rule
from popproxy.proxy.config import StlsMode
from popproxy.replay.compare import align_sessions, capture_exchanges, compare_sessions
from popproxy.replay.diff import diff_captures
from popproxy.views.theme import THEME
from tests.support import clients
from tests.support.dovecot import USERS, DovecotServer
from tests.support.recorder import record
from tests.test_attribution import GREETING, read_until, run_session
from tests.test_inspect_cli import make_capture, script

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "diff.schema.json").read_text())

EXCHANGES = [
    (b"USER alice\r\n", b"+OK\r\n"),
    (b"PASS secret\r\n", b"+OK Logged in.\r\n"),
    (b"STAT\r\n", b"+OK 2 300\r\n"),
    (b"LIST\r\n", b"+OK 2 messages:\r\n1 100\r\n2 200\r\n.\r\n"),
    (b"RETR 1\r\n", b"+OK 100 octets\r\nSubject: a\r\n\r\nbody\r\n.\r\n"),
    (b"RETR 2\r\n", b"+OK 200 octets\r\nSubject: b\r\n\r\nbody\r\n.\r\n"),
    (b"QUIT\r\n", b"+OK Logging out.\r\n"),
]


def _diff(tmp_path: Path, a: list, b: list, capsys: pytest.CaptureFixture[str]) -> dict:
    pa = make_capture(tmp_path / f"a{fmt.SUFFIX}", script(*a))
    pb = make_capture(tmp_path / f"b{fmt.SUFFIX}", script(*b))
    capsys.readouterr()
    code = main(["diff", "--json", str(pa), str(pb)])
    doc = json.loads(capsys.readouterr().out)
    assert code == (1 if doc["differences"] else 0)
    jsonschema.validate(doc, SCHEMA, cls=jsonschema.Draft202012Validator)
    return doc


def test_the_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_an_inserted_command_is_one_difference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = [*EXCHANGES[:3], (b"NOOP\r\n", b"+OK\r\n"), *EXCHANGES[3:]]
    doc = _diff(tmp_path, EXCHANGES, b, capsys)
    assert [(d["field"], d["expected"], d["actual"], d["note"]) for d in doc["differences"]] == [
        ("exchange", None, "NOOP", "only in actual (inserted)")
    ]


def test_a_deleted_and_a_changed_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = [*EXCHANGES[:3], *EXCHANGES[4:5], (b"TOP 2 0\r\n", b"+OK\r\nSubject: b\r\n\r\n.\r\n")]
    b.append(EXCHANGES[6])
    doc = _diff(tmp_path, EXCHANGES, b, capsys)
    got = [(d["field"], d["expected"], d["actual"]) for d in doc["differences"]]
    assert got == [("exchange", "LIST", None), ("command", "RETR 2", "TOP 2 0")]


@pytest.mark.dovecot
def test_fetchmail_against_getmail6_aligned(dovecot: DovecotServer, tmp_path: Path) -> None:
    upstream = (dovecot.host, dovecot.port)
    fm, _ = record(
        upstream,
        tmp_path / "fm",
        lambda h, p: clients.fetchmail_fetch(
            h, p, "alice", USERS["alice"], workdir=tmp_path / "fmw"
        ),
    )
    gm, _ = record(
        upstream,
        tmp_path / "gm",
        lambda h, p: clients.getmail_fetch(h, p, "alice", USERS["alice"], workdir=tmp_path / "gmw"),
    )

    def exchanges(path: Path) -> list:
        with CaptureReader(path) as reader:
            return list(capture_exchanges(reader))

    positional = list(compare_sessions(exchanges(fm), exchanges(gm)))
    aligned = list(align_sessions(exchanges(fm), exchanges(gm)))
    assert aligned, "the two clients do send different commands"
    assert len(aligned) < len(positional)
    print(f"fetchmail vs getmail6: {len(positional)} by position, {len(aligned)} aligned")
    # Every RETR both clients sent is paired with its twin and compares equal.
    assert not [d for d in aligned if d.field == "body"]
    assert {d.field for d in aligned} <= {"exchange", "command", "args", "capa"}


# ----------------------------------------------------------------- three actors

REPLIES = {
    b"CAPA": b"+OK\r\nUIDL\r\nSTLS\r\n.\r\n",
    b"USER": b"+OK\r\n",
    b"PASS": b"+OK Logged in.\r\n",
    b"STAT": b"+OK 1 40\r\n",
    b"RETR": b"+OK 40 octets\r\nSubject: hi\r\n\r\n" + b"line\r\n" * 8 + b".\r\n",
    b"STLS": b"+OK go ahead\r\n",
}
SESSION = [b"CAPA", b"USER alice", b"PASS secret", b"STAT", b"RETR 1", b"QUIT"]


def pop3_server(replies: dict[bytes, bytes]) -> Any:
    """A scripted upstream: one reply per verb; a TLS ClientHello gets plaintext."""

    async def serve(s: trio.abc.Stream) -> None:
        await s.send_all(GREETING)
        buf = b""
        while True:
            chunk = await s.receive_some()
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                verb = line.strip().split(b" ")[0].upper()
                if verb == b"QUIT" or verb.startswith(b"\x16"):
                    await s.send_all(b"+OK bye\r\n" if verb == b"QUIT" else b"-ERR no TLS\r\n")
                    await s.aclose()
                    return
                await s.send_all(replies.get(verb, b"-ERR unknown\r\n"))

    return serve


def pop3_client(commands: list[bytes]) -> Any:
    """Sends each command once the previous reply is in; gives up on silence or a close."""

    async def run(c: trio.abc.Stream) -> None:
        await read_until(c, b"\r\n")
        for command in commands:
            try:
                await c.send_all(command + b"\r\n")
            except trio.BrokenResourceError:
                return
            got = b""
            with trio.move_on_after(0.3):
                multi = command.split(b" ")[0] in (b"CAPA", b"RETR")
                got = await read_until(c, b".\r\n" if multi else b"\r\n")
            if not got:
                await c.aclose()
                return

    return run


async def record_pair(
    tmp_path: Path,
    a: dict[str, Any],
    b: dict[str, Any],
    commands: list[bytes] = SESSION,
) -> tuple[Path, Path]:
    """Two sessions through the real proxy, same client, with ``a`` and ``b`` as the
    proxy's options (``replies``: the server's, ``faults``: rule texts)."""
    paths = []
    for name, kw in (("a", a), ("b", b)):
        kw = dict(kw)
        replies = {**REPLIES, **kw.pop("replies", {})}
        if "faults" in kw:
            kw["faults"] = FaultSet([parse_rule(r) for r in kw["faults"]], seed=1)
        out = tmp_path / name
        out.mkdir(parents=True)
        doc, _ = await run_session(out, pop3_server(replies), pop3_client(commands), **kw)
        paths.append(Path(doc["path"]))
    return paths[0], paths[1]


def diff_json(a: Path, b: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    code = main(["diff", "--json", str(a), str(b)])
    doc = json.loads(capsys.readouterr().out)
    assert code == (1 if doc["differences"] else 0) and doc["schema"] == 1
    jsonschema.validate(doc, SCHEMA, cls=jsonschema.Draft202012Validator)
    return doc


def rows(doc: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(d["seq"], d["field"], d["expected"], d["actual"]) for d in doc["differences"]]


def shown(a: Path, b: Path) -> str:
    console = Console(file=io.StringIO(), width=200, theme=THEME)
    render_diff(console, "A", "B", diff_captures(a, b)[0])
    return console.file.getvalue()  # type: ignore[attr-defined]


async def test_a_faulted_answer_is_popproxys_against_the_servers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = await record_pair(tmp_path, {}, {"faults": ["PASS: -ERR [IN-USE] mailbox locked"]})
    doc = diff_json(a, b, capsys)
    why = "fault rule 1 (PASS: -ERR [IN-USE] mailbox locked): answered by popproxy"
    assert rows(doc)[:3] == [
        (3, "reply_by", "server", "popproxy"),
        (3, "dropped", None, [{"from": "client", "octets": 13, "why": why}]),
        (3, "status", "+OK", "-ERR"),
    ]
    notes = {d["field"]: d["note"] for d in doc["differences"] if d["seq"] == 3}
    assert notes["reply_by"].startswith("popproxy answered in B: ")  # and the recorded why
    assert "the server never got them" in notes["dropped"]
    text = shown(a, b)
    assert "server answered" in text and "popproxy answered" in text
    assert "13 octets from the client" in text


async def test_a_refusal_by_popproxy_against_one_by_the_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server refusing STLS, against popproxy refusing it after the server's +OK
    (the upstream handshake failed): the +OK the client never got is withheld."""
    commands = [b"STLS", b"QUIT"]
    a, b = await record_pair(
        tmp_path,
        {"replies": {b"STLS": b"-ERR [SYS/TEMP] not now\r\n"}},
        {"upstream_context": ssl.create_default_context()},
        commands,
    )
    doc = diff_json(a, b, capsys)
    got = {d["field"]: d for d in doc["differences"]}
    assert (got["reply_by"]["expected"], got["reply_by"]["actual"]) == ("server", "popproxy")
    assert "popproxy answered in B: TLS with upstream failed" in got["reply_by"]["note"]
    assert got["withheld"]["expected"] is None
    assert got["withheld"]["actual"] == {
        "status": "+OK",
        "code": None,
        "text": "go ahead",
        "why": "upstream TLS failed",
    }
    assert "status" not in got and "code" not in got  # both -ERR [SYS/TEMP] to the client
    assert got["closed"]["actual"] == {"by": "popproxy", "why": "upstream-tls-error"}
    assert got["closed"]["expected"]["by"] in ("client", "server")
    text = shown(a, b)
    assert "withheld +OK go ahead (upstream TLS failed)" in text
    assert "popproxy closed (upstream-tls-error)" in text


async def test_a_stall_and_a_cut_against_a_clean_session(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean, stalled = await record_pair(tmp_path / "stall", {}, {"faults": ["STAT: stall"]})
    _, cut = await record_pair(tmp_path / "cut", {}, {"faults": ["RETR 1: cut after 30"]})
    doc = diff_json(clean, stalled, capsys)
    assert rows(doc)[:2] == [
        (4, "reply_by", "server", "popproxy"),
        (
            4,
            "withheld",
            None,
            {"status": "+OK", "code": None, "text": "1 40", "why": "fault rule 1 (STAT: stall)"},
        ),
    ]
    assert (4, "status", "+OK", None) in rows(doc)
    assert "popproxy withheld the server's reply in B" in doc["differences"][0]["note"]
    doc = diff_json(clean, cut, capsys)
    got = {(d["seq"], d["field"]): d for d in doc["differences"]}
    dropped = got[(5, "dropped")]["actual"]  # the RETR's 51 reply bytes after the cut
    assert {d["from"] for d in dropped} == {"server"} and sum(d["octets"] for d in dropped) == 51
    assert got[(5, "dropped")]["expected"] is None
    assert got[(None, "closed")]["actual"] == {"by": "popproxy", "why": "fault"}
    assert (None, "dropped") not in got  # the drops are the RETR's: not repeated


async def test_two_strip_mode_sessions_are_equal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """popproxy's own replies compare like the server's: no difference between two runs."""
    commands = [b"CAPA", b"STLS", b"USER alice", b"QUIT"]
    strip = {"stls": StlsMode.STRIP}
    a, b = await record_pair(tmp_path, strip, strip, commands)
    assert diff_json(a, b, capsys)["differences"] == []
    refusing = {"replies": {b"STLS": b"-ERR not now\r\n"}}
    plain, _ = await record_pair(tmp_path / "c", refusing, strip, commands)
    doc = diff_json(plain, b, capsys)
    assert rows(doc) == [
        (
            1,
            "dropped",
            None,
            [{"from": "server", "octets": 6, "why": "STLS capability hidden by popproxy"}],
        ),
        (2, "reply_by", "server", "popproxy"),
        (2, "dropped", None, [{"from": "client", "octets": 6, "why": "STLS answered by popproxy"}]),
    ]  # both -ERR: the server's own, and popproxy's in strip mode
