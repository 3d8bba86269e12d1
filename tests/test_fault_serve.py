"""Fault injection in ``popproxy serve`` and the pytest plugin, observed through real clients."""

from __future__ import annotations

import poplib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy.faults import FaultSet, parse_rule
from popproxy.replay.fake import FakeServer, ServeConfig, serve_replay
from popproxy.replay.script import load_session
from tests.support import clients
from tests.test_replay import write_capture

pytest_plugins = ["pytester"]

MSG1 = b"Subject: one\r\n\r\n..a dotted line\r\n..\r\n" + b"x" * 600 + b"\r\n"  # dot-stuffed
MSG2 = b"Subject: two\r\n\r\nsecond\r\n"
CAPA = b"+OK\r\nUSER\r\nTOP\r\nUIDL\r\n.\r\n"
SESSION = [
    ("s", b"+OK fake ready\r\n"),
    ("c", b"CAPA\r\n"),
    ("s", CAPA),
    ("c", b"USER alice\r\n"),
    ("s", b"+OK\r\n"),
    ("c", b"PASS #####\r\n"),
    ("s", b"+OK Logged in.\r\n"),
    ("c", b"STAT\r\n"),
    ("s", f"+OK 2 {len(MSG1) + len(MSG2)}\r\n".encode()),
    ("c", b"LIST\r\n"),
    ("s", f"+OK\r\n1 {len(MSG1) - 1}\r\n2 {len(MSG2)}\r\n.\r\n".encode()),
    ("c", b"RETR 1\r\n"),
    ("s", b"+OK message follows\r\n" + MSG1 + b".\r\n"),
    ("c", b"RETR 2\r\n"),
    ("s", b"+OK message follows\r\n" + MSG2 + b".\r\n"),
    ("c", b"UIDL\r\n"),  # last: getmail6 needs it (mailbox mode), poplib_run skips it
    ("s", b"+OK\r\n1 uid-one\r\n2 uid-two\r\n.\r\n"),
    ("c", b"QUIT\r\n"),
    ("s", b"+OK Logging out.\r\n"),
]


CURL_SESSION = SESSION[:7] + SESSION[11:13] + SESSION[17:]  # CAPA, USER, PASS, RETR 1, QUIT


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    return write_capture(tmp_path / "s.popcap", SESSION)


@pytest.fixture
def curl_capture(tmp_path: Path) -> Path:
    return write_capture(tmp_path / "curl.popcap", CURL_SESSION)


@asynccontextmanager
async def serving(
    capture: Path, *rules: str, seed: int = 1
) -> AsyncIterator[tuple[FakeServer, int]]:
    config = ServeConfig(
        [load_session(capture)],
        listen=("127.0.0.1", 0),
        repeat=True,
        timeout=10,
        faults=FaultSet([parse_rule(x) for x in rules], seed=seed),
    )
    server = FakeServer(config)

    async def serve(task_status: trio.TaskStatus[Any]) -> None:
        await serve_replay(config, None, announce=False, server=server, task_status=task_status)

    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(serve)
        yield server, addresses[0][1]
        nursery.cancel_scope.cancel()


def poplib_run(port: int, *, timeout: float = 5) -> dict[str, Any]:
    """USER/PASS, STAT, LIST, RETR 1, RETR 2, QUIT; the first error ends it (kept in ``error``)."""
    out: dict[str, Any] = {}
    c = poplib.POP3("127.0.0.1", port, timeout=timeout)
    try:
        out["welcome"] = c.getwelcome()
        out["user"] = c.user("alice")
        out["pass"] = c.pass_("secret")
        out["stat"] = c.stat()
        out["list"] = c.list()[1]
        out["retr1"] = c.retr(1)[1]
        out["retr2"] = c.retr(2)[1]
        out["quit"] = c.quit()
    except (poplib.error_proto, OSError) as exc:
        out["error"] = exc
    finally:
        c.close()
    return out


def raw_run(port: int, lines: list[bytes], *, timeout: float = 5) -> bytes:
    """Send each line after the previous answer's first bytes; return everything received."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        got += s.recv(65536)
        for line in lines:
            s.sendall(line)
            time.sleep(0.05)
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionError):
                break
            got += chunk
            if not chunk:
                break
    return got


async def run(fn: Any, *args: Any, **kw: Any) -> Any:
    return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


# ------------------------------------------------------------------ answers


async def test_poplib_raises_error_proto_with_the_injected_text(capture: Path) -> None:
    async with serving(capture, "PASS: -ERR [IN-USE] mailbox locked") as (server, port):
        got = await run(poplib_run, port)
    assert isinstance(got["error"], poplib.error_proto)
    assert got["error"].args == (b"-ERR [IN-USE] mailbox locked",)
    assert "stat" not in got
    [line] = server.report.faults
    assert "PASS: -ERR [IN-USE] mailbox locked" in line and "answered" in line


async def test_poplib_takes_a_nonstandard_plus_err_for_success(capture: Path) -> None:
    # hMailServer's "+ERR": poplib only checks the first byte, so the error passes as +OK.
    async with serving(capture, "STAT: +ERR 0 0") as (_, port):
        got = await run(poplib_run, port)
    assert "error" not in got and got["stat"] == (0, 0)


async def test_rules_by_nth_occurrence_and_state(capture: Path) -> None:
    rules = ("RETR: -ERR [SYS/TEMP] second fetch fails nth=2", "NOOP: -ERR never state=UPDATE")
    async with serving(capture, *rules) as (server, port):
        got = await run(poplib_run, port)
    assert got["retr1"][0] == b"Subject: one"
    assert got["error"].args == (b"-ERR [SYS/TEMP] second fetch fails",)
    assert len(server.report.faults) == 1


async def test_mailbox_mode_takes_the_same_rules(capture: Path) -> None:
    from popproxy.replay.sources import load_mailbox

    config = ServeConfig(
        [],
        listen=("127.0.0.1", 0),
        mailbox=load_mailbox([str(capture)]),
        faults=FaultSet(
            [parse_rule("RETR 2: -ERR [SYS/TEMP] not now"), parse_rule("STAT: delay 200ms")]
        ),
    )
    server = FakeServer(config)

    async def serve(task_status: trio.TaskStatus[Any]) -> None:
        await serve_replay(config, None, announce=False, server=server, task_status=task_status)

    async with trio.open_nursery() as nursery:
        port = (await nursery.start(serve))[0][1]
        t0 = time.monotonic()
        got = await run(poplib_run, port)
        nursery.cancel_scope.cancel()
    assert time.monotonic() - t0 >= 0.2
    assert got["retr1"][0] == b"Subject: one"
    assert got["error"].args == (b"-ERR [SYS/TEMP] not now",)
    assert len(server.report.faults) == 2


async def test_everything_not_faulted_is_byte_exact(capture: Path) -> None:
    async with serving(capture) as (_, port):
        plain = await run(poplib_run, port)
    async with serving(capture, "TOP: stall", "RETR 3: cut", "*: delay 1ms state=UPDATE") as (
        server,
        port,
    ):
        faulted = await run(poplib_run, port)
    assert faulted == plain and "error" not in plain
    assert server.report.faults == []


# ------------------------------------------------------------------ cuts, stalls, timing


@pytest.mark.parametrize(("how", "code"), [("", 0), ("rst", 56)])
async def test_curl_exit_code_on_a_cut_mid_retr(curl_capture: Path, how: str, code: int) -> None:
    # curl 7.88 (man curl, EXIT CODES): a reset is 56 "failure in receiving network data";
    # a FIN mid-RETR is taken as the end of the message: exit 0 with the message truncated
    # (POP3 has no length for curl to check, so 18 "partial file" never happens).
    async with serving(curl_capture, f"RETR 1: cut after 300 {how}") as (server, port):
        proc = await run(
            subprocess.run,
            [
                "curl",
                "--silent",
                "--show-error",
                "--max-time",
                "10",
                "--user",
                "alice:x",
                f"pop3://127.0.0.1:{port}/1",
            ],
            capture_output=True,
        )
    assert proc.returncode == code, proc.stderr
    unstuffed = MSG1.replace(b"\r\n..", b"\r\n.")
    assert len(proc.stdout) < len(unstuffed) and unstuffed.startswith(proc.stdout)
    assert len(proc.stdout) > 250
    assert server.report.connections[0].fault_ended
    assert server.report.unplayed() == []  # what the cut left unplayed is expected


async def test_cut_bytes_reach_the_client_exactly(capture: Path) -> None:
    async with serving(capture, "RETR 1: cut after 30") as (_, port):
        got = await run(
            raw_run,
            port,
            [
                b"USER alice\r\n",
                b"PASS b\r\n",
                b"STAT\r\n",
                b"LIST\r\n",
                b"RETR 1\r\n",
                b"NOOP\r\n",
            ],
        )
    before = b"".join(data for d, data in SESSION[:11] if d == "s" and data != CAPA)
    retr = b"+OK message follows\r\n" + MSG1
    assert got == before + retr[:30]


async def test_stall_leaves_poplib_to_time_out(capture: Path) -> None:
    async with serving(capture, "STAT: stall") as (_, port):
        t0 = time.monotonic()
        got = await run(poplib_run, port, timeout=1)
    assert isinstance(got["error"], TimeoutError) and time.monotonic() - t0 >= 1


async def test_delay_and_throttle_take_their_time(capture: Path) -> None:
    async with serving(capture, "STAT: delay 300ms", "RETR 1: throttle 2KiB/s") as (_, port):
        t0 = time.monotonic()
        got = await run(poplib_run, port)
        took = time.monotonic() - t0
    assert "error" not in got and got["retr1"][-1] == b"x" * 600
    assert took >= 0.3 + len(MSG1) / 2048 * 0.9


async def test_greeting_faults(capture: Path) -> None:
    async with serving(capture, "greeting: -ERR [SYS/TEMP] too busy") as (_, port):
        with pytest.raises(poplib.error_proto, match="too busy"):
            await run(poplib.POP3, "127.0.0.1", port, timeout=5)


def after_silence(port: int, line: bytes, wait: float) -> bytes:
    """Send one line, stay silent ``wait`` seconds, then read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        got = s.recv(100)
        s.sendall(line)
        time.sleep(wait)
        while chunk := s.recv(100):
            got += chunk
    return got


async def test_inactivity_is_unsolicited_then_closes(capture: Path) -> None:
    async with serving(capture, "USER: inactivity 200ms") as (server, port):
        got = await run(after_silence, port, b"USER alice\r\n", 0.5)
    # The reply, then (unasked) the inactivity line, then EOF.
    assert got == b"+OK fake ready\r\n+OK\r\n-ERR Disconnected for inactivity.\r\n"
    assert server.report.connections[-1].fault_ended


async def test_idle_closes_without_a_word(capture: Path) -> None:
    async with serving(capture, "*: idle 200ms") as (_, port):
        got = await run(after_silence, port, b"CAPA\r\n", 0.5)
    assert got == b"+OK fake ready\r\n" + CAPA


async def test_corrupt_framing(capture: Path) -> None:
    async with serving(capture, "RETR 1: corrupt unstuffed") as (_, port):
        got = await run(poplib_run, port)
    # The line "." sent unstuffed ends the message early; what follows breaks the next reply.
    assert got["retr1"] == [b"Subject: one", b"", b".a dotted line"]
    assert isinstance(got["error"], poplib.error_proto)
    async with serving(capture, "LIST: corrupt bare-lf") as (_, port):
        got = await run(poplib_run, port)
    assert "error" not in got  # poplib reads bare LF lines too
    async with serving(capture, "LIST: corrupt no-terminator") as (_, port):
        got = await run(poplib_run, port, timeout=1)
    # The listing never ends: poplib reads on into the next reply, then times out.
    assert "list" not in got and isinstance(got["error"], TimeoutError)


async def test_advertised_mechanism_is_refused(capture: Path) -> None:
    async with serving(capture, "CAPA: advertise XOAUTH2") as (server, port):
        got = await run(raw_run, port, [b"CAPA\r\n", b"AUTH XOAUTH2 dG9rZW4=\r\n"])
    assert b"SASL XOAUTH2\r\n.\r\n" in got
    assert got.endswith(b"-ERR Unsupported authentication mechanism.\r\n")
    assert len(server.report.faults) == 2


async def test_seeded_probability_gives_the_same_session_twice(capture: Path) -> None:
    runs = []
    for _ in range(2):
        async with serving(capture, "*: -ERR chaos p=0.5 seed=11", seed=99) as (server, port):
            got = await run(
                raw_run, port, [b"CAPA\r\n", b"USER alice\r\n", b"PASS b\r\n", b"STAT\r\n"] * 3
            )
            runs.append((got, server.report.faults))
    assert runs[0] == runs[1] and b"-ERR chaos" in runs[0][0]


# ------------------------------------------------------------------ fetchmail and getmail6


async def test_fetchmail_logs_the_error_and_keeps_the_mail(capture: Path, tmp_path: Path) -> None:
    from popproxy.replay.sources import load_mailbox

    # The mailbox answers fetchmail's own command order; --persist keeps deletions across
    # sessions, so a second session sees whether fetchmail's DELE survived the cut.
    config = ServeConfig(
        [],
        listen=("127.0.0.1", 0),
        mailbox=load_mailbox([str(capture)]),
        persist=True,
        faults=FaultSet([parse_rule("RETR 2: cut after 10 rst")]),
    )
    server = FakeServer(config)

    async def serve(task_status: trio.TaskStatus[Any]) -> None:
        await serve_replay(config, None, announce=False, server=server, task_status=task_status)

    async with trio.open_nursery() as nursery:
        port = (await nursery.start(serve))[0][1]
        with pytest.raises(clients.ClientError) as info:
            await run(
                clients.fetchmail_fetch,
                "127.0.0.1",
                port,
                "alice",
                "x",
                workdir=tmp_path,
                keep=False,
            )
        after = await run(poplib_run, port)
        nursery.cancel_scope.cancel()
    text = str(info.value)
    assert "POP3> RETR 2" in text and "DELE 1" in text  # it fetched 1, marked it, then the cut
    assert "socket error" in text or "Connection reset" in text or "EOF" in text, text[-800:]
    assert after["stat"][0] == 2  # the cut session never reached UPDATE: nothing deleted
    assert len(server.report.connections[0].faults) == 1


async def test_getmail_reports_a_cut(capture: Path, tmp_path: Path) -> None:
    from popproxy.replay.sources import load_mailbox

    config = ServeConfig(
        [],
        listen=("127.0.0.1", 0),
        mailbox=load_mailbox([str(capture)]),
        faults=FaultSet([parse_rule("RETR 1: cut after 100 rst")]),
    )
    server = FakeServer(config)

    async def serve(task_status: trio.TaskStatus[Any]) -> None:
        await serve_replay(config, None, announce=False, server=server, task_status=task_status)

    async with trio.open_nursery() as nursery:
        port = (await nursery.start(serve))[0][1]
        with pytest.raises(clients.ClientError) as info:
            await run(clients.getmail_fetch, "127.0.0.1", port, "alice", "x", workdir=tmp_path)
        nursery.cancel_scope.cancel()
    assert "getmail failed" in str(info.value)
    assert "reset" in str(info.value).lower() or "error" in str(info.value).lower()
    [line] = server.report.faults  # the cut itself, not a command the fake did not know
    assert "cut 100 bytes into the reply (RST)" in line


# ------------------------------------------------------------------ CLI and plugin


def test_serve_refuses_a_bad_rule_in_one_line(capture: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "popproxy", "serve", str(capture), "--fault", "RETR 1: cutt"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "popproxy serve: error: --fault 'RETR 1: cutt', column 9: unknown action 'cutt' "
        "(expected a reply such as '-ERR ...' or one of: delay, stall, cut, throttle, "
        "corrupt, inactivity, idle, advertise)"
    ]


PLUGIN_TESTS = """
import poplib
import pytest

@pytest.mark.pop3_capture("s.popcap", faults=["PASS: -ERR [IN-USE] locked"])
def test_marker(pop3_server):
    c = poplib.POP3(pop3_server.host, pop3_server.port, timeout=5)
    c.user("alice")
    with pytest.raises(poplib.error_proto, match="IN-USE"):
        c.pass_("x")
    assert pop3_server.report.faults

@pytest.mark.pop3_capture("s.popcap", allow_unplayed=True)
def test_added_mid_test(pop3_server):
    c = poplib.POP3(pop3_server.host, pop3_server.port, timeout=5)
    c.user("alice")
    c.pass_("x")
    assert c.stat()[0] == 2
    pop3_server.add_fault("RETR 1: -ERR [SYS/TEMP] not now")
    with pytest.raises(poplib.error_proto, match="not now"):
        c.retr(1)
    with pytest.raises(ValueError, match="column"):
        pop3_server.add_fault("RETR: nonsense")

@pytest.mark.pop3_capture("s.popcap", faults=["RETR: oops"])
def test_bad_rule(pop3_server):
    pass
"""


def test_plugin_marker_and_add_fault(pytester: pytest.Pytester, capture: Path) -> None:
    (pytester.path / "s.popcap").write_bytes(capture.read_bytes())
    pytester.makepyfile(PLUGIN_TESTS)
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        ["*pop3_capture(faults=...): 'RETR: oops', column 7: unknown action*"]
    )
