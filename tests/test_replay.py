"""``popproxy replay`` against the real Dovecot: recorded sessions replay, changes are named."""

from __future__ import annotations

import json
import poplib
import socket
import threading
import time
from pathlib import Path

import pytest

from popproxy.capture import format as fmt
from popproxy.cli.main import main
from popproxy.core import Direction
from popproxy.replay.auth import apop_digest, cram_md5_response, read_password
from popproxy.replay.script import load_session
from tests.support import clients
from tests.support.dovecot import MSG_PLAIN, USERS, DovecotServer
from tests.support.recorder import record

ALICE = "alice"
PW = USERS[ALICE]


def _server(d: DovecotServer) -> str:
    return f"{d.host}:{d.port}"


def _userpass(d: DovecotServer, out: Path) -> Path:
    path, _ = record((d.host, d.port), out, lambda h, p: clients.poplib_session(h, p, ALICE, PW))
    return path


def write_capture(path: Path, chunks: list[tuple[str, bytes]]) -> Path:
    """A hand-made capture: (direction, bytes) data records after a minimal header."""
    pieces = [fmt.encode_meta({"r": fmt.HEADER, "v": fmt.VERSION, "client": "test"})]
    for i, (direction, data) in enumerate(chunks):
        pieces.extend(fmt.encode_data(Direction(direction), i * 0.01, data))
    path.write_bytes(b"".join(pieces))
    return path


# ------------------------------------------------------------------ against Dovecot


@pytest.mark.dovecot
def test_userpass_replays_equivalent_then_names_stat_and_list(
    dovecot_clean: DovecotServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _userpass(dovecot_clean, tmp_path)
    assert b"PASS " + b"#" * len(PW) in path.read_bytes()  # redacted
    monkeypatch.setenv("POPPROXY_PASSWORD", PW)
    assert main(["replay", str(path), "--server", _server(dovecot_clean)]) == 0
    assert "equivalent" in capsys.readouterr().out
    dovecot_clean.add_message(ALICE, MSG_PLAIN.replace(b"Hello", b"Hello again"))
    assert main(["replay", str(path), "--server", _server(dovecot_clean)]) == 1
    out = capsys.readouterr().out
    assert "✗ STAT" in out and "✗ LIST" in out and "stat.count: recorded 4, live 5" in out
    assert "not in the recording" in out  # the new UID, found with UIDL


@pytest.mark.dovecot
def test_apop_replays_with_a_fresh_digest(
    dovecot_clean: DovecotServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = record(
        (dovecot_clean.host, dovecot_clean.port),
        tmp_path,
        lambda h, p: clients.poplib_session(h, p, ALICE, PW, apop=True),
    )
    assert b"APOP alice " + b"#" * 32 in path.read_bytes()
    monkeypatch.setenv("POPPROXY_PASSWORD", PW)
    assert main(["replay", str(path), "--server", _server(dovecot_clean)]) == 0


@pytest.mark.dovecot
@pytest.mark.parametrize("mech", ["CRAM-MD5", "PLAIN", "LOGIN"])
def test_sasl_replays(
    dovecot_clean: DovecotServer,
    tmp_path: Path,
    mech: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, _ = record(
        (dovecot_clean.host, dovecot_clean.port),
        tmp_path,
        lambda h, p: clients.curl_fetch(h, p, ALICE, PW, mech=mech),
    )  # type: ignore[arg-type]
    assert PW.encode() not in path.read_bytes()
    monkeypatch.setenv("POPPROXY_PASSWORD", PW)
    assert main(["replay", str(path), "--server", _server(dovecot_clean), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["equivalent"] and any(
        x["command"].startswith(f"AUTH {mech}") for x in doc["exchanges"]
    )


@pytest.mark.dovecot
def test_deletions_are_undone_unless_committed(
    dovecot_clean: DovecotServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def dele(host: str, port: int) -> None:
        client = poplib.POP3(host, port, timeout=10)
        client.user(ALICE)
        client.pass_(PW)
        client.dele(1)
        client.quit()

    dovecot_clean.reset_mailbox(ALICE)
    path, _ = record((dovecot_clean.host, dovecot_clean.port), tmp_path, dele)
    dovecot_clean.reset_mailbox(ALICE)
    monkeypatch.setenv("POPPROXY_PASSWORD", PW)
    main(["replay", str(path), "--server", _server(dovecot_clean)])
    out = capsys.readouterr().out
    assert "RSET" in out and "--commit-deletes" in out
    assert _count(dovecot_clean) == 4
    assert main(["replay", str(path), "--server", _server(dovecot_clean), "--commit-deletes"]) == 0
    assert _count(dovecot_clean) == 3


def _count(d: DovecotServer) -> int:
    client = poplib.POP3(d.host, d.port, timeout=10)
    client.user(ALICE)
    client.pass_(PW)
    count = client.stat()[0]
    client.quit()
    return count


@pytest.mark.dovecot
def test_wrong_password_is_a_refused_login(
    dovecot_clean: DovecotServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _userpass(dovecot_clean, tmp_path)
    started = time.monotonic()
    assert (
        main(["replay", str(path), "--server", _server(dovecot_clean), "--password", "wrong"]) == 2
    )
    assert "login refused" in capsys.readouterr().err
    assert time.monotonic() - started < 5


@pytest.mark.dovecot
def test_missing_password_is_a_usage_error(
    dovecot_clean: DovecotServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _userpass(dovecot_clean, tmp_path)
    monkeypatch.delenv("POPPROXY_PASSWORD", raising=False)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main(["replay", str(path), "--server", _server(dovecot_clean)]) == 2
    assert "redacted" in capsys.readouterr().err


# ------------------------------------------------------------------ bad input, no Dovecot


def test_capture_without_client_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_capture(tmp_path / "x.popcap", [("s", b"+OK hello\r\n")])
    assert main(["replay", str(path), "--server", "127.0.0.1:1"]) == 2
    assert "no client side" in capsys.readouterr().err


def test_unsupported_mechanism(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_capture(
        tmp_path / "x.popcap",
        [
            ("s", b"+OK hi\r\n"),
            ("c", b"AUTH GSSAPI YIIB\r\n"),
            ("s", b"+ cj1hYmM=\r\n"),
        ],
    )
    assert main(["replay", str(path), "--server", "127.0.0.1:1", "--password", "x"]) == 2
    assert "cannot replay AUTH GSSAPI" in capsys.readouterr().err


def test_unreachable_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_capture(
        tmp_path / "x.popcap", [("s", b"+OK hi\r\n"), ("c", b"NOOP\r\n"), ("s", b"+OK\r\n")]
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["replay", str(path), "--server", f"127.0.0.1:{port}"]) == 2
    assert "cannot reach" in capsys.readouterr().err


def _one_shot_server(behaviour: str) -> tuple[int, threading.Thread]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            if behaviour == "close-after-greeting":
                conn.sendall(b"+OK hi\r\n")
                conn.recv(100)
            elif behaviour == "silent":
                time.sleep(2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def test_server_closing_early(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_capture(
        tmp_path / "x.popcap",
        [
            ("s", b"+OK hi\r\n"),
            ("c", b"USER a\r\n"),
            ("s", b"+OK\r\n"),
            ("c", b"PASS ###\r\n"),
            ("s", b"+OK in\r\n"),
        ],
    )
    port, thread = _one_shot_server("close-after-greeting")
    assert (
        main(
            [
                "replay",
                str(path),
                "--server",
                f"127.0.0.1:{port}",
                "--password",
                "x",
                "--timeout",
                "3",
            ]
        )
        == 2
    )
    assert "closed the connection" in capsys.readouterr().err
    thread.join(5)


def test_silent_server_times_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_capture(
        tmp_path / "x.popcap", [("s", b"+OK hi\r\n"), ("c", b"NOOP\r\n"), ("s", b"+OK\r\n")]
    )
    port, thread = _one_shot_server("silent")
    started = time.monotonic()
    assert main(["replay", str(path), "--server", f"127.0.0.1:{port}", "--timeout", "0.5"]) == 2
    assert "within 0.5 s" in capsys.readouterr().err
    assert time.monotonic() - started < 2
    thread.join(5)


def test_pipelined_batch_stays_one_batch(tmp_path: Path) -> None:
    path = write_capture(
        tmp_path / "x.popcap",
        [
            ("s", b"+OK hi\r\n"),
            ("c", b"STAT\r\nNOOP\r\n"),
            ("s", b"+OK 0 0\r\n+OK\r\n"),
            ("c", b"QUIT\r\n"),
            ("s", b"+OK bye\r\n"),
        ],
    )
    session = load_session(path)
    from popproxy.replay.client import batches

    assert [[s.verb for s in b] for b in batches(session.steps)] == [["STAT", "NOOP"], ["QUIT"]]


def test_credential_helpers() -> None:
    # RFC 1939 §7's example.
    assert (
        apop_digest("<1896.697170952@dbc.mtview.ca.us>", "tanstaaf")
        == "c4c9334bac560ecc979e58001b3e22fb"
    )
    # RFC 2195 §2's example.
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    import base64

    assert (
        base64.b64decode(cram_md5_response("tim", "tanstaaftanstaaf", challenge))
        == b"tim b913a602c7eda7a495b4e6e7334d3890"
    )
    assert (
        read_password(
            password=None, password_file=None, env={"POPPROXY_PASSWORD": "e"}, interactive=False
        )
        == "e"
    )
    assert (
        read_password(
            password=None, password_file=None, env={}, interactive=True, prompt=lambda _: "typed"
        )
        == "typed"
    )
    assert read_password(password=None, password_file=None, env={}, interactive=False) is None
