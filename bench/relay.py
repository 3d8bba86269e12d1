"""A bare trio TCP relay: the floor of any trio proxy (two pumps, half-close kept)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from functools import partial

import trio

from bench.pop3server import raise_nofile

CHUNK = 65536


def split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    """Copy until EOF, then pass the EOF on."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await source.receive_some(CHUNK):
            await sink.send_all(data)
        await sink.send_eof()


async def handle(upstream: tuple[str, int], client: trio.SocketStream) -> None:
    try:
        server = await trio.open_tcp_stream(*upstream)
    except OSError:
        await client.aclose()
        return
    async with client, server, trio.open_nursery() as nursery:
        nursery.start_soon(pump, client, server)
        nursery.start_soon(pump, server, client)


async def run(upstream: tuple[str, int], listen: tuple[str, int]) -> None:
    listeners = await trio.open_tcp_listeners(listen[1], host=listen[0], backlog=4096)
    port = listeners[0].socket.getsockname()[1]
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.serve_listeners, partial(handle, upstream), listeners))
            print(f"listening on {listen[0]}:{port}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__)
    parser.add_argument("--upstream", required=True, help="HOST:PORT")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT")
    args = parser.parse_args(argv)
    raise_nofile()
    trio.run(run, split_hostport(args.upstream), split_hostport(args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
