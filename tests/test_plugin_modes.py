"""The plugin never loses a recording: record modes, default paths, block-network, scrubbing."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.capture.reader import CaptureReader
from popproxy.core import Direction
from popproxy.replay import scrub
from popproxy.replay.scrub import Scrub, find_spans, scrub_capture
from tests.support.dovecot import STANDARD_MESSAGES, USERS, DovecotServer, free_port
from tests.test_plugin import SESSION
from tests.test_replay import write_capture

pytest_plugins = ["pytester"]
PW = USERS["alice"]

CLIENT = f"""
import poplib
import pytest

def fetch(server, n=1):
    c = poplib.POP3(server.host, server.port, timeout=10)
    c.user("alice")
    c.pass_({PW!r})
    count = c.stat()[0]
    got = [b"".join(x + b"\\r\\n" for x in c.retr(i)[1]) for i in range(1, n + 1)]
    c.quit()
    return count, got
"""


def _inner(pytester: pytest.Pytester, body: str) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_inner=CLIENT + body)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("mode", ["rewrite", "all", "new_episodes"])
def test_unreachable_upstream_keeps_the_old_captures(pytester: pytest.Pytester, mode: str) -> None:
    caps = pytester.path / "caps"
    (caps / "dir").mkdir(parents=True)
    write_capture(caps / "one.popcap", SESSION)
    write_capture(caps / "dir" / "a.popcap", SESSION)
    _inner(
        pytester,
        """
@pytest.mark.pop3_capture("caps/one.popcap")
def test_file(pop3_server):
    fetch(pop3_server, 0)

@pytest.mark.pop3_capture("caps/dir")
def test_folder(pop3_server):
    fetch(pop3_server, 0)
    fetch(pop3_server, 0)
""",
    )
    before = _snapshot(caps)
    port = free_port()
    result = pytester.runpytest(
        "-p", "no:cacheprovider", f"--pop3-record-mode={mode}", f"--pop3-upstream=127.0.0.1:{port}"
    )
    assert _snapshot(caps) == before
    text = result.stdout.str()
    assert "the recording is not usable" in text and "kept as it was" in text
    assert "upstream-error" in text and "cannot reach upstream" in text


def test_once_with_a_missing_capture_and_no_upstream_writes_nothing(
    pytester: pytest.Pytester,
) -> None:
    _inner(
        pytester,
        """
@pytest.mark.pop3_capture("caps/new.popcap")
def test_new(pop3_server):
    fetch(pop3_server, 0)
""",
    )
    result = pytester.runpytest(
        "-p",
        "no:cacheprovider",
        "--pop3-record-mode=once",
        f"--pop3-upstream=127.0.0.1:{free_port()}",
    )
    assert "not written" in result.stdout.str()
    assert not (pytester.path / "caps").exists() or not any((pytester.path / "caps").iterdir())


def test_block_network_refuses_all_but_the_fake_server(pytester: pytest.Pytester) -> None:
    write_capture(pytester.path / "one.popcap", SESSION)
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(
        test_net="""
import poplib, socket
import pytest
from popproxy.replay.netguard import NetworkBlocked

@pytest.mark.pop3_capture("one.popcap")
def test_fake_is_allowed(pop3_server):
    c = poplib.POP3(pop3_server.host, pop3_server.port, timeout=5)
    c.user("alice"); c.pass_("x"); assert c.stat() == (2, 300); c.quit()

def test_other_loopback_port_is_refused():
    listener = socket.create_server(("127.0.0.1", 0))
    with pytest.raises(NetworkBlocked, match="refused"):
        socket.create_connection(listener.getsockname(), timeout=1)

def test_remote_address_is_refused():
    s = socket.socket()
    with pytest.raises(NetworkBlocked):
        s.connect_ex(("192.0.2.1", 110))
    s.close()

def test_unix_sockets_pass():
    a, b = socket.socketpair(socket.AF_UNIX)
    a.close(); b.close()
"""
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--pop3-block-network")
    result.assert_outcomes(passed=4)
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "other_loopback")
    result.assert_outcomes(failed=1)  # without the option nothing is blocked


def test_scrub_rewrites_matches_as_declared_same_length_redactions(tmp_path: Path) -> None:
    body = b"From: carol@corp.example\r\nSubject: x\r\n\r\nhost mail.corp.example\r\n"
    chunks = [
        ("s", b"+OK ready at mail.corp.example\r\n"),
        ("c", b"RETR 1\r\n"),
        ("s", b"+OK 60 octets\r\nFrom: carol@co"),  # a match split across records
        ("s", body[len(b"From: carol@co") :] + b".\r\n"),
    ]
    path = write_capture(tmp_path / "s.popcap", chunks)
    size = path.stat().st_size
    rules = [Scrub(rb"[a-z.]*corp\.example", b"example.org", name="host")]
    assert scrub_capture(path, rules) == 3
    data = path.read_bytes()
    assert b"corp" not in data and path.stat().st_size > size
    lines = [json.loads(line) for line in data.split(b"\n") if line.startswith(b'{"r":"redact"')]
    assert [(r["d"], r["len"], r["kind"], r["rule"]) for r in lines] == [
        ("s", 17, "SCRUB", "host"),
        ("s", 12, "SCRUB", "host"),
        ("s", 17, "SCRUB", "host"),
    ]
    assert b"ready at example.org######\r\n" in data and b"carol@ex" in data
    assert b"ample.org#\r\n" in data and b"host example.org######\r\n" in data


# ------------------------------------------------------------------ against Dovecot


@pytest.mark.dovecot
def test_modes_against_dovecot(pytester: pytest.Pytester, dovecot_clean: DovecotServer) -> None:
    upstream = f"--pop3-upstream={dovecot_clean.host}:{dovecot_clean.port}"
    pytester.makeconftest(
        """
import pytest
from popproxy.replay.scrub import Scrub

@pytest.fixture
def pop3_before_record():
    return [Scrub(rb"Carol Sender", b"Someone Else", name="sender")]
"""
    )
    _inner(
        pytester,
        """
import os

def test_default_path(pop3_server):
    assert fetch(pop3_server)[0] == 4

@pytest.mark.pop3_capture("caps/eps")
def test_episodes(pop3_server):
    for _ in range(int(os.environ.get("SESSIONS", "1"))):
        assert fetch(pop3_server, 4)[0] == 4

@pytest.mark.pop3_capture("caps/eps", mode="mailbox")
def test_mailbox(pop3_server):
    count, got = fetch(pop3_server, 4)
    assert count == 4 and got[2:] == EXPECTED[2:]
    assert b"Someone Else" in got[0]
""".replace("EXPECTED", repr(list(STANDARD_MESSAGES))),
    )
    base = ["-p", "no:cacheprovider", upstream]
    result = pytester.runpytest(*base, "--pop3-record-mode=once", "-k", "not mailbox")
    result.assert_outcomes(passed=2)
    default = pytester.path / "captures" / "test_inner" / "test_default_path.popcap"
    assert default.is_file() and b"Carol Sender" not in default.read_bytes()
    assert b'"kind":"SCRUB"' in default.read_bytes() and PW.encode() not in default.read_bytes()
    [first] = (pytester.path / "caps" / "eps").glob("*.popcap")
    recorded = first.read_bytes()

    # new_episodes: the recorded session plays, the second is recorded and appended.
    pytester._monkeypatch.setenv("SESSIONS", "2")
    result = pytester.runpytest(*base, "--pop3-record-mode=new_episodes", "-k", "episodes")
    result.assert_outcomes(passed=1)
    captures = sorted((pytester.path / "caps" / "eps").glob("*.popcap"))
    assert len(captures) == 2 and first.read_bytes() == recorded
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "episodes")
    result.assert_outcomes(passed=1)  # offline: both sessions play
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "mailbox")
    result.assert_outcomes(passed=1)

    # all: the folder holds only the new recording; the replaced ones kept in .previous.
    pytester._monkeypatch.setenv("SESSIONS", "1")
    result = pytester.runpytest(*base, "--pop3-record-mode=all", "-k", "episodes")
    result.assert_outcomes(passed=1)
    eps = pytester.path / "caps" / "eps"
    assert len(list(eps.glob("*.popcap"))) == 1
    assert len(list((eps / ".previous").glob("*.popcap"))) == 2
    result = pytester.runpytest("-p", "no:cacheprovider", "-k", "episodes")
    result.assert_outcomes(passed=1)  # the next offline run plays, no unplayed sessions

    # rewrite: replaced, nothing kept beside it.
    result = pytester.runpytest(*base, "--pop3-record-mode=rewrite", "-k", "default")
    result.assert_outcomes(passed=1)
    assert not default.with_name(default.name + ".previous").exists()


def test_mailbox_mode_reports_what_the_recording_cannot_answer(pytester: pytest.Pytester) -> None:
    from tests.test_mailbox import SESSION as MAILBOX_SESSION

    write_capture(pytester.path / "box.popcap", MAILBOX_SESSION)
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(
        test_box="""
import poplib
import pytest

def login(server):
    c = poplib.POP3(server.host, server.port, timeout=5)
    c.user("alice"); c.pass_("pw")
    return c

@pytest.mark.pop3_capture("box.popcap", mode="mailbox", password="pw")
def test_other_order(pop3_server):
    c = login(pop3_server)
    assert c.uidl(2) == b"+OK 2 uid-two"
    c.dele(1)
    assert c.stat()[0] == 1
    c.quit()
    assert len(pop3_server.maildrop.messages) == 2  # each session starts afresh

@pytest.mark.pop3_capture("box.popcap", mode="mailbox", persist=True)
def test_persist(pop3_server):
    c = login(pop3_server)
    c.dele(1)
    c.quit()
    assert login(pop3_server).stat()[0] == 1
    assert [m.uid for m in pop3_server.maildrop.messages] == ["uid-two"]

@pytest.mark.pop3_capture("box.popcap", mode="mailbox")
def test_unrecorded_message(pop3_server):
    c = login(pop3_server)
    with pytest.raises(poplib.error_proto, match="SYS/PERM"):
        c.retr(2)
    c.quit()

@pytest.mark.pop3_capture("box.popcap", mode="mailbox", allow_near_misses=True)
def test_unrecorded_message_allowed(pop3_server):
    c = login(pop3_server)
    with pytest.raises(poplib.error_proto):
        c.retr(2)
    c.quit()
"""
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=1)
    text = result.stdout.str()
    assert "could not answer" in text and "message 2 was never retrieved" in text


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"corp.example", b"x", b"corp.", b"example ", b"\r\n", b"c"]), max_size=60
    ),
    st.lists(st.integers(min_value=1, max_value=300), max_size=8),
)
def test_scrub_spans_do_not_depend_on_record_boundaries(
    pieces: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(pieces)
    points = sorted({c for c in cuts if c < len(stream)})
    records = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    folder = Path(tempfile.mkdtemp(prefix="popproxy-test-"))
    path = write_capture(folder / "s.popcap", [("s", r) for r in records if r])
    rule = Scrub(rb"corp\.example|c{1,3}", b"ZZ")
    with mock.patch.object(scrub, "WINDOW", 16):  # matches are shorter; streams longer
        spans = find_spans(path, [rule], Direction.SERVER)
    expected = [(m.start(), m.end() - m.start()) for m in rule.regex().finditer(stream)]
    assert [(s.offset, s.length) for s in spans] == expected
    scrub_capture(path, [rule])
    again = b"".join(r.data or b"" for r in CaptureReader(path).records() if r.kind == "d")
    assert len(again) == len(stream) and b"corp.example" not in again


def test_marker_match_any_plays_another_order(pytester: pytest.Pytester) -> None:
    from tests.test_serve import _simple

    _simple(pytester.path)
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(
        test_any="""
import poplib
import pytest

def other_order(server):
    c = poplib.POP3(server.host, server.port, timeout=5)
    c.user("alice"); c.pass_("x")
    c.retr(1)
    stats = [c.stat()]
    c.dele(1)
    stats.append(c.stat())
    c.quit()
    return stats

@pytest.mark.pop3_capture("s.popcap", match="any")
def test_any(pop3_server):
    assert other_order(pop3_server) == [(2, 300), (1, 200)]

@pytest.mark.pop3_capture("s.popcap")
def test_ordered(pop3_server):
    with pytest.raises(poplib.error_proto, match="not in the recording"):
        other_order(pop3_server)
"""
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)  # ordered: the unplayed exchanges fail it
    assert "out of order: the next recorded command is STAT" in result.stdout.str()
