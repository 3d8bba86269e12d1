"""The pump executes the controller's fault decisions on time and in order (virtual clock)."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from popproxy.capture import format as fmt
from popproxy.capture.reader import CaptureReader
from popproxy.core import Direction
from popproxy.faults import FaultSet, parse_rule
from popproxy.proxy.config import ProxyConfig
from popproxy.proxy.controller.faulting import HOLD_LIMIT
from popproxy.proxy.session import Session
from tests.test_attribution import read_until

GREETING = b"+OK POP3 ready\r\n"


def _session(tmp_path: Path, *rules: str) -> tuple[Session, trio.abc.Stream, trio.abc.Stream]:
    client_end, proxy_client = trio.testing.memory_stream_pair()
    proxy_upstream, server_end = trio.testing.memory_stream_pair()

    async def connect() -> trio.abc.Stream:
        return proxy_upstream

    faults = FaultSet([parse_rule(r) for r in rules], seed=1)
    config = ProxyConfig(upstream=("pop.example", 110), out_dir=tmp_path, linger=0.2, faults=faults)
    return Session(config, proxy_client, None, connect=connect), client_end, server_end


def _kinds(tmp_path: Path) -> list[str]:
    (path,) = tmp_path.glob(f"*{fmt.SUFFIX}")
    with CaptureReader(path) as reader:
        return [str(r.fields.get("kind")) for r in reader.records() if r.kind == fmt.EVENT]


async def test_a_delay_holds_the_replies_behind_it(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    session, client, server = _session(tmp_path, "STAT: delay 30s")
    got: list[tuple[float, bytes]] = []

    async def upstream() -> None:
        await server.send_all(GREETING)
        await read_until(server, b"NOOP\r\n")
        await server.send_all(b"+OK 2 320\r\n+OK\r\n")  # both replies at once
        await read_until(server, b"QUIT\r\n")
        await server.send_all(b"+OK bye\r\n")
        await server.send_eof()

    async def mail_client() -> None:
        await read_until(client, GREETING)
        t0 = trio.current_time()
        await client.send_all(b"STAT\r\nNOOP\r\n")
        data = await read_until(client, b"+OK\r\n")
        got.append((trio.current_time() - t0, data))
        await client.send_all(b"QUIT\r\n")
        await read_until(client, b"bye\r\n")
        await client.send_eof()

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream)
            nursery.start_soon(mail_client)
            await session.run()
    [(took, data)] = got
    assert 30 <= took < 31
    assert data == b"+OK 2 320\r\n+OK\r\n"  # NOOP's reply never overtook STAT's
    assert "fault" in _kinds(tmp_path)


async def test_a_throttle_paces_and_bounds_what_waits(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    body = (b"x" * 1022 + b"\r\n") * 4096  # 4 MiB at 64 KiB/s: 64 s
    reply = b"+OK\r\n" + body + b".\r\n"
    session, client, server = _session(tmp_path, "RETR 1: throttle 64KiB/s")
    seen: list[int] = []

    async def upstream() -> None:
        await server.send_all(GREETING)
        await read_until(server, b"RETR 1\r\n")
        await server.send_all(reply)
        await read_until(server, b"QUIT\r\n")
        await server.send_all(b"+OK bye\r\n")
        await server.send_eof()

    async def watch() -> None:
        while True:
            await trio.sleep(1)
            stage = session.ctl._stage
            assert stage is not None
            seen.append(session.ctl.pending(Direction.SERVER) + stage._queued)

    async def mail_client(nursery: trio.Nursery) -> None:
        await read_until(client, GREETING)
        t0 = trio.current_time()
        await client.send_all(b"RETR 1\r\n")
        data = await read_until(client, b"\r\n.\r\n")
        took = trio.current_time() - t0
        assert data == reply
        assert took >= len(reply) / 65536 * 0.95
        await client.send_all(b"QUIT\r\n")
        await read_until(client, b"bye\r\n")
        await client.send_eof()
        nursery.cancel_scope.cancel()

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream)
            nursery.start_soon(watch)
            nursery.start_soon(mail_client, nursery)
            await session.run()
    assert seen and max(seen) <= HOLD_LIMIT + (512 << 10)  # the upstream's reads were held


async def test_an_idle_limit_closes_a_silent_client(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    session, client, server = _session(tmp_path, "NOOP: idle 20s")

    async def upstream() -> None:
        await server.send_all(GREETING)
        await read_until(server, b"NOOP\r\n")
        await server.send_all(b"+OK\r\n")
        await read_until(server, b"never")

    async def mail_client() -> None:
        await read_until(client, GREETING)
        await client.send_all(b"NOOP\r\n")
        await read_until(client, b"+OK\r\n")
        t0 = trio.current_time()
        rest = await read_until(client, b"never")  # until popproxy closes
        assert rest == b""
        assert 20 <= trio.current_time() - t0 < 21

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream)
            nursery.start_soon(mail_client)
            await session.run()
            nursery.cancel_scope.cancel()
    assert session.how == "fault"
    assert "fault-close" in _kinds(tmp_path)
