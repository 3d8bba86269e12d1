"""``popproxy diff`` aligns two sessions: an extra or missing command is one difference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from popproxy.capture import format as fmt
from popproxy.capture.reader import CaptureReader
from popproxy.cli.main import main
from popproxy.replay.compare import align_sessions, capture_exchanges, compare_sessions
from tests.support import clients
from tests.support.dovecot import USERS, DovecotServer
from tests.support.recorder import record
from tests.test_inspect_cli import make_capture, script

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
    return doc


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
