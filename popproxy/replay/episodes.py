"""Record mode ``new_episodes``: connections beyond the recorded ones are relayed for recording."""

from __future__ import annotations

import trio

from popproxy.netutil import STREAM_ERRORS


async def _pump(source: trio.abc.Stream, sink: trio.abc.Stream, done: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except STREAM_ERRORS:
        pass
    done.cancel()  # either side closing ends the relay: POP3 has no half-open use


async def relay(client: trio.abc.Stream, host: str, port: int) -> None:
    """Splice ``client`` to ``host:port`` (popproxy's recording proxy) until one side closes."""
    try:
        upstream = await trio.open_tcp_stream(host, port)
    except OSError:
        await client.aclose()
        return
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, upstream, nursery.cancel_scope)
            nursery.start_soon(_pump, upstream, client, nursery.cancel_scope)
    finally:
        with trio.CancelScope(shield=True):
            for stream in (upstream, client):
                try:
                    await stream.aclose()
                except (*STREAM_ERRORS, trio.BusyResourceError):
                    pass
