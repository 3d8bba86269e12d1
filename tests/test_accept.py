"""The accept loop: a burst of clients is taken at once; near the descriptor limit, one by one."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import trio

from popproxy.proxy import accept
from popproxy.proxy.config import ProxyConfig
from popproxy.proxy.server import serve_record
from tests.support.faults import wait_ended
from tests.support.scripted import ScriptedServer

CLIENTS = 150


def answer(line: bytes) -> bytes | None:
    return None if line.strip().upper() == b"QUIT" else b"+OK\r\n"


async def client(port: int, got: list[bytes]) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        buf = b""
        while not buf.endswith(b"\r\n"):
            buf += await stream.receive_some(100)
        await stream.send_all(b"QUIT\r\n")
        while True:
            more = await stream.receive_some(100)
            if not more:
                break
            buf += more
        got.append(buf)


async def many_at_once(tmp_path: Path) -> tuple[list[bytes], list[Path], int]:
    server = ScriptedServer(answer=answer)
    out = tmp_path / "captures"
    out.mkdir()
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        config = ProxyConfig(
            upstream=("127.0.0.1", port), listen=("127.0.0.1", 0), out_dir=out, linger=0.2
        )
        addrs = await nursery.start(functools.partial(serve_record, config, None, announce=False))
        with trio.fail_after(30):
            async with trio.open_nursery() as clients:
                for _ in range(CLIENTS):
                    clients.start_soon(client, addrs[0][1], got)
            paths = await wait_ended(out, CLIENTS)
        nursery.cancel_scope.cancel()
    return got, paths, addrs[0][1]


async def test_a_burst_of_clients_is_served_whole(tmp_path: Path) -> None:
    got, paths, _ = await many_at_once(tmp_path)
    assert got == [b"+OK scripted POP3 ready\r\n+OK bye\r\n"] * CLIENTS
    assert len(set(paths)) == CLIENTS


async def test_near_the_descriptor_limit_clients_are_taken_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accept, "HEADROOM", 1 << 40)  # every descriptor counts as the last
    taken: list[int] = []
    real = trio.SocketListener.accept

    async def counted(self: trio.SocketListener) -> trio.SocketStream:
        stream = await real(self)
        taken.append(stream.socket.getsockname()[1])
        return stream

    monkeypatch.setattr(trio.SocketListener, "accept", counted)
    got, paths, port = await many_at_once(tmp_path)
    assert len(got) == CLIENTS and len(set(paths)) == CLIENTS
    # Every one through trio's one-at-a-time accept (the upstream's are not counted).
    assert taken.count(port) == CLIENTS
