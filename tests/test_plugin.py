"""The pytest plugin: pop3_server plays captures to sync and async tests, and records them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.dovecot import USERS, DovecotServer
from tests.test_replay import write_capture

pytest_plugins = ["pytester"]

SESSION = [
    ("s", b"+OK ready\r\n"),
    ("c", b"USER alice\r\n"),
    ("s", b"+OK\r\n"),
    ("c", b"PASS #####\r\n"),
    ("s", b"+OK Logged in.\r\n"),
    ("c", b"STAT\r\n"),
    ("s", b"+OK 2 300\r\n"),
    ("c", b"QUIT\r\n"),
    ("s", b"+OK bye\r\n"),
]

TESTS = """
import poplib
import pytest
import trio

def session(host, port, stat=True):
    c = poplib.POP3(host, port, timeout=5)
    c.user("alice")
    c.pass_("hello")
    result = c.stat() if stat else None
    c.quit()
    return result

@pytest.mark.pop3_capture("caps/one.popcap")
def test_sync(pop3_server):
    assert session(pop3_server.host, pop3_server.port) == (2, 300)

@pytest.mark.pop3_capture("caps/one.popcap")
async def test_async(pop3_server):
    got = await trio.to_thread.run_sync(session, pop3_server.host, pop3_server.port)
    assert got == (2, 300)

@pytest.mark.pop3_capture("caps/one.popcap")
def test_unplayed(pop3_server):
    c = poplib.POP3(pop3_server.host, pop3_server.port, timeout=5)
    c.user("alice")
    c.pass_("x")
    c.quit()

@pytest.mark.pop3_capture("caps/one.popcap", allow_unplayed=True)
def test_unplayed_allowed(pop3_server):
    session(pop3_server.host, pop3_server.port, stat=False)

@pytest.mark.pop3_capture("caps/missing.popcap")
def test_missing(pop3_server):
    pass
"""


def test_plays_captures_to_sync_and_async_tests(pytester: pytest.Pytester) -> None:
    (pytester.path / "caps").mkdir()
    write_capture(pytester.path / "caps" / "one.popcap", SESSION)
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_inner=TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=2)
    text = result.stdout.str()
    assert "recorded POP3 exchanges were not played" in text and "STAT" in text
    assert "no POP3 capture at" in text and "--pop3-record-mode=once" in text


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["*pop3_capture(path*"])


@pytest.mark.dovecot
def test_record_mode_once_records_then_replays(
    pytester: pytest.Pytester, dovecot_clean: DovecotServer
) -> None:
    pw = USERS["alice"]
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(
        test_rec=f"""
import poplib
import pytest

@pytest.mark.pop3_capture("caps/login.popcap")
def test_login(pop3_server):
    c = poplib.POP3(pop3_server.host, pop3_server.port, timeout=5)
    c.user("alice")
    c.pass_({pw!r})
    assert c.stat()[0] == 4
    c.quit()
"""
    )
    upstream = f"{dovecot_clean.host}:{dovecot_clean.port}"
    result = pytester.runpytest(
        "-p", "no:cacheprovider", "--pop3-record-mode=once", f"--pop3-upstream={upstream}"
    )
    result.assert_outcomes(passed=1)
    capture = pytester.path / "caps" / "login.popcap"
    assert capture.is_file() and pw.encode() not in capture.read_bytes()
    # Now the capture exists: mode none plays it, with Dovecot stopped being irrelevant.
    result = pytester.runpytest("-p", "no:cacheprovider", "--pop3-upstream=127.0.0.1:1")
    result.assert_outcomes(passed=1)
    shutil.copy(capture, pytester.path / "kept.popcap")
    assert Path(pytester.path / "kept.popcap").stat().st_size > 100
