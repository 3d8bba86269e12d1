"""``popproxy serve``: recorded server sides played to real clients, near misses reported."""

from __future__ import annotations

import os
import poplib
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy.replay.fake import FakeServer, ServeConfig, serve_replay
from popproxy.replay.script import load_session, load_sessions
from tests.support import clients
from tests.support.dovecot import USERS, DovecotServer
from tests.support.recorder import record
from tests.test_replay import write_capture

ALICE = "alice"
PW = USERS[ALICE]


async def _start(nursery: trio.Nursery, config: ServeConfig) -> tuple[FakeServer, int]:
    server = FakeServer(config)

    async def serve(task_status: trio.TaskStatus[Any]) -> None:
        await serve_replay(config, None, announce=False, server=server, task_status=task_status)

    addresses = await nursery.start(serve)
    return server, addresses[0][1]


def _recorded(d: DovecotServer, out: Path, **kw: Any) -> tuple[Path, dict[str, Any]]:
    return record((d.host, d.port), out, lambda h, p: clients.poplib_session(h, p, ALICE, PW, **kw))


@pytest.mark.dovecot
@pytest.mark.parametrize("apop", [False, True])
async def test_serve_answers_as_dovecot_did(
    dovecot_clean: DovecotServer, tmp_path: Path, apop: bool
) -> None:
    path, live = await trio.to_thread.run_sync(
        lambda: _recorded(dovecot_clean, tmp_path, apop=apop)
    )
    config = ServeConfig([load_session(path)], listen=("127.0.0.1", 0), password=PW)
    async with trio.open_nursery() as nursery:
        server, port = await _start(nursery, config)
        again = await trio.to_thread.run_sync(
            lambda: clients.poplib_session("127.0.0.1", port, ALICE, PW, apop=apop)
        )
        nursery.cancel_scope.cancel()
    assert again == live  # greeting, CAPA, listings, every message byte, QUIT text
    assert server.report.unplayed() == [] and server.report.near_misses == []


@pytest.mark.dovecot
async def test_sasl_cram_md5_is_verified(dovecot_clean: DovecotServer, tmp_path: Path) -> None:
    path, listing = await trio.to_thread.run_sync(
        lambda: record(
            (dovecot_clean.host, dovecot_clean.port),
            tmp_path,
            lambda h, p: clients.curl_fetch(h, p, ALICE, PW, mech="CRAM-MD5"),
        )
    )
    config = ServeConfig([load_session(path)] * 2, listen=("127.0.0.1", 0), password=PW)
    async with trio.open_nursery() as nursery:
        _, port = await _start(nursery, config)
        again = await trio.to_thread.run_sync(
            lambda: clients.curl_fetch("127.0.0.1", port, ALICE, PW, mech="CRAM-MD5")
        )
        with pytest.raises(clients.ClientError):
            await trio.to_thread.run_sync(
                lambda: clients.curl_fetch("127.0.0.1", port, ALICE, "nope", mech="CRAM-MD5")
            )
        nursery.cancel_scope.cancel()
    assert again == listing


def _simple(tmp_path: Path, name: str = "s.popcap") -> Path:
    return write_capture(
        tmp_path / name,
        [
            ("s", b"+OK ready <1.2@host>\r\n"),
            ("c", b"CAPA\r\n"),
            ("s", b"+OK\r\nUSER\r\nUIDL\r\n.\r\n"),
            ("c", b"USER alice\r\n"),
            ("s", b"+OK\r\n"),
            ("c", b"PASS #####\r\n"),
            ("s", b"+OK Logged in.\r\n"),
            ("c", b"STAT\r\n"),
            ("s", b"+OK 2 300\r\n"),
            ("c", b"RETR 1\r\n"),
            ("s", b"+OK\r\nSubject: one\r\n\r\n..dot\r\n.\r\n"),
            ("c", b"DELE 1\r\n"),
            ("s", b"+OK\r\n"),
            ("c", b"STAT\r\n"),
            ("s", b"+OK 1 200\r\n"),
            ("c", b"QUIT\r\n"),
            ("s", b"+OK bye\r\n"),
        ],
    )


def _client(port: int, script: list[bytes]) -> list[bytes]:
    """Send each line, collect each answer's status line (bodies are read and dropped)."""
    answers: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        f = sock.makefile("rb")
        answers.append(f.readline())
        for line in script:
            try:
                sock.sendall(line)
                answers.append(f.readline())
            except ConnectionError:
                answers.append(b"")  # the server closed (strict mode)
                break
            if answers[-1].startswith(b"+OK") and line.split()[0].upper() in (b"CAPA", b"RETR"):
                while f.readline() not in (b".\r\n", b""):
                    pass
    return answers


async def test_repeated_stat_keeps_recorded_order_and_capa_is_lenient(tmp_path: Path) -> None:
    config = ServeConfig([load_session(_simple(tmp_path))], listen=("127.0.0.1", 0))
    async with trio.open_nursery() as nursery:
        server, port = await _start(nursery, config)
        answers = await trio.to_thread.run_sync(
            lambda: _client(
                port,
                [
                    b"user alice\r\n",
                    b"PASS x\r\n",
                    b"NOOP\r\n",
                    b"stat\r\n",
                    b"CAPA\r\n",
                    b"RETR 1\r\n",
                    b"DELE 1\r\n",
                    b"STAT\r\n",
                    b"QUIT\r\n",
                ],
            )
        )
        nursery.cancel_scope.cancel()
    assert answers[4] == b"+OK 2 300\r\n" and answers[8] == b"+OK 1 200\r\n"
    assert answers[3] == b"+OK\r\n"  # NOOP, never recorded: +OK
    assert answers[-1] == b"+OK bye\r\n"
    assert server.report.unplayed() == []


async def test_near_miss_reports_the_closest_recorded_exchange(tmp_path: Path) -> None:
    config = ServeConfig([load_session(_simple(tmp_path))], listen=("127.0.0.1", 0))
    async with trio.open_nursery() as nursery:
        server, port = await _start(nursery, config)
        answers = await trio.to_thread.run_sync(
            lambda: _client(
                port, [b"USER alice\r\n", b"PASS x\r\n", b"STAT\r\n", b"RETR 2\r\n", b"QUIT\r\n"]
            )
        )
        nursery.cancel_scope.cancel()
    assert answers[4].startswith(b"-ERR") and b"RETR 1" in answers[4]
    [miss] = server.report.near_misses
    assert miss.closest == "RETR 1" and "arguments differ" in miss.differed
    assert "RETR 1" in " ".join(server.report.unplayed())  # the early QUIT skipped it


async def test_strict_ends_the_session_at_the_first_mismatch(tmp_path: Path) -> None:
    config = ServeConfig([load_session(_simple(tmp_path))], listen=("127.0.0.1", 0), strict=True)
    async with trio.open_nursery() as nursery:
        server, port = await _start(nursery, config)
        answers = await trio.to_thread.run_sync(
            lambda: _client(
                port, [b"CAPA\r\n", b"USER alice\r\n", b"\x00\xff garbage\r\n", b"STAT\r\n"]
            )
        )
        nursery.cancel_scope.cancel()
    assert answers[2] == b"+OK\r\n"
    assert answers[3].startswith(b"-ERR") and answers[4] == b""  # closed
    assert server.report.connections[0].ended == "mismatch (strict)"


async def test_garbage_and_wrong_password(tmp_path: Path) -> None:
    config = ServeConfig(
        [load_session(_simple(tmp_path))], listen=("127.0.0.1", 0), password="right", timeout=2
    )
    async with trio.open_nursery() as nursery:
        server, port = await _start(nursery, config)
        answers = await trio.to_thread.run_sync(
            lambda: _client(
                port,
                [
                    b"\x16\x03\x01 not pop3\r\n",
                    b"x" * 20000 + b"\r\n",
                    b"USER alice\r\n",
                    b"PASS wrong\r\n",
                    b"PASS right\r\n",
                ],
            )
        )
        nursery.cancel_scope.cancel()
    assert answers[1].startswith(b"-ERR") and answers[2].startswith(b"-ERR")
    assert answers[4].startswith(b"-ERR [AUTH]") and answers[5] == b"+OK Logged in.\r\n"
    assert len(server.report.near_misses) >= 2


async def test_successive_and_simultaneous_clients(tmp_path: Path) -> None:
    sessions = load_sessions(
        [str(_simple(tmp_path, "a.popcap")), str(_simple(tmp_path, "b.popcap"))]
    )
    config = ServeConfig(sessions, listen=("127.0.0.1", 0))
    lines = [
        b"USER alice\r\n",
        b"PASS x\r\n",
        b"STAT\r\n",
        b"RETR 1\r\n",
        b"DELE 1\r\n",
        b"STAT\r\n",
        b"QUIT\r\n",
    ]
    results: list[list[bytes]] = []
    async with trio.open_nursery() as nursery:
        server, port = await _start(nursery, config)
        async with trio.open_nursery() as clients_:
            for _ in range(2):
                clients_.start_soon(lambda: _run_client(port, lines, results))
        third = await trio.to_thread.run_sync(lambda: _client(port, []))
        nursery.cancel_scope.cancel()
    assert len(results) == 2 and all(r[-1] == b"+OK bye\r\n" for r in results)
    assert third[0].startswith(b"-ERR [SYS/TEMP]")
    assert server.report.unplayed() == []


async def _run_client(port: int, lines: list[bytes], results: list[list[bytes]]) -> None:
    results.append(await trio.to_thread.run_sync(lambda: _client(port, lines)))


def test_cli_prints_listening_and_checks_the_password(tmp_path: Path) -> None:
    capture = _simple(tmp_path)
    env = dict(os.environ, NO_COLOR="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "popproxy",
            "serve",
            str(capture),
            "--listen",
            "127.0.0.1:0",
            "--password",
            "right",
            "--timeout",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        assert first.startswith("listening on 127.0.0.1:")
        port = int(first.strip().rsplit(":", 1)[1])
        client = poplib.POP3("127.0.0.1", port, timeout=5)
        client.user("alice")
        with pytest.raises(poplib.error_proto, match="authentication failed"):
            client.pass_("wrong")
        client.close()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert b"wrong password" in out


def test_cli_bad_capture_is_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.popcap"
    bad.write_bytes(b"not a capture\n")
    proc = subprocess.run(
        [sys.executable, "-m", "popproxy", "serve", str(bad)], capture_output=True, timeout=20
    )
    assert proc.returncode == 2 and b"not a popproxy capture" in proc.stderr
