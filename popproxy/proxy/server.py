"""The listener: one ``Session`` per accepted client, on every address ``--listen`` names."""

from __future__ import annotations

import contextlib
import sys
from functools import partial

import trio

from popproxy.netutil import open_listeners
from popproxy.proxy.config import ProxyConfig
from popproxy.proxy.session import Session
from popproxy.proxy.view import SessionView

Addresses = list[tuple[str, int]]


async def serve_record(
    config: ProxyConfig,
    view: SessionView | None = None,
    *,
    announce: bool = True,
    task_status: trio.TaskStatus[Addresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen and relay until cancelled; ``task_status.started`` gets the bound addresses.

    Prints ``listening on HOST:PORT`` once per bound address on stdout, flushed, before
    accepting (scripts wait for that line, so it is printed even in quiet mode).
    """
    listeners, addresses = await open_listeners(*config.listen, announce=announce)
    handler = partial(_handle, config, view)
    async with trio.open_nursery() as nursery:
        task_status.started(addresses)
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)


async def _handle(config: ProxyConfig, view: SessionView | None, stream: trio.SocketStream) -> None:
    session = Session(config, stream, view)
    try:
        await session.run()
    except Exception as exc:  # a bug in one session must never end the proxy
        print(
            f"popproxy: session {session.number} failed: {type(exc).__name__}: {exc}",
            file=sys.stderr,
            flush=True,
        )
        with contextlib.suppress(Exception):
            await stream.aclose()
