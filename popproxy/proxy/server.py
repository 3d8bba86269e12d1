"""The listener: one ``Session`` per accepted client, on every address ``--listen`` names."""

from __future__ import annotations

import sys
from functools import partial

import trio

from popproxy.proxy.config import ProxyConfig, format_hostport
from popproxy.proxy.session import Session
from popproxy.proxy.view import SessionView

BACKLOG = 4096  # room for 1,000 simultaneous connects and more


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
    host, port = config.listen
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=BACKLOG)
    addresses: list[tuple[str, int]] = []
    for listener in listeners:
        sockname = listener.socket.getsockname()
        addresses.append((sockname[0], sockname[1]))
        if announce:
            print(f"listening on {format_hostport(sockname[0], sockname[1])}", flush=True,
                  file=sys.stdout)
    handler = partial(_handle, config, view)
    async with trio.open_nursery() as nursery:
        task_status.started(addresses)
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)


async def _handle(config: ProxyConfig, view: SessionView | None,
                  stream: trio.SocketStream) -> None:
    await Session(config, stream, view).run()
