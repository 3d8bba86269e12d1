"""``popproxy record`` with --route and --socks5 as a process: flags, listening lines, errors;
and a SOCKS5 CONNECT to an IPv6 target."""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from popproxy.capture.reader import CaptureReader
from popproxy.proxy.config import ProxyConfig, SocksSettings
from popproxy.proxy.server import serve_record
from tests.support.captures import wait_ended
from tests.test_cli import ROOT, TIMEOUT, _readline, _TinyServer, assert_one_line_error, popproxy


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--upstream, --route or --socks5"),
        (["--listen", "127.0.0.1:0", "--socks5", "0"], "--listen applies to --upstream"),
        (["--upstream", "h:110", "--socks-auth", "u:p"], "need --socks5"),
        (["--socks5", "0", "--socks-auth", "nopassword"], "POPPROXY_SOCKS_PASSWORD"),
        (["--route", "1110=h"], "bad route"),
        (["--route", "1110=h:110/ssl"], "/tls or /stls"),
        (["--socks5", "0", "--tls-port", "70000"], "not a port"),
        (["--socks5", "0", "--sniff-timeout", "0"], "--sniff-timeout"),
    ],
)
def test_record_flag_errors(tmp_path: Path, argv: list[str], message: str) -> None:
    proc = popproxy("record", "--out", str(tmp_path), *argv)
    assert_one_line_error(proc)
    assert message in proc.stderr


def socks_connect(port: int, target: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall(b"\x05\x01\x00")
    assert sock.recv(2) == b"\x05\x00"
    sock.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + target.to_bytes(2, "big"))
    reply = b""
    while len(reply) < 10:
        reply += sock.recv(10 - len(reply))
    assert reply[:2] == b"\x05\x00"
    return sock


def test_record_routes_and_socks5_in_one_process(tmp_path: Path, tiny_server: _TinyServer) -> None:
    out = tmp_path / "caps"
    env = {k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}
    upstream = f"127.0.0.1:{tiny_server.port}"
    argv = [sys.executable, "-m", "popproxy", "record", "--out", str(out), "--quiet"]
    argv += ["--route", f"127.0.0.1:0={upstream}", "--socks5", "127.0.0.1:0", "--no-check"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    try:
        # Both lines are printed together, before accepting: the second may already sit
        # in the pipe reader's buffer, where select() cannot see it.
        lines = [_readline(proc.stdout, TIMEOUT)]
        assert proc.stdout is not None
        lines.append(proc.stdout.readline())
        route = re.fullmatch(
            rf"listening on 127\.0\.0\.1:(\d+) \(route to {upstream}\)\n", lines[0]
        )
        socks = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+) \(SOCKS5\)\n", lines[1])
        assert route and socks, lines
        with socket.create_connection(("127.0.0.1", int(route.group(1))), timeout=TIMEOUT) as c:
            assert c.recv(100) == b"+OK tiny\r\n"
            c.sendall(b"QUIT\r\n")
            assert c.recv(100) == b"+OK\r\n"
        with socks_connect(int(socks.group(1)), tiny_server.port) as c:
            assert c.recv(100) == b"+OK tiny\r\n"
            c.sendall(b"QUIT\r\n")
            assert c.recv(100) == b"+OK\r\n"
        paths = trio.run(_ended, out, 2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    vias = []
    for path in paths:
        with CaptureReader(path) as reader:
            vias.append(reader.header["via"])
    assert sorted(v["how"] for v in vias) == ["route", "socks5"]
    assert {"how": "socks5", "target": upstream, "user": None} in vias


@pytest.fixture
def tiny_server() -> Iterator[_TinyServer]:
    server = _TinyServer()
    yield server
    server.sock.close()


async def _ended(out: Path, count: int) -> list[Path]:
    with trio.fail_after(TIMEOUT):
        return await wait_ended(out, count)


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")
async def test_socks5_connect_to_ipv6_target(tmp_path: Path) -> None:
    async def pop3(stream: trio.SocketStream) -> None:
        await stream.send_all(b"+OK v6 ready\r\n")
        while data := await stream.receive_some(100):
            if b"QUIT" in data:
                await stream.send_all(b"+OK bye\r\n")
                break
        await stream.aclose()

    out = tmp_path / "caps"
    out.mkdir()
    config = ProxyConfig(
        upstream=("", 0),
        serve_fixed=False,
        out_dir=out,
        linger=0.2,
        socks=SocksSettings(listen=("127.0.0.1", 0)),
    )
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, pop3, 0, host="::1"))
        target = listeners[0].socket.getsockname()[1]
        addrs = await nursery.start(functools.partial(serve_record, config, None, announce=False))
        stream = await trio.open_tcp_stream("127.0.0.1", addrs[0][1])
        await stream.send_all(b"\x05\x01\x00")
        v6 = socket.inet_pton(socket.AF_INET6, "::1")
        await stream.send_all(b"\x05\x01\x00\x04" + v6 + target.to_bytes(2, "big"))
        got = b""
        with trio.fail_after(TIMEOUT):
            while b"ready" not in got:
                got += await stream.receive_some(100)
            await stream.send_all(b"QUIT\r\n")
            while b"bye" not in got:
                got += await stream.receive_some(100)
        await stream.aclose()
        (path,) = await wait_ended(out, 1)
        nursery.cancel_scope.cancel()
    assert got[2:4] == b"\x05\x00"
    with CaptureReader(path) as reader:
        assert reader.header["upstream"] == f"[::1]:{target}"
        assert reader.header["via"]["target"] == f"[::1]:{target}"
        assert reader.end()["how"] in ("quit", "server-closed", "client-closed")
