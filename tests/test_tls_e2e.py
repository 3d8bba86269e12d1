"""TLS end to end: real clients through ``record`` to the real Dovecot, and scripted peers
for STLS injection (RFC 2595 §4), strip mode and handshake faults.

Every proxy here uses a CA under ``tmp_path`` and a short linger (a TLS leg cannot
half-close, so a session ends by the watchdog's linger after one side closed).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import poplib
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy.capture import format as fmt
from popproxy.capture.reader import CaptureReader
from popproxy.inspect.document import capture_json
from popproxy.proxy.config import ProxyConfig, StlsMode
from popproxy.proxy.server import serve_record
from popproxy.tls.contexts import client_context
from tests.support import clients
from tests.support.dovecot import STANDARD_MESSAGES, DovecotServer
from tests.support.faults import wait_ended
from tests.support.scripted import TeeRelay
from tests.support.tlsfakes import BODY, LineClient, StlsServer, client_hello, client_ssl_context

pytestmark = pytest.mark.dovecot

ALICE = "alice"
HOST = "127.0.0.1"
CLIENT_TIMEOUT = 15.0


# ----------------------------------------------------------------------------- helpers


def make_config(tmp_path: Path, dovecot: DovecotServer | None = None, **kw: Any) -> ProxyConfig:
    out = tmp_path / "captures"
    out.mkdir(exist_ok=True)
    settings: dict[str, Any] = dict(
        listen=(HOST, 0),
        out_dir=out,
        linger=0.2,
        connect_timeout=5.0,
        ca_dir=tmp_path / "ca",
    )
    if dovecot is not None:
        settings["upstream"] = (dovecot.host, dovecot.port)
        settings["upstream_context"] = client_context(cafile=dovecot.cafile)
    settings.update(kw)
    return ProxyConfig(**settings)


@contextlib.asynccontextmanager
async def running(config: ProxyConfig) -> AsyncIterator[int]:
    """The proxy on a free loopback port; yields the port."""
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(functools.partial(serve_record, config, None, announce=False))
        yield addrs[0][1]
        nursery.cancel_scope.cancel()


async def in_thread(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kw))


async def wait_captures(config: ProxyConfig, count: int) -> list[Path]:
    """The ``count`` finished captures, in session order."""
    return await wait_ended(config.out_dir, count)


class Capture:
    """One capture: ``doc`` is ``show --json``'s document, ``records`` every record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.raw = path.read_bytes()
        with CaptureReader(path) as reader:
            self.records = list(reader.records())
        with CaptureReader(path) as reader:
            self.doc = capture_json(reader)
        self.end = self.doc["session"]["end"]

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [r.fields for r in self.records if r.kind == kind]

    def stream(self, direction: str) -> bytes:
        return b"".join(
            r.data or b"" for r in self.records if r.kind == fmt.DATA and r.fields["d"] == direction
        )

    def commands(self) -> list[str]:
        return [ex["command"] for ex in self.doc["exchanges"] if ex["kind"] == "command"]

    def anomalies(self, kind: str) -> list[dict[str, Any]]:
        return [a for a in self.doc["anomalies"] if a["kind"] == kind]


def assert_no_password(password: str, paths: list[Path], *dirs: Path) -> None:
    """Neither the password nor its SASL PLAIN/LOGIN encodings are in any file."""
    pw = password.encode()
    plain = base64.b64encode(b"\0" + ALICE.encode() + b"\0" + pw)
    plain2 = base64.b64encode(ALICE.encode() + b"\0" + ALICE.encode() + b"\0" + pw)
    login = base64.b64encode(pw)
    files = list(paths) + [f for d in dirs for f in d.rglob("*") if f.is_file()]
    for f in files:
        data = f.read_bytes()
        for secret in (pw, plain, plain2, login):
            assert secret not in data, (f, secret)


def poplib_same_as_direct(got: dict[str, Any], direct: dict[str, Any]) -> None:
    for key in ("stat", "list", "uidl", "top", "messages"):
        assert got[key] == direct[key], key
    assert got["messages"] == list(STANDARD_MESSAGES)
    assert got["quit"].startswith(b"+OK")


def tls_records(cap: Capture, direction: str) -> list[dict[str, Any]]:
    return [r for r in cap.kind(fmt.TLS) if r["d"] == direction]


def _lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


# ----------------------------------------------------------------------------- 1. STLS intercept


async def test_stls_intercept_real_clients(dovecot: DovecotServer, tmp_path: Path) -> None:
    config = make_config(tmp_path, dovecot)
    ca = str(config.certificate_authority().cert_path)
    pw = dovecot.users[ALICE]
    with trio.fail_after(50):
        direct = await in_thread(
            clients.poplib_session,
            dovecot.host,
            dovecot.port,
            ALICE,
            pw,
            tls="stls",
            cafile=dovecot.cafile,
            timeout=CLIENT_TIMEOUT,
        )
        async with running(config) as port:
            got = await in_thread(
                clients.poplib_session,
                HOST,
                port,
                ALICE,
                pw,
                tls="stls",
                cafile=ca,
                timeout=CLIENT_TIMEOUT,
            )
            msg2 = await in_thread(
                clients.curl_fetch,
                HOST,
                port,
                ALICE,
                pw,
                msg=2,
                tls="stls",
                cafile=ca,
                timeout=CLIENT_TIMEOUT,
            )
            fetched = await in_thread(
                clients.fetchmail_fetch,
                "localhost",
                port,
                ALICE,
                pw,
                tls="stls",
                cafile=ca,
                workdir=tmp_path / "fetchmail",
                timeout=CLIENT_TIMEOUT,
            )
            paths = await wait_captures(config, 3)
    poplib_same_as_direct(got, direct)
    assert got["capa"] == direct["capa"]  # the post-TLS CAPA, as Dovecot sends it
    assert msg2 == STANDARD_MESSAGES[1]
    assert fetched == b"".join(_lf(m) for m in STANDARD_MESSAGES)

    caps = [Capture(p) for p in paths]
    for cap in caps:
        assert cap.end["how"] == "quit", cap.end
        for d in ("c", "s"):
            (rec,) = tls_records(cap, d)
            assert rec["decrypted"] is True and rec["mode"] == "stls", rec
            assert rec["version"].startswith("TLS")
        # Every command after STLS was decrypted and parsed.
        commands = cap.commands()
        assert "STLS" in commands
        after = commands[commands.index("STLS") + 1 :]
        assert after and None not in after
        assert after[-1] == "QUIT"
        assert not cap.anomalies("plaintext-after-stls")
        assert cap.doc["session"]["user"] == ALICE
    pop = caps[0].commands()
    for verb in ("USER", "PASS", "STAT", "RETR"):
        assert verb in pop[pop.index("STLS") :], (verb, pop)
    assert "RETR" in caps[1].commands()  # curl
    assert "RETR" in caps[2].commands()  # fetchmail
    assert_no_password(pw, paths, config.out_dir, tmp_path / "ca")


# ----------------------------------------------------------------------------- 2. pop3s <-> pop3s


async def test_pop3s_both_legs(dovecot: DovecotServer, tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        dovecot,
        upstream=(dovecot.host, dovecot.pop3s_port),
        listen_tls=True,
        upstream_tls=True,
    )
    ca = str(config.certificate_authority().cert_path)
    pw = dovecot.users[ALICE]
    with trio.fail_after(50):
        direct = await in_thread(
            clients.poplib_session,
            dovecot.host,
            dovecot.pop3s_port,
            ALICE,
            pw,
            tls="implicit",
            cafile=dovecot.cafile,
            timeout=CLIENT_TIMEOUT,
        )
        direct_curl = await in_thread(
            clients.curl_fetch,
            "localhost",
            dovecot.pop3s_port,
            ALICE,
            pw,
            msg=1,
            tls="implicit",
            cafile=dovecot.cafile,
            timeout=CLIENT_TIMEOUT,
        )
        async with running(config) as port:
            got = await in_thread(
                clients.poplib_session,
                HOST,
                port,
                ALICE,
                pw,
                tls="implicit",
                cafile=ca,
                timeout=CLIENT_TIMEOUT,
            )
            # The "done when": curl --cacert CA pop3s://localhost:PORT/1.
            msg1 = await in_thread(
                clients.curl_fetch,
                "localhost",
                port,
                ALICE,
                pw,
                msg=1,
                tls="implicit",
                cafile=ca,
                timeout=CLIENT_TIMEOUT,
            )
            fetched = await in_thread(
                clients.fetchmail_fetch,
                "localhost",
                port,
                ALICE,
                pw,
                tls="implicit",
                cafile=ca,
                workdir=tmp_path / "fm",
                timeout=CLIENT_TIMEOUT,
            )
            paths = await wait_captures(config, 3)
    poplib_same_as_direct(got, direct)
    assert got["capa"] == direct["capa"]
    assert msg1 == direct_curl == STANDARD_MESSAGES[0]
    assert fetched == b"".join(_lf(m) for m in STANDARD_MESSAGES)
    for cap in map(Capture, paths):
        assert cap.end["how"] in ("quit", "client-closed"), cap.end
        assert "RETR" in cap.commands()
        for d in ("c", "s"):
            (rec,) = tls_records(cap, d)
            assert rec["decrypted"] is True and rec["mode"] == "implicit" and rec["off"] == 0
    # curl sent SNI "localhost": its leaf names localhost; the upstream leg has no SNI (an IP).
    curl_cap = Capture(paths[1])
    assert tls_records(curl_cap, "c")[0]["sni"] == "localhost"
    assert "localhost" in (tls_records(curl_cap, "s")[0]["peer_subject"] or "")
    assert_no_password(pw, paths)


# ----------------------------------------------------------------------------- 3. mixed legs


async def test_pop3s_client_plain_server_hides_stls(dovecot: DovecotServer, tmp_path: Path) -> None:
    config = make_config(tmp_path, dovecot, listen_tls=True)
    ca = str(config.certificate_authority().cert_path)
    pw = dovecot.users[ALICE]
    with trio.fail_after(40):
        direct = await in_thread(
            clients.poplib_session, dovecot.host, dovecot.port, ALICE, pw, timeout=CLIENT_TIMEOUT
        )
        assert "STLS" in direct["capa"]
        async with running(config) as port:
            got = await in_thread(
                clients.poplib_session,
                HOST,
                port,
                ALICE,
                pw,
                tls="implicit",
                cafile=ca,
                timeout=CLIENT_TIMEOUT,
            )
            client = LineClient(
                trio.SSLStream(
                    await trio.open_tcp_stream(HOST, port),
                    client_ssl_context(ca),
                    server_hostname=HOST,
                    https_compatible=True,
                )
            )
            assert (await client.line()).startswith(b"+OK")
            await client.send(b"CAPA\r\n")
            assert (await client.line()).startswith(b"+OK")
            capa = await client.multiline()
            await client.send(b"STLS\r\n")
            stls_answer = await client.line()
            await client.send(f"USER {ALICE}\r\nPASS {pw}\r\nSTAT\r\nQUIT\r\n".encode())
            after = [await client.line() for _ in range(4)]
            await client.aclose()
            paths = await wait_captures(config, 2)
    poplib_same_as_direct(got, direct)
    assert "STLS" not in got["capa"]
    assert {k: v for k, v in direct["capa"].items() if k != "STLS"} == got["capa"]
    assert b"STLS\r\n" not in b"".join(capa)
    assert stls_answer.startswith(b"-ERR")
    assert all(line.startswith(b"+OK") for line in after), after
    cap = Capture(paths[1])
    whys = [d["why"] for d in cap.kind(fmt.DROP)]
    assert "STLS capability hidden by popproxy" in whys
    assert "STLS answered by popproxy" in whys
    # popproxy's own -ERR is marked as made by popproxy.
    assert any(
        r.fields.get("p") and r.data and r.data.startswith(b"-ERR")
        for r in cap.records
        if r.kind == fmt.DATA
    )
    assert [r["mode"] for r in cap.kind(fmt.TLS)] == ["implicit"]


async def test_plain_client_pop3s_server_local_stls(dovecot: DovecotServer, tmp_path: Path) -> None:
    config = make_config(
        tmp_path, dovecot, upstream=(dovecot.host, dovecot.pop3s_port), upstream_tls=True
    )
    ca = str(config.certificate_authority().cert_path)
    pw = dovecot.users[ALICE]
    with trio.fail_after(40):
        direct = await in_thread(
            clients.poplib_session, dovecot.host, dovecot.port, ALICE, pw, timeout=CLIENT_TIMEOUT
        )
        async with running(config) as port:
            got = await in_thread(
                clients.poplib_session, HOST, port, ALICE, pw, timeout=CLIENT_TIMEOUT
            )
            client = await LineClient.connect(port)
            assert (await client.line()).startswith(b"+OK")
            await client.send(b"STLS\r\n")
            begin = await client.line()
            leftover = await client.start_tls(client_ssl_context(ca))
            assert isinstance(client.stream, trio.SSLStream)
            peer = client.stream.getpeercert()
            await client.send(f"CAPA\r\nUSER {ALICE}\r\nPASS {pw}\r\nSTAT\r\n".encode())
            assert (await client.line()).startswith(b"+OK")
            await client.multiline()
            replies = [await client.line() for _ in range(3)]
            await client.send(b"QUIT\r\n")
            bye = await client.line()
            await client.aclose()
            paths = await wait_captures(config, 2)
    poplib_same_as_direct(got, direct)
    assert begin == b"+OK Begin TLS negotiation now.\r\n"
    assert leftover == b""
    issuer = dict(x[0] for x in peer["issuer"])
    assert issuer["commonName"] == "popproxy CA"
    assert all(r.startswith(b"+OK") for r in replies), replies
    assert replies[-1].split()[1] == str(len(STANDARD_MESSAGES)).encode()
    assert bye.startswith(b"+OK")
    cap = Capture(paths[1])
    modes = [(r["d"], r["mode"]) for r in cap.kind(fmt.TLS)]
    assert modes == [("s", "implicit"), ("c", "stls"), ("s", "already-tls")]
    assert "STLS" not in cap.stream("s")[:200].decode("latin-1").split("\r\n")[0]
    assert cap.commands()[:2] == ["STLS", "CAPA"]


# ----------------------------------------------------------------------------- 4. upstream STLS


async def test_upstream_stls_behind_pop3s(dovecot: DovecotServer, tmp_path: Path) -> None:
    config = make_config(tmp_path, dovecot, listen_tls=True, upstream_stls=True)
    ca = str(config.certificate_authority().cert_path)
    pw = dovecot.users[ALICE]
    with trio.fail_after(30):
        direct = await in_thread(
            clients.poplib_session,
            dovecot.host,
            dovecot.port,
            ALICE,
            pw,
            tls="stls",
            cafile=dovecot.cafile,
            timeout=CLIENT_TIMEOUT,
        )
        async with running(config) as port:
            got = await in_thread(
                clients.poplib_session,
                HOST,
                port,
                ALICE,
                pw,
                tls="implicit",
                cafile=ca,
                timeout=CLIENT_TIMEOUT,
            )
            (path,) = await wait_captures(config, 1)
    poplib_same_as_direct(got, direct)
    assert got["capa"] == direct["capa"]  # post-TLS CAPA: no STLS
    assert "STLS" not in got["capa"]
    cap = Capture(path)
    assert cap.end["how"] == "quit"
    modes = [(r["d"], r["mode"]) for r in cap.kind(fmt.TLS)]
    assert modes == [("c", "implicit"), ("s", "stls"), ("c", "unchanged")]
    # popproxy's own STLS and the reply it swallowed are on record.
    assert any(
        r.fields.get("p") and r.data == b"STLS\r\n" for r in cap.records if r.kind == fmt.DATA
    )
    assert [d["why"] for d in cap.kind(fmt.DROP)] == ["reply to popproxy's own STLS"]
    assert {"USER", "PASS", "STAT", "RETR"} <= set(cap.commands())
    assert_no_password(pw, [path])


# ----------------------------------------------------------------------------- 5. verification


async def test_untrusted_upstream_is_refused(dovecot: DovecotServer, tmp_path: Path) -> None:
    # Dovecot's trustme CA is not in the system store.
    config = make_config(
        tmp_path,
        dovecot,
        upstream=(dovecot.host, dovecot.pop3s_port),
        upstream_tls=True,
        upstream_context=client_context(),
    )
    with trio.fail_after(20):
        async with running(config) as port:
            client = await LineClient.connect(port)
            everything = await client.rest(timeout=10)
            await client.aclose()
            (path,) = await wait_captures(config, 1)
    assert everything.startswith(
        b"-ERR [SYS/TEMP] popproxy: TLS with upstream failed: certificate verification failed"
    )
    assert everything.count(b"\r\n") == 1 and everything.endswith(b"\r\n")  # then EOF
    cap = Capture(path)
    assert cap.end["how"] == "upstream-tls-error"
    assert "certificate" in cap.end["error"]
    server_data = [r for r in cap.records if r.kind == fmt.DATA and r.fields["d"] == "s"]
    assert len(server_data) == 1 and server_data[0].fields.get("p") == 1  # only popproxy's line
    assert cap.stream("c") == b""
    assert not cap.kind(fmt.TLS)


async def test_untrusted_upstream_via_upstream_stls(dovecot: DovecotServer, tmp_path: Path) -> None:
    """Documents: with --upstream-stls the (plaintext) greeting has been relayed already when
    verification fails; then the -ERR line and close, and no command reaches the server."""
    config = make_config(tmp_path, dovecot, upstream_stls=True, upstream_context=client_context())
    with trio.fail_after(20):
        async with running(config) as port:
            client = await LineClient.connect(port)
            everything = await client.rest(timeout=10)
            await client.aclose()
            (path,) = await wait_captures(config, 1)
    lines = everything.split(b"\r\n")
    assert lines[0].startswith(b"+OK") and lines[2] == b"" and len(lines) == 3
    assert lines[1].startswith(b"-ERR [SYS/TEMP] popproxy: TLS with upstream failed: ")
    cap = Capture(path)
    assert cap.end["how"] == "upstream-tls-error" and "certificate" in cap.end["error"]
    assert cap.stream("c") == b"STLS\r\n"  # popproxy's own, nothing from the client


async def test_insecure_upstream_works_and_says_so(dovecot: DovecotServer, tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        dovecot,
        upstream=(dovecot.host, dovecot.pop3s_port),
        upstream_tls=True,
        insecure=True,
        upstream_context=client_context(insecure=True),
    )
    pw = dovecot.users[ALICE]
    with trio.fail_after(20):
        async with running(config) as port:
            got = await in_thread(
                clients.poplib_session, HOST, port, ALICE, pw, timeout=CLIENT_TIMEOUT
            )
            (path,) = await wait_captures(config, 1)
    assert got["messages"] == list(STANDARD_MESSAGES)
    cap = Capture(path)
    assert cap.doc["session"]["insecure"] is True
    events = [e for e in cap.kind(fmt.EVENT) if e["kind"] == "insecure"]
    assert len(events) == 1 and "OFF" in events[0]["detail"]
    assert cap.end["how"] == "quit"


# ----------------------------------------------------------------------------- 6. injection


async def test_server_plaintext_after_stls_ok_is_dropped(tmp_path: Path) -> None:
    fake = StlsServer(stls_reply=b"+OK Begin TLS\r\n-ERR injected\r\n")
    async with trio.open_nursery() as servers:
        await servers.start(fake.serve)
        config = make_config(
            tmp_path, upstream=(HOST, fake.port), upstream_context=fake.client_context()
        )
        ca = str(config.certificate_authority().cert_path)
        with trio.fail_after(20):
            async with running(config) as port:
                client = await LineClient.connect(port)
                assert (await client.line()).startswith(b"+OK")
                await client.send(b"STLS\r\n")
                begin = await client.line()
                leftover = await client.start_tls(client_ssl_context(ca))
                await client.send(b"CAPA\r\n")
                capa_status = await client.line()
                capa = await client.multiline()
                await client.send(b"RETR 1\r\n")
                retr = [await client.line(), *await client.multiline()]
                await client.send(b"QUIT\r\n")
                rest = await client.rest()
                await client.aclose()
                (path,) = await wait_captures(config, 1)
        servers.cancel_scope.cancel()
    assert begin == b"+OK Begin TLS\r\n"
    assert leftover == b""
    assert b"injected" not in bytes(client.received)  # neither before nor inside TLS
    assert capa_status.startswith(b"+OK") and b"STLS\r\n" not in b"".join(capa)
    assert b"".join(retr[1:]) == BODY
    assert rest.startswith(b"+OK bye")
    assert fake.connections[0].handshake_ok
    cap = Capture(path)
    drops = cap.kind(fmt.DROP)
    assert [(d["d"], d["len"], d["why"]) for d in drops] == [
        ("s", len(b"-ERR injected\r\n"), "plaintext after STLS +OK")
    ]
    server = cap.stream("s")
    assert server[drops[0]["off"] : drops[0]["off"] + drops[0]["len"]] == b"-ERR injected\r\n"
    assert [a["dir"] for a in cap.anomalies("plaintext-after-stls")] == ["s"]
    assert not [ex for ex in cap.doc["exchanges"] if ex.get("status") == "-ERR"]


async def test_client_plaintext_after_stls_is_flagged(tmp_path: Path) -> None:
    """Bytes a client pipelines after STLS are held until the server answers; after its
    +OK they are injected plaintext (RFC 2595 §4): dropped, never forwarded, in plaintext or
    inside TLS. The capture keeps them, marked injected and dropped."""
    fake = StlsServer()
    async with trio.open_nursery() as servers:
        await servers.start(fake.serve)
        config = make_config(
            tmp_path, upstream=(HOST, fake.port), upstream_context=fake.client_context()
        )
        ca = str(config.certificate_authority().cert_path)
        with trio.fail_after(20):
            async with running(config) as port:
                client = await LineClient.connect(port)
                assert (await client.line()).startswith(b"+OK")
                await client.send(b"STLS\r\nUSER evil\r\n")  # one write
                begin = await client.line()
                leftover = await client.start_tls(client_ssl_context(ca))
                await client.send(b"STAT\r\n")
                stat = await client.line()
                await client.send(b"QUIT\r\n")
                await client.rest()
                await client.aclose()
                (path,) = await wait_captures(config, 1)
        servers.cancel_scope.cancel()
    conn = fake.connections[0]
    assert begin == b"+OK Begin TLS\r\n" and leftover == b""
    assert stat.startswith(b"+OK 1 ")
    assert conn.plain_received == b"STLS\r\n"
    assert b"evil" not in conn.tls_received
    assert conn.tls_received == b"STAT\r\nQUIT\r\n"
    cap = Capture(path)
    assert [a["dir"] for a in cap.anomalies("plaintext-after-stls")] == ["c"]
    client_stream = cap.stream("c")
    assert client_stream.startswith(b"STLS\r\nUSER evil\r\n")
    tls_c = tls_records(cap, "c")
    assert tls_c[0]["off"] == len(b"STLS\r\nUSER evil\r\n")  # the injected bytes came before
    assert not [ex for ex in cap.doc["exchanges"] if ex["command"] == "USER"]
    assert cap.commands() == ["STLS", "STAT", "QUIT"]
    drops = [r.fields for r in cap.records if r.kind == "drop"]
    assert [(d["d"], d["off"], d["len"], d["why"]) for d in drops] == [
        ("c", 6, 11, "plaintext after STLS")
    ]


async def test_local_stls_never_forwards_client_injection(tmp_path: Path) -> None:
    """Plain client, pop3s upstream: popproxy answers STLS itself. What the client pipelined
    after STLS must not reach the (already encrypted) upstream, and no reply to it may reach
    the client in plaintext after the +OK (regression: both happened)."""
    fake = StlsServer(implicit=True)
    async with trio.open_nursery() as servers:
        await servers.start(fake.serve)
        config = make_config(
            tmp_path,
            upstream=(HOST, fake.port),
            upstream_tls=True,
            upstream_context=fake.client_context(),
        )
        ca = str(config.certificate_authority().cert_path)
        with trio.fail_after(20):
            async with running(config) as port:
                client = await LineClient.connect(port)
                assert (await client.line()).startswith(b"+OK")
                await client.send(b"STLS\r\nUSER evil\r\n")  # one write
                begin = await client.line()
                leftover = await client.start_tls(client_ssl_context(ca))
                await client.send(b"STAT\r\n")
                stat = await client.line()
                await client.send(b"QUIT\r\n")
                await client.rest()
                await client.aclose()
                (path,) = await wait_captures(config, 1)
        servers.cancel_scope.cancel()
    assert begin == b"+OK Begin TLS negotiation now.\r\n"
    assert leftover == b""
    assert stat.startswith(b"+OK 1 ")
    assert fake.connections[0].tls_received == b"STAT\r\nQUIT\r\n"
    cap = Capture(path)
    drops = [(d["d"], d["len"], d["why"]) for d in cap.kind(fmt.DROP)]
    assert drops == [
        ("c", 6, "STLS answered by popproxy"),
        ("c", len(b"USER evil\r\n"), "plaintext after STLS"),
    ]
    assert [a["dir"] for a in cap.anomalies("plaintext-after-stls")] == ["c"]
    assert cap.commands() == ["STLS", "STAT", "QUIT"]


async def test_untrusted_upstream_at_stls_intercept(dovecot: DovecotServer, tmp_path: Path) -> None:
    """In intercept mode the server's +OK is held until popproxy has verified the upstream;
    on failure it is dropped and the client's STLS gets popproxy's own -ERR instead (the
    client stays in plaintext, nothing after STLS is relayed)."""
    config = make_config(tmp_path, dovecot, upstream_context=client_context())
    ca = str(config.certificate_authority().cert_path)
    pw = dovecot.users[ALICE]
    with trio.fail_after(20):
        async with running(config) as port:
            with pytest.raises(poplib.error_proto, match="SYS/TEMP"):
                await in_thread(
                    clients.poplib_session,
                    HOST,
                    port,
                    ALICE,
                    pw,
                    tls="stls",
                    cafile=ca,
                    timeout=CLIENT_TIMEOUT,
                )
            (path,) = await wait_captures(config, 1)
    cap = Capture(path)
    assert cap.end["how"] == "upstream-tls-error" and "certificate" in cap.end["error"]
    (drop,) = cap.kind(fmt.DROP)
    assert drop["why"] == "upstream TLS failed" and drop["d"] == "s"
    assert cap.commands() == ["CAPA", "STLS"]
    assert cap.stream("c") == b"CAPA\r\nSTLS\r\n"
    assert cap.stream("s").endswith(
        b"\r\n-ERR [SYS/TEMP] popproxy: TLS with upstream failed: "
        + cap.end["error"].split(": ", 1)[1].encode()
        + b"\r\n"
    )
    assert not cap.kind(fmt.TLS)


# ----------------------------------------------------------------------------- 7. strip mode


async def test_strip_mode(dovecot: DovecotServer, tmp_path: Path) -> None:
    tee = TeeRelay((dovecot.host, dovecot.port))
    pw = dovecot.users[ALICE]

    def poplib_strip(port: int) -> dict[str, Any]:
        client = poplib.POP3(HOST, port, timeout=CLIENT_TIMEOUT)
        try:
            capa = client.capa()
            with pytest.raises(poplib.error_proto, match="STLS not supported"):
                client.stls(context=ssl.create_default_context(cafile=dovecot.cafile))
            # poplib gives up by itself (no STLS in CAPA); send the command anyway.
            with pytest.raises(poplib.error_proto) as refused:
                client._shortcmd("STLS")  # type: ignore[attr-defined]
            client.user(ALICE)
            client.pass_(pw)
            stat = client.stat()
            client.quit()
            return {"capa": capa, "refused": refused.value.args[0], "stat": stat}
        finally:
            client.close()

    async with trio.open_nursery() as servers:
        await servers.start(tee.serve)
        config = make_config(tmp_path, dovecot, upstream=(HOST, tee.port), stls=StlsMode.STRIP)
        with trio.fail_after(30):
            async with running(config) as port:
                got = await in_thread(poplib_strip, port)
                with pytest.raises(clients.ClientError) as curl_failed:
                    await in_thread(
                        clients.curl_fetch,
                        HOST,
                        port,
                        ALICE,
                        pw,
                        msg=1,
                        tls="stls",
                        cafile=dovecot.cafile,
                        timeout=CLIENT_TIMEOUT,
                    )
                paths = await wait_captures(config, 2)
                for conn in tee.connections:
                    await conn.closed.wait()
        servers.cancel_scope.cancel()
    assert "STLS" not in got["capa"] and "USER" in got["capa"]
    assert got["refused"].startswith(b"-ERR")
    assert got["stat"][0] == len(STANDARD_MESSAGES)
    assert "exit code 64" in str(curl_failed.value)  # CURLE_USE_SSL_FAILED: fails safe
    # What reached Dovecot: never STLS; curl never sent credentials.
    pop_up, curl_up = (bytes(c.received) for c in tee.connections)
    assert b"STLS" not in pop_up and b"STLS" not in curl_up
    assert pop_up == f"CAPA\r\nCAPA\r\nUSER {ALICE}\r\nPASS {pw}\r\nSTAT\r\nQUIT\r\n".encode()
    assert curl_up == b"CAPA\r\n"
    pop_cap, curl_cap = Capture(paths[0]), Capture(paths[1])
    whys = [d["why"] for d in pop_cap.kind(fmt.DROP)]
    # poplib's CAPA, then stls()'s own CAPA, then the STLS command itself.
    assert whys == ["STLS capability hidden by popproxy"] * 2 + ["STLS answered by popproxy"]
    assert any(e["kind"] == "strip" for e in pop_cap.kind(fmt.EVENT))
    assert not {"PASS", "AUTH", "USER", "APOP"} & set(curl_cap.commands())
    assert curl_cap.commands() == ["CAPA"]
    assert "STLS capability hidden by popproxy" in [d["why"] for d in curl_cap.kind(fmt.DROP)]


async def test_strip_mode_answers_stls_in_pipeline_order(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    """RFC 2449 §6.6: popproxy's own -ERR to STLS comes after the replies to commands
    pipelined before it, and CAPA's STLS line is still hidden (regression: the -ERR came
    first, the observer paired it with CAPA and STLS leaked through)."""
    config = make_config(tmp_path, dovecot, stls=StlsMode.STRIP)
    pw = dovecot.users[ALICE]
    with trio.fail_after(20):
        async with running(config) as port:
            client = await LineClient.connect(port)
            assert (await client.line()).startswith(b"+OK")
            await client.send(f"CAPA\r\nSTLS\r\nUSER {ALICE}\r\nPASS {pw}\r\n".encode())
            capa_status = await client.line()
            capa = await client.multiline()
            stls, user, pass_ = [await client.line() for _ in range(3)]
            await client.send(b"QUIT\r\n")
            await client.rest()
            await client.aclose()
            (path,) = await wait_captures(config, 1)
    assert capa_status.startswith(b"+OK") and b"USER\r\n" in capa
    assert b"STLS\r\n" not in b"".join(capa)
    assert stls == b"-ERR STLS not available.\r\n"
    assert user.startswith(b"+OK") and pass_.startswith(b"+OK")
    cap = Capture(path)
    assert cap.commands() == ["CAPA", "STLS", "USER", "PASS", "QUIT"]
    assert [ex["status"] for ex in cap.doc["exchanges"] if ex["kind"] == "command"] == [
        "+OK",
        "-ERR",
        "+OK",
        "+OK",
        "+OK",
    ]
    assert not cap.doc["anomalies"]


# ----------------------------------------------------------------------------- 8. passthrough


async def test_stls_passthrough_is_end_to_end(dovecot: DovecotServer, tmp_path: Path) -> None:
    config = make_config(tmp_path, dovecot, stls=StlsMode.PASSTHROUGH)
    pw = dovecot.users[ALICE]
    with trio.fail_after(30):
        direct = await in_thread(
            clients.poplib_session,
            dovecot.host,
            dovecot.port,
            ALICE,
            pw,
            tls="stls",
            cafile=dovecot.cafile,
            timeout=CLIENT_TIMEOUT,
        )
        async with running(config) as port:
            # The client trusts Dovecot's CA, not popproxy's: TLS is end to end.
            got = await in_thread(
                clients.poplib_session,
                HOST,
                port,
                ALICE,
                pw,
                tls="stls",
                cafile=dovecot.cafile,
                timeout=CLIENT_TIMEOUT,
            )
            (path,) = await wait_captures(config, 1)
    poplib_same_as_direct(got, direct)
    cap = Capture(path)
    recs = cap.kind(fmt.TLS)
    assert {r["d"] for r in recs} == {"c", "s"}
    assert all(r["decrypted"] is False and r["mode"] == "passthrough" for r in recs)
    assert cap.commands() == ["CAPA", "STLS"]  # poplib's stls() asks CAPA first
    assert b"USER" not in cap.stream("c") and b"alice" not in cap.raw.split(b"STLS", 1)[1]
    assert not (tmp_path / "ca").exists()  # passthrough never needs popproxy's CA


# ----------------------------------------------------------------------------- 9. faults


async def test_handshake_faults_leave_the_proxy_serving(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    config = make_config(tmp_path, dovecot, listen_tls=True)
    ca = str(config.certificate_authority().cert_path)
    pw = dovecot.users[ALICE]
    hello = client_hello()
    assert len(hello) > 100

    def distrusting_client(port: int) -> BaseException:
        with pytest.raises(ssl.SSLCertVerificationError) as failed:
            poplib.POP3_SSL(
                HOST, port, timeout=CLIENT_TIMEOUT, context=ssl.create_default_context()
            )
        return failed.value

    with trio.fail_after(30):
        async with running(config) as port:
            half = await trio.open_tcp_stream(HOST, port)
            await half.send_all(hello[: len(hello) // 2])
            await half.aclose()
            error = await in_thread(distrusting_client, port)
            got = await in_thread(
                clients.poplib_session,
                HOST,
                port,
                ALICE,
                pw,
                tls="implicit",
                cafile=ca,
                timeout=CLIENT_TIMEOUT,
            )
            paths = await wait_captures(config, 3)
    assert "certificate verify failed" in str(error)
    assert got["messages"] == list(STANDARD_MESSAGES)
    first, second, third = map(Capture, paths)
    for cap in (first, second):
        assert cap.end["how"] == "client-tls-error", cap.end
        assert cap.end["error"].startswith("TLS handshake with the client failed")
        assert not cap.kind(fmt.TLS) and not cap.stream("s") and not cap.stream("c")
        # The upstream is only dialled after the client's handshake.
        assert not [e for e in cap.kind(fmt.EVENT) if e["kind"] == "upstream-connected"]
    assert third.end["how"] == "quit"


# ----------------------------------------------------------------------------- 10. key log


async def test_sslkeylogfile_covers_both_legs(
    dovecot: DovecotServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keylog = tmp_path / "keys.log"
    client_keylog = tmp_path / "client-keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(keylog))
    config = make_config(
        tmp_path,
        dovecot,
        upstream=(dovecot.host, dovecot.pop3s_port),
        listen_tls=True,
        upstream_tls=True,
    )  # contexts built after setenv
    ca = str(config.certificate_authority().cert_path)
    pw = dovecot.users[ALICE]

    def session(port: int) -> tuple[int, int]:
        ctx = client_ssl_context(ca, keylog=client_keylog)
        client = poplib.POP3_SSL(HOST, port, timeout=CLIENT_TIMEOUT, context=ctx)
        try:
            client.user(ALICE)
            client.pass_(pw)
            stat = client.stat()
            client.quit()
            return stat
        finally:
            client.close()

    with trio.fail_after(20):
        async with running(config) as port:
            stat = await in_thread(session, port)
            await wait_captures(config, 1)
    assert stat[0] == len(STANDARD_MESSAGES)

    def randoms(path: Path) -> set[str]:
        lines = [ln.split() for ln in path.read_text().splitlines() if ln and ln[0] != "#"]
        assert lines and all(len(p) == 3 for p in lines)
        return {p[1] for p in lines}

    proxy_randoms, client_randoms = randoms(keylog), randoms(client_keylog)
    assert len(client_randoms) == 1
    assert client_randoms <= proxy_randoms  # the client leg, logged by popproxy
    assert len(proxy_randoms) == 2  # ... and the upstream leg
    labels = {ln.split()[0] for ln in keylog.read_text().splitlines() if ln and ln[0] != "#"}
    assert "CLIENT_TRAFFIC_SECRET_0" in labels or "CLIENT_RANDOM" in labels


async def test_stls_written_one_byte_at_a_time_is_intercepted(tmp_path: Path) -> None:
    """A client whose STLS line arrives in six segments is intercepted exactly like one
    that writes it at once: the TLS handshake is popproxy's, never relayed as plaintext."""
    fake = StlsServer()
    async with trio.open_nursery() as servers:
        await servers.start(fake.serve)
        config = make_config(
            tmp_path, upstream=(HOST, fake.port), upstream_context=fake.client_context()
        )
        ca = str(config.certificate_authority().cert_path)
        with trio.fail_after(20):
            async with running(config) as port:
                client = await LineClient.connect(port)
                assert (await client.line()).startswith(b"+OK")
                for byte in b"STLS\r\n":
                    await client.send(bytes([byte]))
                    await trio.sleep(0.02)  # one TCP segment each
                begin = await client.line()
                leftover = await client.start_tls(client_ssl_context(ca))
                await client.send(b"STAT\r\n")
                stat = await client.line()
                await client.send(b"QUIT\r\n")
                await client.rest()
                await client.aclose()
                (path,) = await wait_captures(config, 1)
        servers.cancel_scope.cancel()
    conn = fake.connections[0]
    assert begin == b"+OK Begin TLS\r\n" and leftover == b""
    assert stat.startswith(b"+OK 1 ")
    assert conn.plain_received == b"STLS\r\n" and conn.handshake_ok
    assert conn.tls_received == b"STAT\r\nQUIT\r\n"
    cap = Capture(path)
    assert [t["leg"] for t in cap.kind(fmt.TLS)] == ["upstream", "client"]
    assert not cap.anomalies("plaintext-after-stls")
    assert cap.commands() == ["STLS", "STAT", "QUIT"]
