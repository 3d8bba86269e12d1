"""The fake mailbox's state machine, its sources (captures, Maildir, mbox, .eml) and the CLI."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import mailbox as stdlib_mailbox
import os
import poplib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.capture.format import CaptureError
from popproxy.core.values import apop_timestamp
from popproxy.replay.fake import ConnectionReport, ServeConfig
from popproxy.replay.mailbox import MailboxSession, Maildrop, stuff, top_of
from popproxy.replay.mailbox_auth import Authenticator, LoginPolicy
from popproxy.replay.mailbox_server import MailboxConnection
from popproxy.replay.script import load_session
from popproxy.replay.sources import MailboxSource, from_sessions, load_mailbox, unstuff
from tests.test_replay import write_capture

M1 = b"From: a@example.org\r\nSubject: one\r\n\r\nline 1\r\n.dotted\r\nline 3\r\n"
M2_SIZE = 321

SESSION = [
    ("s", b"+OK Fake POP3 <1.2@mail.example>\r\n"),
    ("c", b"CAPA\r\n"),
    ("s", b"+OK\r\nUSER\r\nUIDL\r\nTOP\r\nSTLS\r\n.\r\n"),
    ("c", b"USER alice\r\n"),
    ("s", b"+OK go on\r\n"),
    ("c", b"PASS ####\r\n"),
    ("s", b"+OK Welcome, alice.\r\n"),
    ("c", b"STAT\r\n"),
    ("s", f"+OK 2 {len(M1) + M2_SIZE}\r\n".encode()),
    ("c", b"LIST\r\n"),
    ("s", f"+OK 2 messages (here)\r\n1 {len(M1)}\r\n2 {M2_SIZE}\r\n.\r\n".encode()),
    ("c", b"UIDL\r\n"),
    ("s", b"+OK\r\n1 uid-one\r\n2 uid-two\r\n.\r\n"),
    ("c", b"RETR 1\r\n"),
    ("s", f"+OK {len(M1)} octets follow\r\n".encode() + stuff(M1)),
    ("c", b"QUIT\r\n"),
    ("s", b"+OK See you.\r\n"),
]


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    return write_capture(tmp_path / "s.popcap", SESSION)


def session_for(
    capture: Path, password: str | None = "pw", persist: bool = False
) -> tuple[MailboxSession, Maildrop]:
    drop = Maildrop(from_sessions([load_session(capture)]), persist=persist)
    return MailboxSession(drop, Authenticator(LoginPolicy(password)), stls=True), drop


def talk(session: MailboxSession, *lines: str) -> list[bytes]:
    return [session.answer(line.encode() + b"\r\n").data for line in lines]


def login(session: MailboxSession, password: str = "pw") -> None:
    assert talk(session, "USER alice", f"PASS {password}")[1].startswith(b"+OK")


def test_reply_texts_follow_the_recorded_server(capture: Path) -> None:
    s, _ = session_for(capture)
    greeting = s.greeting()
    assert greeting.startswith(b"+OK Fake POP3 <") and b"@mail.example>" in greeting
    assert apop_timestamp(greeting) != "<1.2@mail.example>"  # RFC 1939 §7: fresh each time
    assert talk(s, "USER alice", "PASS pw") == [b"+OK go on\r\n", b"+OK Welcome, alice.\r\n"]
    assert talk(s, "STAT")[0] == f"+OK 2 {len(M1) + M2_SIZE}\r\n".encode()
    assert talk(s, "LIST")[0].startswith(b"+OK 2 messages (here)\r\n1 ")
    assert talk(s, "RETR 1")[0] == f"+OK {len(M1)} octets follow\r\n".encode() + stuff(M1)
    assert talk(s, "QUIT")[0] == b"+OK See you.\r\n"


def test_what_the_recordings_cannot_answer_is_sys_perm_with_a_reason(capture: Path) -> None:
    s, _ = session_for(capture)
    login(s)
    answer = s.answer(b"RETR 2\r\n")
    assert answer.data.startswith(b"-ERR [SYS/PERM] popproxy mailbox: message 2 was never")
    assert answer.miss is not None and "seen only in LIST, UIDL" in answer.miss
    assert s.answer(b"TOP 2 0\r\n").data.startswith(b"-ERR [SYS/PERM]")
    assert talk(s, "LIST 2", "UIDL 2") == [f"+OK 2 {M2_SIZE}\r\n".encode(), b"+OK 2 uid-two\r\n"]


def test_top_is_computed_from_the_full_message(capture: Path) -> None:
    s, _ = session_for(capture)
    login(s)
    assert talk(s, "TOP 1 0")[0] == b"+OK\r\nFrom: a@example.org\r\nSubject: one\r\n\r\n.\r\n"
    assert talk(s, "TOP 1 2")[0].endswith(b"\r\n\r\nline 1\r\n..dotted\r\n.\r\n")
    assert talk(s, "TOP 1 99")[0] == b"+OK\r\n" + stuff(M1)


def test_dele_rset_quit_and_persist(capture: Path) -> None:
    s, drop = session_for(capture, persist=True)
    login(s)
    assert talk(s, "DELE 1", "DELE 1", "RETR 1")[1:] == [b"-ERR Message is deleted.\r\n"] * 2
    assert talk(s, "STAT")[0] == f"+OK 1 {M2_SIZE}\r\n".encode()
    assert talk(s, "RSET", "STAT")[1] == f"+OK 2 {len(M1) + M2_SIZE}\r\n".encode()
    talk(s, "DELE 2")
    s.answer(b"NOOP\r\n")
    ended = s.answer(b"QUIT\r\n")
    assert ended.then == "close"
    again = MailboxSession(drop, Authenticator(LoginPolicy(None)))
    login(again)
    assert talk(again, "STAT", "UIDL")[0] == f"+OK 1 {len(M1)}\r\n".encode()
    # A session that ends without QUIT never reaches UPDATE (RFC 1939 §6).
    third = MailboxSession(drop, Authenticator(LoginPolicy(None)))
    login(third)
    talk(third, "DELE 1")
    assert drop.messages and len(drop.open()) == 1


def test_without_persist_each_session_starts_from_the_recording(capture: Path) -> None:
    s, drop = session_for(capture)
    login(s)
    talk(s, "DELE 1", "QUIT")
    fresh = MailboxSession(drop, Authenticator(LoginPolicy(None)))
    login(fresh)
    assert talk(fresh, "STAT")[0].startswith(b"+OK 2 ")


def test_bad_commands_and_states(capture: Path) -> None:
    s, _ = session_for(capture)
    assert talk(s, "STAT")[0].startswith(b"-ERR [AUTH]")
    assert talk(s, "PASS pw")[0] == b"-ERR No username given.\r\n"
    assert talk(s, "USER alice", "PASS nope")[1].startswith(b"-ERR [AUTH] Authentication failed")
    login(s)
    assert talk(s, "RETR 0", "RETR 9", "RETR x", "TOP 1", "USER bob", "FOO") == [
        b"-ERR There's no message 0.\r\n",
        b"-ERR There's no message 9.\r\n",
        b"-ERR Invalid message number: x\r\n",
        b"-ERR TOP needs a message number and a line count.\r\n",
        b"-ERR Unknown command: USER\r\n",
        b"-ERR Unknown command: FOO\r\n",
    ]
    assert talk(s, "STLS")[0].startswith(b"-ERR")
    assert s.answer(b"NOOP " + b"x" * 300 + b"\r\n").data == b"-ERR Command line too long.\r\n"


def test_capa_keeps_the_recorded_lines_and_drops_stls_under_tls(capture: Path) -> None:
    s, _ = session_for(capture)
    assert talk(s, "CAPA")[0] == b"+OK\r\nUSER\r\nUIDL\r\nTOP\r\nSTLS\r\n.\r\n"
    answer = s.answer(b"STLS\r\n")
    assert answer.then == "tls"
    s.tls_started()
    assert talk(s, "CAPA")[0] == b"+OK\r\nUSER\r\nUIDL\r\nTOP\r\n.\r\n"


def test_apop_and_sasl_with_fresh_timestamps_and_challenges(capture: Path) -> None:
    s, _ = session_for(capture)
    ts = apop_timestamp(s.greeting())
    assert ts is not None
    digest = hashlib.md5((ts + "pw").encode()).hexdigest()
    assert talk(s, f"APOP alice {'0' * 32}")[0].startswith(b"-ERR [AUTH]")
    assert talk(s, f"APOP alice {digest}")[0] == b"+OK Welcome, alice.\r\n"

    plain = base64.b64encode(b"\x00alice\x00pw").decode()
    s, _ = session_for(capture)
    assert talk(s, f"AUTH PLAIN {plain}")[0].startswith(b"+OK")
    s, _ = session_for(capture)
    assert talk(s, "AUTH PLAIN", plain) == [b"+ \r\n", b"+OK Welcome, alice.\r\n"]
    s, _ = session_for(capture)
    user, pw = (base64.b64encode(x).decode() for x in (b"alice", b"bad"))
    assert talk(s, "AUTH LOGIN", user)[1] == b"+ " + base64.b64encode(b"Password:") + b"\r\n"
    assert talk(s, pw)[0].startswith(b"-ERR [AUTH]")

    challenges = []
    for _ in range(2):
        s, _ = session_for(capture)
        first = s.answer(b"AUTH CRAM-MD5\r\n").data
        challenge = base64.b64decode(first[2:].strip())
        challenges.append(challenge)
        mac = hmac.new(b"pw", challenge, hashlib.md5).hexdigest()
        assert talk(s, base64.b64encode(f"alice {mac}".encode()).decode())[0].startswith(b"+OK")
    assert challenges[0] != challenges[1]
    s, _ = session_for(capture)
    talk(s, "AUTH CRAM-MD5")
    assert talk(s, "*")[0] == b"-ERR Authentication cancelled.\r\n"
    assert talk(s, "AUTH GSSAPI")[0] == b"-ERR Unsupported authentication mechanism.\r\n"
    # SCRAM is listed because the password is known (its server signature needs it).
    mechanisms = b"PLAIN\r\nLOGIN\r\nCRAM-MD5\r\nSCRAM-SHA-1\r\nSCRAM-SHA-256\r\n"
    assert talk(s, "AUTH")[0] == b"+OK\r\n" + mechanisms + b"XOAUTH2\r\nOAUTHBEARER\r\n.\r\n"


def test_user_name_is_checked_when_given(capture: Path) -> None:
    drop = Maildrop(from_sessions([load_session(capture)]))
    s = MailboxSession(drop, Authenticator(LoginPolicy("pw", user="alice")))
    assert talk(s, "USER bob", "PASS pw")[1].startswith(b"-ERR [AUTH]")


@functools.cache
def _source() -> MailboxSource:
    path = write_capture(Path(tempfile.mkdtemp(prefix="popproxy-test-")) / "s.popcap", SESSION)
    return from_sessions([load_session(path)])


COMMANDS = st.sampled_from(
    [
        "USER alice",
        "PASS pw",
        "PASS x",
        "STAT",
        "LIST",
        "LIST 1",
        "LIST 7",
        "UIDL",
        "UIDL 2",
        "RETR 1",
        "RETR 2",
        "TOP 1 1",
        "DELE 1",
        "DELE 2",
        "RSET",
        "NOOP",
        "CAPA",
        "AUTH PLAIN",
        "AUTH LOGIN",
        "*",
        "STLS",
        "APOP alice x",
        "QUIT",
        "",
        "\xff\xfe",
        "LIST -1",
        "TOP 1 x",
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(COMMANDS, max_size=25), st.binary(max_size=40))
def test_any_sequence_gets_one_status_line_per_answer(lines: list[str], junk: bytes) -> None:
    drop = Maildrop(_source())
    s = MailboxSession(drop, Authenticator(LoginPolicy("pw")), stls=True)
    for line in [*lines, junk.decode("latin-1")]:
        answer = s.answer(line.encode("utf-8", "surrogateescape") + b"\r\n")
        assert answer.data.endswith(b"\r\n")
        assert answer.data.split(b" ", 1)[0].split(b"\r\n")[0] in (b"+OK", b"-ERR", b"+")
        if answer.then == "close":
            break


def test_stuff_and_unstuff_round_trip() -> None:
    for data in (M1, b"no final newline", b".\r\n..\r\n", b""):
        expected = data if data.endswith(b"\n") or not data else data + b"\r\n"
        assert unstuff(stuff(data)) == expected
    assert top_of(b"no header end", 3) == b"no header end"


# ------------------------------------------------------------------ mail files


def _maildir(path: Path) -> list[bytes]:
    box = stdlib_mailbox.Maildir(str(path), create=True)
    messages = [b"Subject: a\n\nbody a\n", b"Subject: b\n\n.line\n"]
    for data in messages:
        box.add(data)
    return [m.replace(b"\n", b"\r\n") for m in messages]


def test_maildir_mbox_and_eml_sources(tmp_path: Path) -> None:
    expected = _maildir(tmp_path / "md")
    source = load_mailbox([str(tmp_path / "md")])
    assert sorted(m.data or b"" for m in source.messages) == sorted(expected)
    assert all(m.uid and ":" not in m.uid for m in source.messages)

    mbox = stdlib_mailbox.mbox(str(tmp_path / "box.mbox"))
    mbox.add(b"From: x@example.org\nSubject: m1\n\nhello\n")
    mbox.add(b"From: y@example.org\nSubject: m2\n\nworld\n")
    mbox.close()
    source = load_mailbox([str(tmp_path / "box.mbox")])
    assert [m.data for m in source.messages] == [
        b"From: x@example.org\r\nSubject: m1\r\n\r\nhello\r\n",
        b"From: y@example.org\r\nSubject: m2\r\n\r\nworld\r\n",
    ]

    (tmp_path / "eml").mkdir()
    (tmp_path / "eml" / "b.eml").write_bytes(b"Subject: b\r\n\r\nB\r\n")
    (tmp_path / "eml" / "a.eml").write_bytes(b"Subject: a\r\n\r\nA\r\n")
    source = load_mailbox([str(tmp_path / "eml")])
    assert [m.uid for m in source.messages] == ["a", "b"]
    drop = Maildrop(source)
    s = MailboxSession(drop, Authenticator(LoginPolicy(None)))
    assert s.greeting().startswith(b"+OK popproxy mailbox ready. <")
    login(s)
    assert talk(s, "UIDL")[0] == b"+OK\r\n1 a\r\n2 b\r\n.\r\n"
    capa = talk(s, "CAPA")[0]
    assert b"SASL PLAIN LOGIN CRAM-MD5" in capa and b"UIDL" in capa


@pytest.mark.parametrize(
    "content,message",
    [(None, "no such file"), (b"garbage", "not a capture, an mbox"), (b"", "not a capture")],
)
def test_bad_sources_are_one_clear_error(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    target = tmp_path / "x"
    if content is not None:
        target.write_bytes(content)
    with pytest.raises(CaptureError, match=message):
        load_mailbox([str(target)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptureError, match="neither a Maildir"):
        load_mailbox([str(tmp_path / "empty")])


def test_cli_serves_a_maildir(tmp_path: Path) -> None:
    expected = _maildir(tmp_path / "md")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "popproxy",
            "serve",
            "--mailbox",
            str(tmp_path / "md"),
            "--listen",
            "127.0.0.1:0",
            "--password",
            "pw",
            "--ca-dir",
            str(tmp_path / "ca"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, NO_COLOR="1"),
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        assert first.startswith("listening on 127.0.0.1:")
        client = poplib.POP3("127.0.0.1", int(first.strip().rsplit(":", 1)[1]), timeout=5)
        client.user("anyone")
        client.pass_("pw")
        got = sorted(b"".join(x + b"\r\n" for x in client.retr(i)[1]) for i in (1, 2))
        client.quit()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert got == sorted(expected)
    assert b"RETR 1" in out and b"2 message(s)" in err


def test_cli_persist_needs_mailbox(tmp_path: Path, capture: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "popproxy", "serve", str(capture), "--persist"],
        capture_output=True,
        timeout=20,
    )
    assert proc.returncode == 2 and b"--persist and --user need --mailbox" in proc.stderr


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["box.mbox", "m.eml", "x.popcap", "cur/1:2,S"]))
def test_any_file_loads_or_is_one_clear_error(data: bytes, name: str) -> None:
    root = Path(tempfile.mkdtemp(prefix="popproxy-test-"))
    target = root / name
    if name.startswith("cur/"):
        (root / "new").mkdir()
        target.parent.mkdir()
    payload = (b"From " + data) if name.endswith(".mbox") else data
    target.write_bytes(payload)
    try:
        source = load_mailbox([str(root if name.startswith("cur/") else target)])
    except CaptureError:
        return
    s = MailboxSession(Maildrop(source), Authenticator(LoginPolicy(None)))
    login(s)
    for line in ("STAT", "LIST", "UIDL", "RETR 1", "TOP 1 0", "QUIT"):
        assert s.answer(line.encode() + b"\r\n").data[:1] in (b"+", b"-")


# ------------------------------------------------------------------ segmentation


SCRIPT = (
    b"CAPA\r\nUSER alice\r\nPASS pw\r\nSTAT\r\nLIST\r\nUIDL 2\r\nRETR 1\r\nTOP 1 1\r\n"
    b"DELE 1\r\nRETR 1\r\nRSET\r\nAUTH\r\nNOOP\r\nQUIT\r\n"
)


async def _serve_script(chunks: list[bytes]) -> bytes:
    source = from_sessions([load_session(_no_timestamp())])
    config = ServeConfig([], password="pw", mailbox=source, timeout=5)
    client, server = trio.testing.memory_stream_pair()
    connection = MailboxConnection(
        config, Maildrop(source), server, ConnectionReport(1, None, "test"), None
    )
    out = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection.run)
        for chunk in chunks:
            await client.send_all(chunk)
        while data := await client.receive_some(65536):
            out += data
            if out.endswith(b"+OK See you.\r\n"):
                break
    return bytes(out)


@functools.cache
def _no_timestamp() -> Path:
    chunks = [("s", b"+OK Fake POP3 ready\r\n"), *SESSION[1:]]
    return write_capture(Path(tempfile.mkdtemp(prefix="popproxy-test-")) / "n.popcap", chunks)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(SCRIPT) - 1), max_size=20))
async def test_answers_do_not_depend_on_segmentation(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [SCRIPT[a:b] for a, b in zip([0, *points], [*points, len(SCRIPT)], strict=True)]
    whole = await _serve_script([SCRIPT])
    assert whole.count(b"\r\n.\r\n") >= 4 and whole.endswith(b"+OK See you.\r\n")
    assert await _serve_script(chunks) == whole


def test_error_texts_follow_the_recorded_server(tmp_path: Path) -> None:
    chunks = [
        *SESSION[:-2],
        ("c", b"RETR 7\r\n"),
        ("s", b"-ERR No such message, sorry (7).\r\n"),
        ("c", b"XYZZY\r\n"),
        ("s", b"-ERR What is XYZZY?\r\n"),
        *SESSION[-2:],
    ]
    drop = Maildrop(from_sessions([load_session(write_capture(tmp_path / "e.popcap", chunks))]))
    s = MailboxSession(drop, Authenticator(LoginPolicy("pw")))
    login(s)
    assert talk(s, "LIST 9", "FOO", "DELE 1", "DELE 1") == [
        b"-ERR No such message, sorry (9).\r\n",
        b"-ERR What is FOO?\r\n",
        b"+OK Marked to be deleted.\r\n",  # no DELE recorded: the default wording
        b"-ERR Message is deleted.\r\n",
    ]
