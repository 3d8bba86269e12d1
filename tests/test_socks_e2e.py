"""SOCKS5 and routes end to end: curl and python-socks through ``record`` to the real Dovecot,
an HTTP server relayed opaque, SOCKS replies for unreachable targets, and two routes to two
Dovecot instances in one process."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import poplib
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from python_socks import ProxyError
from python_socks.sync import Proxy

from popproxy.capture import format as fmt
from popproxy.capture.reader import CaptureReader
from popproxy.cli.main import main
from popproxy.proxy.config import ProxyConfig, SocksSettings, parse_route
from popproxy.proxy.server import serve_record
from popproxy.tls.contexts import client_context
from tests.support import clients
from tests.support.dovecot import STANDARD_MESSAGES, DovecotServer, free_port
from tests.test_tls_e2e import Capture, assert_no_password, in_thread, wait_captures

pytestmark = pytest.mark.dovecot

ALICE = "alice"
HOST = "127.0.0.1"


def socks_config(
    tmp_path: Path, dovecot: DovecotServer, *, tls_ports: frozenset[int] = frozenset(), **kw: Any
) -> ProxyConfig:
    out = tmp_path / "captures"
    out.mkdir(exist_ok=True)
    socks = SocksSettings(
        listen=(HOST, 0),
        tls_ports=frozenset({995, dovecot.pop3s_port, *tls_ports}),
        sniff_timeout=kw.pop("sniff_timeout", 1.0),
        credentials=kw.pop("credentials", None),
        pop3_only=kw.pop("pop3_only", False),
    )
    settings: dict[str, Any] = dict(
        upstream=("", 0),
        serve_fixed=False,
        out_dir=out,
        linger=0.2,
        connect_timeout=kw.pop("connect_timeout", 5.0),
        ca_dir=tmp_path / "ca",
        upstream_context=client_context(cafile=dovecot.cafile),
        socks=socks,
    )
    settings.update(kw)
    return ProxyConfig(**settings)


class Watcher:
    """A live view that keeps what it is told: upstream labels, failures, endings."""

    detail = False

    def __init__(self) -> None:
        self.labels: list[str] = []
        self.failures: list[str] = []
        self.endings: list[str] = []

    def started(self, number: int, peer: str, upstream: str, path: Path | None) -> None:
        self.labels.append(upstream)

    def items(self, number: int, items: list[Any]) -> None:
        pass

    def ended(self, number: int, how: str, error: str | None, duration: float, s: Any) -> None:
        self.endings.append(how)

    def failed(self, number: int, peer: str, reason: str) -> None:
        self.failures.append(reason)


@contextlib.asynccontextmanager
async def running(
    config: ProxyConfig, view: Watcher | None = None
) -> AsyncIterator[list[tuple[str, int]]]:
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(functools.partial(serve_record, config, view, announce=False))
        yield addrs
        nursery.cancel_scope.cancel()


class SocksPOP3(poplib.POP3):
    """poplib through a SOCKS5 proxy (python-socks); the proxy resolves names."""

    def __init__(self, proxy: str, host: str, port: int, **kw: Any) -> None:
        self._proxy = Proxy.from_url(proxy, rdns=True)
        super().__init__(host, port, **kw)

    def _create_socket(self, timeout: Any) -> socket.socket:
        return self._proxy.connect(self.host, self.port, timeout=timeout)


class SocksPOP3_SSL(poplib.POP3_SSL):
    def __init__(self, proxy: str, host: str, port: int, **kw: Any) -> None:
        self._proxy = Proxy.from_url(proxy, rdns=True)
        super().__init__(host, port, **kw)

    def _create_socket(self, timeout: Any) -> socket.socket:
        sock = self._proxy.connect(self.host, self.port, timeout=timeout)
        return self.context.wrap_socket(sock, server_hostname=self.host)


def pysocks_session(
    proxy: str, host: str, port: int, password: str, *, tls: bool = False, cafile: str = ""
) -> dict[str, Any]:
    client: poplib.POP3
    if tls:
        ctx = ssl.create_default_context(cafile=cafile)
        client = SocksPOP3_SSL(proxy, host, port, timeout=15, context=ctx)
    else:
        client = SocksPOP3(proxy, host, port, timeout=15)
    try:
        result: dict[str, Any] = {"welcome": client.getwelcome()}
        client.user(ALICE)
        client.pass_(password)
        result["stat"] = client.stat()
        count = result["stat"][0]
        result["messages"] = [
            b"".join(line + b"\r\n" for line in client.retr(i)[1]) for i in range(1, count + 1)
        ]
        result["quit"] = client.quit()
        return result
    finally:
        client.close()


def curl_socks(
    socks_port: int, url: str, password: str, *, cafile: str | None = None, user: str = ""
) -> bytes:
    proxy = f"socks5h://{user + '@' if user else ''}{HOST}:{socks_port}"
    argv = ["curl", "--silent", "--show-error", "--max-time", "20", "--proxy", proxy]
    argv += ["--user", f"{ALICE}:{password}"]
    if cafile:
        argv += ["--cacert", cafile]
    return clients._run([*argv, url], timeout=25, what="curl").stdout


def curl_exit(socks_port: int, url: str) -> tuple[int, str]:
    """curl's exit code and message for a URL through the proxy (a failure expected)."""
    import subprocess

    argv = ["curl", "--silent", "--show-error", "--max-time", "20"]
    argv += ["--socks5-hostname", f"{HOST}:{socks_port}", url]
    proc = subprocess.run(argv, capture_output=True, timeout=25, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stderr.decode(errors="replace")


def listed(folder: Path, pattern: str, capsys: pytest.CaptureFixture[str]) -> list[Any]:
    """``popproxy list --upstream PATTERN --json FOLDER``'s rows."""
    capsys.readouterr()
    assert main(["list", "--upstream", pattern, "--json", str(folder)]) == 0
    rows: list[Any] = json.loads(capsys.readouterr().out)
    return rows


def header(cap: Capture) -> dict[str, Any]:
    with CaptureReader(cap.path) as reader:
        return reader.header


# ----------------------------------------------------------------------------- curl


async def test_curl_socks5_hostname_plain_and_pop3s(
    dovecot_clean: DovecotServer, tmp_path: Path
) -> None:
    dovecot = dovecot_clean
    config = socks_config(tmp_path, dovecot)
    ca = str(config.certificate_authority().cert_path)
    pw = dovecot.users[ALICE]
    direct = await in_thread(clients.curl_fetch, dovecot.host, dovecot.port, ALICE, pw, msg=1)
    async with running(config) as addrs:
        port = addrs[0][1]
        # The name "localhost" goes to popproxy (socks5h): popproxy resolves it.
        plain = await in_thread(curl_socks, port, f"pop3://localhost:{dovecot.port}/1", pw)
        tls = await in_thread(
            curl_socks, port, f"pop3s://localhost:{dovecot.pop3s_port}/1", pw, cafile=ca
        )
        listing = await in_thread(curl_socks, port, f"pop3://localhost:{dovecot.port}/", pw)
        paths = await wait_captures(config, 3)
    assert plain == direct == STANDARD_MESSAGES[0]
    assert tls == direct
    assert listing.count(b"\r\n") == len(STANDARD_MESSAGES)
    caps = [Capture(p) for p in paths]
    by_target = {header(c)["via"]["target"]: c for c in caps if "RETR" in c.commands()}
    plain_cap = by_target[f"localhost:{dovecot.port}"]
    tls_cap = by_target[f"localhost:{dovecot.pop3s_port}"]
    for cap in (plain_cap, tls_cap):
        h = header(cap)
        assert h["via"]["how"] == "socks5" and h["via"]["user"] is None
        assert h["upstream"] == h["via"]["target"]
        assert "RETR" in cap.commands()
        assert STANDARD_MESSAGES[0].split(b"\r\n")[0] in cap.stream("s")
        assert cap.end["how"] in ("quit", "server-closed", "client-closed")
    assert not header(plain_cap)["upstream_tls"]
    # pop3s: TLS on both legs, the transcript decrypted
    h = header(tls_cap)
    assert h["listen_tls"] and h["upstream_tls"]
    assert {r["leg"] for r in tls_cap.kind(fmt.TLS)} == {"client", "upstream"}
    assert b"+OK" in tls_cap.stream("s")[:10]
    assert_no_password(pw, paths)


# ----------------------------------------------------------------------------- python-socks


async def test_python_socks_plain_and_tls_same_mail_as_direct(
    dovecot_clean: DovecotServer, tmp_path: Path
) -> None:
    dovecot = dovecot_clean
    config = socks_config(tmp_path, dovecot)
    ca = str(config.certificate_authority().cert_path)
    pw = dovecot.users[ALICE]
    async with running(config) as addrs:
        proxy = f"socks5://{HOST}:{addrs[0][1]}"
        plain = await in_thread(pysocks_session, proxy, HOST, dovecot.port, pw)
        tls = await in_thread(
            pysocks_session, proxy, "localhost", dovecot.pop3s_port, pw, tls=True, cafile=ca
        )
        paths = await wait_captures(config, 2)
    for got in (plain, tls):
        assert got["messages"] == list(STANDARD_MESSAGES)
        assert got["quit"].startswith(b"+OK")
    caps = [Capture(p) for p in paths]
    targets = sorted(header(c)["via"]["target"] for c in caps)
    assert targets == sorted([f"{HOST}:{dovecot.port}", f"localhost:{dovecot.pop3s_port}"])
    for cap in caps:
        assert cap.commands()[:2] == ["USER", "PASS"]
        assert cap.end["how"] == "quit"
        assert cap.end["user"] == ALICE
    assert_no_password(pw, paths)


async def test_socks5_username_password_required(
    dovecot_clean: DovecotServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dovecot = dovecot_clean
    config = socks_config(tmp_path, dovecot, credentials=(b"mailer", b"s0cks pw"))
    pw = dovecot.users[ALICE]
    async with running(config) as addrs:
        port = addrs[0][1]
        ok = await in_thread(
            pysocks_session, f"socks5://mailer:s0cks%20pw@{HOST}:{port}", HOST, dovecot.port, pw
        )
        for bad in (f"socks5://mailer:wrong@{HOST}:{port}", f"socks5://{HOST}:{port}"):
            with pytest.raises(ProxyError):
                await in_thread(pysocks_session, bad, HOST, dovecot.port, pw)
        # curl with the right user and password, too
        got = await in_thread(
            curl_socks, port, f"pop3://{HOST}:{dovecot.port}/1", pw, user="mailer:s0cks%20pw"
        )
        paths = await wait_captures(config, 2)
    assert ok["messages"] == list(STANDARD_MESSAGES)
    assert got == STANDARD_MESSAGES[0]
    for cap in (Capture(p) for p in paths):
        assert header(cap)["via"]["user"] == "mailer"
        assert b"s0cks pw" not in cap.raw
    assert len(listed(config.out_dir, "user=mailer", capsys)) == 2
    assert len(listed(config.out_dir, f":{dovecot.port}$", capsys)) == 2
    assert listed(config.out_dir, "user=nobody", capsys) == []
    rows = listed(config.out_dir, "socks5", capsys)
    assert {r["via"]["user"] for r in rows} == {"mailer"}


# ----------------------------------------------------------------------------- opaque


@contextlib.contextmanager
def http_server() -> Iterator[int]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            body = b"not pop3 at all\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer((HOST, 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


async def test_http_target_relayed_opaque(dovecot: DovecotServer, tmp_path: Path) -> None:
    config = socks_config(tmp_path, dovecot)
    with http_server() as web:
        async with running(config) as addrs:
            port = addrs[0][1]
            argv = ["curl", "--silent", "--show-error", "--max-time", "10"]
            argv += ["--socks5-hostname", f"{HOST}:{port}", "-H", "Authorization: Basic c2VjcmV0"]
            proc = await trio.run_process(
                [*argv, f"http://{HOST}:{web}/x"], capture_stdout=True, capture_stderr=True
            )
            paths = await wait_captures(config, 1)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"not pop3 at all\n"
    cap = Capture(paths[0])
    h = header(cap)
    assert h["opaque"] is True and h["via"]["target"] == f"{HOST}:{web}"
    assert [r["d"] for r in cap.kind(fmt.OPAQUE)] == ["c", "s"]
    server = cap.stream("s")
    assert server.startswith(b"HTTP/1.0 200") and server.endswith(b"not pop3 at all\n")
    client = cap.stream("c")
    assert b"c2VjcmV0" not in cap.raw and set(client) == {ord("#")}  # masked whole
    assert cap.commands() == []
    assert [a["kind"] for a in cap.doc["anomalies"]] == ["opaque", "opaque"]


async def test_pop3_only_refuses_http_with_not_allowed(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    config = socks_config(tmp_path, dovecot, pop3_only=True, sniff_timeout=0.5)
    with http_server() as web:
        async with running(config) as addrs:
            code, err = await in_thread(curl_exit, addrs[0][1], f"http://{HOST}:{web}/")
    assert code == 97, err  # curl: CURLE_PROXY, the SOCKS server refused
    assert err.rstrip().endswith("(2)"), err  # reply 2: connection not allowed by ruleset
    assert not list(config.out_dir.iterdir())


# ----------------------------------------------------------------------------- SOCKS errors


def socks_connect(port: int, host: str, target_port: int) -> bytes:
    """A raw SOCKS5 CONNECT by domain name; returns the server's reply to it."""
    with socket.create_connection((HOST, port), timeout=15) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        name = host.encode()
        sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + target_port.to_bytes(2))
        reply = b""
        while len(reply) < 10:
            data = sock.recv(10 - len(reply))
            if not data:
                break
            reply += data
        return reply


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A loopback port whose connects hang: a listener that never accepts, its backlog
    full, so the kernel drops further SYNs (the connect times out)."""
    with socket.socket() as server:
        server.bind((HOST, 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for sock in fillers:
                sock.setblocking(False)
                sock.connect_ex((HOST, port))
            yield port
        finally:
            for sock in fillers:
                sock.close()


async def test_unreachable_targets_get_the_right_reply(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    config = socks_config(tmp_path, dovecot, connect_timeout=1.0)
    closed = free_port()
    watcher = Watcher()
    with silent_port() as hanging:
        await trio.sleep(0.1)
        async with running(config, watcher) as addrs:
            port = addrs[0][1]
            refused = await in_thread(socks_connect, port, HOST, closed)
            unknown = await in_thread(socks_connect, port, "no-such-host.invalid", 110)
            timeout = await in_thread(socks_connect, port, HOST, hanging)
    assert refused[:2] == b"\x05\x05"  # connection refused
    assert unknown[:2] == b"\x05\x04"  # host unreachable
    assert timeout[:2] == b"\x05\x06"  # TTL expired: the connect timed out
    assert len(refused) == len(unknown) == len(timeout) == 10
    assert [f.split(":")[0] for f in watcher.failures] == [
        "SOCKS5 connection refused",
        "SOCKS5 host unreachable",
        "SOCKS5 ttl expired",
    ]
    assert f"cannot reach {HOST}:{hanging}: timed out" in watcher.failures[2]
    assert not list(config.out_dir.iterdir())  # nothing was relayed: no capture


# ----------------------------------------------------------------------------- routes


async def test_two_routes_to_two_dovecots_in_one_process(
    dovecot_clean: DovecotServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = dovecot_clean
    with DovecotServer() as second:
        second.reset_mailbox(ALICE, STANDARD_MESSAGES[:1])
        config = socks_config(tmp_path, first)
        config.socks = None
        ca_cfg = client_context(cafile=second.cafile)
        ca_cfg.load_verify_locations(cafile=first.cafile)
        config.upstream_context = ca_cfg
        config.routes = [
            parse_route(f"{HOST}:0={first.host}:{first.port}"),
            parse_route(f"{HOST}:0=localhost:{second.pop3s_port}/tls"),
            parse_route(f"{HOST}:0=localhost:{second.port}/stls"),
        ]
        ca = str(config.certificate_authority().cert_path)
        watcher = Watcher()
        async with running(config, watcher) as addrs:
            (_, p1), (_, p2), (_, p3) = addrs
            got1 = await in_thread(clients.poplib_session, HOST, p1, ALICE, first.users[ALICE])
            got2 = await in_thread(
                clients.poplib_session,
                "localhost",
                p2,
                ALICE,
                second.users[ALICE],
                tls="implicit",
                cafile=ca,
            )
            # /stls: the client speaks plaintext, popproxy upgrades the upstream leg
            got3 = await in_thread(clients.poplib_session, HOST, p3, ALICE, second.users[ALICE])
            paths = await wait_captures(config, 3)
    assert got1["messages"] == list(STANDARD_MESSAGES)
    assert got2["messages"] == got3["messages"] == list(STANDARD_MESSAGES[:1])
    caps = {header(c)["upstream"]: c for c in (Capture(p) for p in paths)}
    one = caps[f"{first.host}:{first.port}"]
    two = caps[f"localhost:{second.pop3s_port}"]
    three = caps[f"localhost:{second.port}"]
    assert header(three)["upstream_stls"] and not header(three)["listen_tls"]
    assert [r["leg"] for r in three.kind(fmt.TLS) if r.get("version")] == ["upstream"]
    assert three.end["how"] == "quit" and three.end["user"] == ALICE
    assert header(one)["via"] == {"how": "route", "route": config.routes[0].text}
    assert header(two)["via"] == {"how": "route", "route": config.routes[1].text}
    assert header(two)["listen_tls"] and header(two)["upstream_tls"]
    assert one.end["how"] == two.end["how"] == "quit"
    assert sorted(watcher.labels) == sorted(
        f"{r.upstream[0]}:{r.upstream[1]} (route {r.text})" for r in config.routes
    )
    # --upstream picks sessions by upstream or route, in list, show and stats
    assert len(listed(config.out_dir, "route=", capsys)) == 3
    [tls_row] = listed(config.out_dir, "/tls", capsys)
    assert tls_row["upstream"] == f"localhost:{second.pop3s_port}"
    capsys.readouterr()
    assert main(["show", "--upstream", f"{first.port}$", str(config.out_dir)]) == 0
    shown = capsys.readouterr().out
    assert f"(route {config.routes[0].text})" in shown
    assert str(second.pop3s_port) not in shown
    assert main(["stats", "--upstream", "/tls", "--json", str(config.out_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["sessions"] == 1


async def test_server_that_speaks_first_but_not_pop3_is_opaque(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    """An SSH-like banner: decided on the server's first bytes, relayed both ways."""

    async def banner(stream: trio.SocketStream) -> None:
        await stream.send_all(b"SSH-2.0-OpenSSH_9.2\r\n")
        data = await stream.receive_some(100)
        await stream.send_all(b"echo:" + data)
        await stream.aclose()

    config = socks_config(tmp_path, dovecot, sniff_timeout=5.0)
    watcher = Watcher()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, banner, 0, host="127.0.0.1")
        )
        target = listeners[0].socket.getsockname()[1]
        async with running(config, watcher) as addrs:
            stream = await trio.open_tcp_stream(HOST, addrs[0][1])
            await stream.send_all(b"\x05\x01\x00")
            await stream.send_all(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + target.to_bytes(2))
            got = b""
            with trio.fail_after(3):  # well before the 5 s sniff timeout
                while b"SSH-2.0" not in got:
                    got += await stream.receive_some(100)
            await stream.send_all(b"client hello")
            with trio.fail_after(5):
                while b"echo:" not in got:
                    got += await stream.receive_some(100)
                while data := await stream.receive_some(100):
                    got += data
            await stream.aclose()
            paths = await wait_captures(config, 1)
        nursery.cancel_scope.cancel()
    assert got[:8] == b"\x05\x00\x05\x00\x00\x01\x7f\x00"  # no auth; CONNECT succeeded
    assert got[12:] == b"SSH-2.0-OpenSSH_9.2\r\necho:client hello"
    cap = Capture(paths[0])
    assert header(cap)["opaque"] is True
    assert cap.stream("s") == b"SSH-2.0-OpenSSH_9.2\r\necho:client hello"
    assert cap.stream("c") == b"#" * len(b"client hello")
    assert "not POP3" in cap.kind(fmt.OPAQUE)[0]["why"]
    assert watcher.labels == [f"{HOST}:{target} (SOCKS5, opaque)"]
