"""Three actors: what popproxy sends, drops or cuts is never put on the server's account."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from popproxy.capture import format as fmt
from popproxy.capture.reader import CaptureReader
from popproxy.cli.lint import lint_capture
from popproxy.cli.main import main
from popproxy.inspect.document import capture_json
from popproxy.inspect.lint_rules import ERROR, Finding
from popproxy.proxy.config import ProxyConfig, StlsMode
from popproxy.proxy.session import Session

GREETING = b"+OK POP3 ready\r\n"
Script = Callable[[trio.abc.Stream], Awaitable[None]]


async def run_session(
    tmp_path: Path, server: Script, client: Script, *, stop_after: float | None = None, **kw: Any
) -> tuple[dict[str, Any], list[Finding]]:
    """One session over in-memory streams; the capture as ``show --json`` and ``lint``."""
    client_end, proxy_client = trio.testing.memory_stream_pair()
    proxy_upstream, server_end = trio.testing.memory_stream_pair()

    async def connect() -> trio.abc.Stream:
        return proxy_upstream

    config = ProxyConfig(upstream=("pop.example", 110), out_dir=tmp_path, linger=0.2, **kw)
    session = Session(config, proxy_client, None, connect=connect)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server, server_end)
            nursery.start_soon(client, client_end)
            if stop_after is None:
                await session.run()
            else:
                with trio.move_on_after(stop_after):  # Ctrl-C: the proxy is cancelled
                    await session.run()
            nursery.cancel_scope.cancel()
    (path,) = tmp_path.glob(f"*{fmt.SUFFIX}")
    with CaptureReader(path) as reader:
        doc = capture_json(reader)
    with CaptureReader(path) as reader:
        findings = lint_capture(reader)
    return doc, findings


def blamed_on_server(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.direction == "server" and f.severity == ERROR]


async def read_until(stream: trio.abc.Stream, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = await stream.receive_some()
        if not chunk:
            break
        got += chunk
    return got


async def test_strip_mode_replies_are_popproxys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def server(s: trio.abc.Stream) -> None:
        await s.send_all(GREETING)
        assert await read_until(s, b"CAPA\r\n") == b"CAPA\r\n"
        await s.send_all(b"+OK\r\nUIDL\r\nSTLS\r\n.\r\n")
        rest = await read_until(s, b"QUIT\r\n")
        assert rest == b"QUIT\r\n"  # popproxy answered STLS: the server never saw it
        await s.send_all(b"+OK bye\r\n")
        await s.aclose()

    got: list[bytes] = []

    async def client(c: trio.abc.Stream) -> None:
        await read_until(c, b"\r\n")
        await c.send_all(b"CAPA\r\n")
        got.append(await read_until(c, b".\r\n"))
        await c.send_all(b"STLS\r\n")
        got.append(await read_until(c, b"\r\n"))
        await c.send_all(b"QUIT\r\n")
        await read_until(c, b"bye\r\n")

    doc, findings = await run_session(tmp_path, server, client, stls=StlsMode.STRIP)
    assert got == [b"+OK\r\nUIDL\r\n.\r\n", b"-ERR STLS not available.\r\n"]
    (stls,) = [ex for ex in doc["exchanges"] if ex["command"] == "STLS"]
    assert stls["reply_by"] == "popproxy" and stls["status"] == "-ERR"
    assert all(ex["reply_by"] == "server" for ex in doc["exchanges"] if ex is not stls)
    assert blamed_on_server(findings) == []
    (path,) = tmp_path.glob(f"*{fmt.SUFFIX}")
    assert main(["show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "popproxy: -ERR STLS not available." in shown
    assert "S: -ERR STLS" not in shown


async def test_upstream_tls_failing_after_ok_is_not_the_servers_plaintext(
    tmp_path: Path,
) -> None:
    async def server(s: trio.abc.Stream) -> None:
        await s.send_all(GREETING)
        await read_until(s, b"STLS\r\n")
        await s.send_all(b"+OK go ahead\r\n")
        await read_until(s, b"\x16")  # popproxy's ClientHello
        await s.send_all(b"-ERR this is not TLS\r\n")  # the handshake fails
        await s.aclose()

    got: list[bytes] = []

    async def client(c: trio.abc.Stream) -> None:
        await read_until(c, b"\r\n")
        await c.send_all(b"STLS\r\n")
        got.append(await read_until(c, b"\r\n"))

    doc, findings = await run_session(
        tmp_path, server, client, upstream_context=ssl.create_default_context()
    )
    assert got[0].startswith(b"-ERR [SYS/TEMP] popproxy: TLS with upstream failed: ")
    assert doc["session"]["end"]["how"] == "upstream-tls-error"
    drops = [e for e in doc["events"] if e.get("r") == "drop"]
    assert [d["why"] for d in drops] == ["upstream TLS failed"]
    injected = [a for a in doc["anomalies"] if a["kind"] == "plaintext-after-stls"]
    assert injected and all(a["by"] == "popproxy" for a in injected)
    assert blamed_on_server(findings) == []


async def test_ctrl_c_mid_retr_is_popproxys_cut(tmp_path: Path) -> None:
    async def server(s: trio.abc.Stream) -> None:
        await s.send_all(GREETING)
        await read_until(s, b"RETR 1\r\n")
        await s.send_all(b"+OK 1000000 octets\r\n" + b"x" * 1000 + b"\r\n")
        await trio.sleep_forever()  # the rest never comes before the proxy stops

    async def client(c: trio.abc.Stream) -> None:
        await read_until(c, b"\r\n")
        await c.send_all(b"RETR 1\r\n")
        await trio.sleep_forever()

    doc, findings = await run_session(tmp_path, server, client, stop_after=0.5)
    assert doc["session"]["end"]["how"] == "proxy-shutdown"
    assert not [f for f in findings if f.rule == "body-truncated"]
    assert [f.direction for f in findings if f.rule == "cut-by-popproxy"] == ["popproxy"]
    truncated = [a for a in doc["anomalies"] if a["kind"] == "truncated-body"]
    assert [a["by"] for a in truncated] == ["popproxy"]
    assert blamed_on_server(findings) == []


def test_replay_and_serve_leave_popproxys_commands_out(tmp_path: Path) -> None:
    """--upstream-stls: popproxy's own STLS is not a client command to replay or serve;
    strip mode: popproxy's -ERR to the client's STLS is marked as popproxy's."""
    from popproxy.replay.script import load_session
    from tests.support.captures import make_capture

    steps = [
        ("s", 0.01, GREETING),
        ("p", "c", 0.02, b"STLS\r\n", "popproxy upgrades the upstream leg (--upstream-stls)"),
        ("s", 0.03, b"+OK Begin TLS\r\n"),
        ("tls", "s", 0.04),
        ("tls", "c", 0.04),
        ("c", 0.05, b"STLS\r\n"),
        ("p", "s", 0.06, b"-ERR STLS not available.\r\n", "strip mode: popproxy refuses STLS"),
        ("c", 0.07, b"QUIT\r\n"),
        ("s", 0.08, b"+OK bye\r\n"),
    ]
    path = make_capture(tmp_path / f"own{fmt.SUFFIX}", steps)
    session = load_session(path)
    assert [(s.verb, s.reply_by) for s in session.steps] == [
        ("STLS", "popproxy"),
        ("QUIT", "server"),
    ]
