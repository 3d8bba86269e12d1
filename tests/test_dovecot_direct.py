"""The test harness itself: each real client against Dovecot directly, no proxy.

If these fail, proxy tests that use the same helpers cannot be trusted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.support import clients
from tests.support.dovecot import (
    STANDARD_MESSAGES,
    DovecotServer,
    standard_uidls,
)

pytestmark = pytest.mark.dovecot

ALICE = "alice"


def _lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def _port(server: DovecotServer, tls: str | None) -> int:
    return server.pop3s_port if tls == "implicit" else server.port


def test_standard_messages_are_what_the_tests_promise() -> None:
    assert len(STANDARD_MESSAGES) >= 4
    for msg in STANDARD_MESSAGES:
        assert msg.endswith(b"\r\n")
        assert b"\n" not in msg.replace(b"\r\n", b"")
        assert b"\r" not in msg.replace(b"\r\n", b"")
        assert all(len(line) <= 998 for line in msg.split(b"\r\n"))
        assert b"\r\nDate: " in msg and b"\r\nMessage-ID: <" in msg
    dots = STANDARD_MESSAGES[1].split(b"\r\n")
    assert b"+OK not a status" in dots and b"-ERR neither" in dots
    assert any(line.startswith(b"..") for line in dots)
    assert any(line.startswith(b".") and not line.startswith(b"..") for line in dots)
    assert b'filename="report.pdf"' in STANDARD_MESSAGES[2]
    assert 195 * 1024 < len(STANDARD_MESSAGES[3]) < 220 * 1024


@pytest.mark.parametrize(
    ("tls", "apop"),
    [(None, False), (None, True), ("stls", False), ("stls", True), ("implicit", False)],
)
def test_poplib(dovecot: DovecotServer, tls: str | None, apop: bool) -> None:
    result = clients.poplib_session(
        dovecot.host,
        _port(dovecot, tls),
        ALICE,
        dovecot.users[ALICE],
        apop=apop,
        tls=tls,  # type: ignore[arg-type]
        cafile=dovecot.cafile,
    )
    assert result["stat"] == (len(STANDARD_MESSAGES), sum(map(len, STANDARD_MESSAGES)))
    assert result["list"] == [
        f"{i} {len(m)}".encode() for i, m in enumerate(STANDARD_MESSAGES, start=1)
    ]
    assert result["uidl"] == [f"{i} {u}".encode() for i, u in enumerate(standard_uidls(), start=1)]
    header_end = STANDARD_MESSAGES[0].index(b"\r\n\r\n") + 4
    assert result["top"] == STANDARD_MESSAGES[0][:header_end]
    assert result["messages"] == list(STANDARD_MESSAGES)
    assert result["quit"].startswith(b"+OK")
    capa = result["capa"]
    assert "UIDL" in capa and "TOP" in capa
    if tls is None:
        assert "STLS" in capa


async def test_poplib_from_trio_thread(dovecot: DovecotServer) -> None:
    """How proxy tests call the helpers: in a worker thread, from trio."""
    result = await trio.to_thread.run_sync(
        lambda: clients.poplib_session(
            dovecot.host, dovecot.port, "bob", dovecot.users["bob"], retrieve=False
        )
    )
    assert result["stat"][0] == len(STANDARD_MESSAGES)
    assert result["messages"] == []


@pytest.mark.parametrize("tls", [None, "stls", "implicit"])
@pytest.mark.parametrize("mech", [None, "PLAIN", "LOGIN", "CRAM-MD5"])
def test_curl(dovecot: DovecotServer, tls: str | None, mech: str | None) -> None:
    common = dict(
        mech=mech,
        tls=tls,
        cafile=dovecot.cafile,
    )
    listing = clients.curl_fetch(
        dovecot.host,
        _port(dovecot, tls),
        ALICE,
        dovecot.users[ALICE],
        **common,  # type: ignore[arg-type]
    )
    assert listing == b"".join(
        f"{i} {len(m)}\r\n".encode() for i, m in enumerate(STANDARD_MESSAGES, start=1)
    )
    for number in (2, 4):
        got = clients.curl_fetch(
            dovecot.host,
            _port(dovecot, tls),
            ALICE,
            dovecot.users[ALICE],
            msg=number,
            **common,  # type: ignore[arg-type]
        )
        assert got == STANDARD_MESSAGES[number - 1]


def test_curl_wrong_password_raises(dovecot: DovecotServer) -> None:
    with pytest.raises(clients.ClientError, match="curl failed"):
        clients.curl_fetch(dovecot.host, dovecot.port, ALICE, "wrong", mech="PLAIN")


@pytest.mark.parametrize("tls", [None, "stls", "implicit"])
def test_fetchmail(dovecot: DovecotServer, tls: str | None, tmp_path: Path) -> None:
    out = clients.fetchmail_fetch(
        dovecot.host,
        _port(dovecot, tls),
        ALICE,
        dovecot.users[ALICE],
        tls=tls,  # type: ignore[arg-type]
        cafile=dovecot.cafile,
        workdir=tmp_path,
    )
    assert out == b"".join(_lf(m) for m in STANDARD_MESSAGES)


@pytest.mark.parametrize("tls", [None, "implicit"])
def test_getmail(dovecot: DovecotServer, tls: str | None, tmp_path: Path) -> None:
    got = clients.getmail_fetch(
        dovecot.host,
        _port(dovecot, tls),
        "bob",
        dovecot.users["bob"],
        tls=tls,  # type: ignore[arg-type]
        cafile=dovecot.cafile,
        workdir=tmp_path,
    )
    # getmail6 prepends a Return-Path header and hands over LF line ends.
    assert got == [b"Return-Path: <unknown>\n" + _lf(m) for m in STANDARD_MESSAGES]


def test_reset_restores_mailbox_and_uidls(dovecot_clean: DovecotServer) -> None:
    import poplib

    server = dovecot_clean
    client = poplib.POP3(server.host, server.port, timeout=10)
    client.user(ALICE)
    client.pass_(server.users[ALICE])
    client.dele(1)
    client.dele(3)
    client.quit()
    after = clients.poplib_session(
        server.host, server.port, ALICE, server.users[ALICE], retrieve=False
    )
    assert after["stat"][0] == len(STANDARD_MESSAGES) - 2

    server.reset_mailbox(ALICE)
    again = clients.poplib_session(server.host, server.port, ALICE, server.users[ALICE])
    assert again["messages"] == list(STANDARD_MESSAGES)
    assert again["uidl"] == [f"{i} {u}".encode() for i, u in enumerate(standard_uidls(), 1)]


def test_add_message(dovecot_clean: DovecotServer) -> None:
    server = dovecot_clean
    extra = b"From: x@example.org\r\nSubject: extra\r\n\r\n.leading dot\r\nbody\r\n"
    index = server.add_message("bob", extra)
    assert index == len(STANDARD_MESSAGES) + 1
    result = clients.poplib_session(server.host, server.port, "bob", server.users["bob"])
    assert result["messages"] == [*STANDARD_MESSAGES, extra]
    got = clients.curl_fetch(
        server.host, server.port, "bob", server.users["bob"], msg=index, mech="CRAM-MD5"
    )
    assert got == extra
