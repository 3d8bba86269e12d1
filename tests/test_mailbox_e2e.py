"""``serve --mailbox`` with real peers: recorded from Dovecot, then any client, in any order."""

from __future__ import annotations

import poplib
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy.replay.fake import FakeServer, ServeConfig, serve_replay
from popproxy.replay.script import load_session
from popproxy.replay.sources import load_mailbox
from tests.support import clients
from tests.support.dovecot import STANDARD_MESSAGES, USERS, DovecotServer, standard_uidls
from tests.support.recorder import record

ALICE = "alice"
PW = USERS[ALICE]

pytestmark = pytest.mark.dovecot


async def start(nursery: trio.Nursery, config: ServeConfig) -> tuple[FakeServer, int]:
    server = FakeServer(config)

    async def serve(task_status: trio.TaskStatus[Any]) -> None:
        await serve_replay(config, None, announce=False, server=server, task_status=task_status)

    addresses = await nursery.start(serve)
    return server, addresses[0][1]


@pytest.fixture(scope="module")
def recorded(dovecot: DovecotServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One poplib session (CAPA, USER/PASS, STAT, LIST, UIDL, TOP 1 0, RETR each, QUIT)."""
    dovecot.reset_mailbox(ALICE)
    path, _ = record(
        (dovecot.host, dovecot.port),
        tmp_path_factory.mktemp("rec"),
        lambda h, p: clients.poplib_session(h, p, ALICE, PW),
    )
    return path


def reordered(port: int, password: str = PW) -> dict[str, Any]:
    """A client that does things in its own order, none of which poplib_session did."""
    c = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        c.user(ALICE)
        c.pass_(password)
        out: dict[str, Any] = {"uidl2": c.uidl(2), "list3": c.list(3)}
        out["retr"] = {n: b"".join(x + b"\r\n" for x in c.retr(n)[1]) for n in (4, 2, 3, 1)}
        out["top"] = b"".join(x + b"\r\n" for x in c.top(2, 3)[1])
        c.dele(1)
        out["stat_after_dele"] = c.stat()
        out["list_after_dele"] = c.list()[1]
        c.rset()
        out["stat_after_rset"] = c.stat()
        out["noop"] = c.noop()
        out["quit"] = c.quit()
        return out
    except BaseException:
        c.close()
        raise


async def test_mailbox_answers_another_order_with_the_stored_octets(
    recorded: Path, tmp_path: Path
) -> None:
    config = ServeConfig(
        [], listen=("127.0.0.1", 0), password=PW, mailbox=load_mailbox([str(recorded)])
    )
    async with trio.open_nursery() as nursery:
        server, port = await start(nursery, config)
        got = await trio.to_thread.run_sync(reordered, port)
        again = await trio.to_thread.run_sync(
            lambda: clients.poplib_session("127.0.0.1", port, ALICE, PW)
        )
        nursery.cancel_scope.cancel()
    for n, data in got["retr"].items():
        assert data == STANDARD_MESSAGES[n - 1]
    head, _, body = STANDARD_MESSAGES[1].partition(b"\r\n\r\n")
    assert got["top"] == head + b"\r\n\r\n" + b"".join(body.splitlines(keepends=True)[:3])
    assert got["uidl2"] == f"+OK 2 {standard_uidls()[1]}".encode()
    sizes = [len(m) for m in STANDARD_MESSAGES]
    assert got["list3"] == f"+OK 3 {sizes[2]}".encode()
    assert got["stat_after_dele"] == (3, sum(sizes[1:]))
    assert got["list_after_dele"] == [f"{i} {sizes[i - 1]}".encode() for i in (2, 3, 4)]
    assert got["stat_after_rset"] == (4, sum(sizes))
    live = load_session(recorded)
    assert again["welcome"].split(b"<")[0] == live.greeting.split(b"<")[0]  # type: ignore[union-attr]
    assert again["messages"] == list(STANDARD_MESSAGES)
    assert server.report.near_misses == []


def _real_clients(port: int, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "fetchmail": clients.fetchmail_fetch("127.0.0.1", port, ALICE, PW, workdir=work / "fm"),
        "getmail": clients.getmail_fetch("127.0.0.1", port, ALICE, PW, workdir=work / "gm"),
    }
    for mech in ("PLAIN", "LOGIN", "CRAM-MD5"):
        out[mech] = clients.curl_fetch("127.0.0.1", port, ALICE, PW, mech=mech, msg=3)  # type: ignore[arg-type]
    out["curl-list"] = clients.curl_fetch("127.0.0.1", port, ALICE, PW)
    return out


async def test_mailbox_serves_fetchmail_getmail_and_curl(
    recorded: Path, dovecot_clean: DovecotServer, tmp_path: Path
) -> None:
    from_dovecot = await trio.to_thread.run_sync(
        lambda: _real_clients(dovecot_clean.port, tmp_path / "dovecot")
    )
    config = ServeConfig(
        [], listen=("127.0.0.1", 0), password=PW, mailbox=load_mailbox([str(recorded)])
    )
    async with trio.open_nursery() as nursery:
        server, port = await start(nursery, config)
        got = await trio.to_thread.run_sync(lambda: _real_clients(port, tmp_path / "fake"))
        with pytest.raises(clients.ClientError):
            await trio.to_thread.run_sync(
                lambda: clients.curl_fetch("127.0.0.1", port, ALICE, "wrong", mech="CRAM-MD5")
            )
        nursery.cancel_scope.cancel()
    assert got == from_dovecot
    lf = [m.replace(b"\r\n", b"\n") for m in STANDARD_MESSAGES]
    assert got["fetchmail"] == b"".join(lf)
    assert {got[m] for m in ("PLAIN", "LOGIN", "CRAM-MD5")} == {STANDARD_MESSAGES[2]}
    assert server.report.near_misses == []


async def test_ordered_replay_of_a_reordered_client_names_the_recorded_exchange(
    recorded: Path,
) -> None:
    config = ServeConfig([load_session(recorded)], listen=("127.0.0.1", 0), password=PW)
    async with trio.open_nursery() as nursery:
        server, port = await start(nursery, config)
        with pytest.raises(poplib.error_proto) as failed:
            await trio.to_thread.run_sync(reordered, port)
        nursery.cancel_scope.cancel()
    assert b"not in the recording" in failed.value.args[0]
    miss = server.report.near_misses[0]
    assert miss.received == "UIDL 2" and miss.closest == "UIDL"
    assert "the next recorded command is STAT" in miss.describe()


async def test_any_order_serves_a_reordered_poplib_from_a_dovecot_recording(
    recorded: Path,
) -> None:
    def client(port: int) -> list[bytes]:
        c = poplib.POP3("127.0.0.1", port, timeout=10)
        c.user(ALICE)
        c.pass_(PW)
        got = [b"".join(x + b"\r\n" for x in c.retr(n)[1]) for n in (3, 1, 4, 2)]
        c.uidl()
        c.stat()
        c.list()
        c.quit()
        return got

    config = ServeConfig([load_session(recorded)], listen=("127.0.0.1", 0), match="any")
    async with trio.open_nursery() as nursery:
        server, port = await start(nursery, config)
        got = await trio.to_thread.run_sync(client, port)
        nursery.cancel_scope.cancel()
    assert got == [STANDARD_MESSAGES[i] for i in (2, 0, 3, 1)]
    assert server.report.near_misses == []
    assert server.report.unplayed() == [f"{recorded}: TOP 1 0"]


# ------------------------------------------------------------------ a Maildir, two servers


def maildir_of(d: DovecotServer) -> Path:
    return d.dir / "mail" / ALICE / "Maildir"


def _listings(port: int) -> dict[str, Any]:
    c = poplib.POP3("127.0.0.1", port, timeout=10)
    c.user(ALICE)
    c.pass_(PW)
    out = {"stat": c.stat(), "list": c.list()[1], "uidl": c.uidl()[1]}
    out["one"] = [c.list(2), c.uidl(3)]
    c.quit()
    return out


async def test_a_maildir_served_by_mailbox_and_by_dovecot_is_the_same(
    dovecot_clean: DovecotServer, tmp_path: Path
) -> None:
    source = load_mailbox([str(maildir_of(dovecot_clean))])
    live = await trio.to_thread.run_sync(lambda: _listings(dovecot_clean.port))
    mail = await trio.to_thread.run_sync(
        lambda: clients.fetchmail_fetch(
            "127.0.0.1", dovecot_clean.port, ALICE, PW, workdir=tmp_path / "d"
        )
    )
    config = ServeConfig([], listen=("127.0.0.1", 0), password=PW, mailbox=source)
    async with trio.open_nursery() as nursery:
        _, port = await start(nursery, config)
        fake = await trio.to_thread.run_sync(lambda: _listings(port))
        fake_mail = await trio.to_thread.run_sync(
            lambda: clients.fetchmail_fetch("127.0.0.1", port, ALICE, PW, workdir=tmp_path / "f")
        )
        nursery.cancel_scope.cancel()
    assert fake == live
    assert fake_mail == mail and mail.count(b"Message-ID:") == 4


# ------------------------------------------------------------------ TLS and APOP


@pytest.mark.parametrize("tls", ["stls", "implicit"])
async def test_mailbox_over_stls_and_pop3s_with_popproxys_ca(
    recorded: Path, tmp_path: Path, tls: str
) -> None:
    config = ServeConfig(
        [],
        listen=("127.0.0.1", 0),
        password=PW,
        mailbox=load_mailbox([str(recorded)]),
        tls=tls == "implicit",
        ca_dir=tmp_path / "ca",
    )
    cafile = str(config.certificate_authority().cert_path)
    async with trio.open_nursery() as nursery:
        server, port = await start(nursery, config)
        got = await trio.to_thread.run_sync(
            lambda: clients.poplib_session("127.0.0.1", port, ALICE, PW, tls=tls, cafile=cafile)  # type: ignore[arg-type]
        )
        curled = await trio.to_thread.run_sync(
            lambda: clients.curl_fetch(
                "127.0.0.1",
                port,
                ALICE,
                PW,
                msg=2,
                tls=tls,
                cafile=cafile,
                mech="PLAIN",  # type: ignore[arg-type]
            )
        )
        nursery.cancel_scope.cancel()
    assert got["messages"] == list(STANDARD_MESSAGES)
    assert (b"STLS" in got["capa"]) is False  # not offered again under TLS
    assert curled == STANDARD_MESSAGES[1]
    assert server.report.near_misses == []


async def test_mailbox_apop_uses_a_fresh_timestamp(recorded: Path) -> None:
    config = ServeConfig(
        [], listen=("127.0.0.1", 0), password=PW, mailbox=load_mailbox([str(recorded)])
    )
    async with trio.open_nursery() as nursery:
        _, port = await start(nursery, config)
        first, second = [
            await trio.to_thread.run_sync(
                lambda: clients.poplib_session("127.0.0.1", port, ALICE, PW, apop=True)
            )
            for _ in range(2)
        ]
        with pytest.raises(poplib.error_proto, match="AUTH"):
            await trio.to_thread.run_sync(
                lambda: clients.poplib_session("127.0.0.1", port, ALICE, "wrong", apop=True)
            )
        nursery.cancel_scope.cancel()
    assert first["welcome"] != second["welcome"]
    assert first["messages"] == list(STANDARD_MESSAGES)
