"""The listeners: ``--listen`` (fixed upstream), each ``--route``, and ``--socks5``."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from popproxy.netutil import open_listeners
from popproxy.proxy import routing
from popproxy.proxy.config import ProxyConfig, format_hostport
from popproxy.proxy.session import Session
from popproxy.proxy.socks_front import handle_socks
from popproxy.proxy.view import SessionView

Addresses = list[tuple[str, int]]
Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def serve_record(
    config: ProxyConfig,
    view: SessionView | None = None,
    *,
    announce: bool = True,
    task_status: trio.TaskStatus[Addresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen and relay until cancelled; ``task_status.started`` gets the bound addresses:
    the fixed listener's first, then each route's in order, then the SOCKS5 listener's.

    Prints ``listening on HOST:PORT`` once per bound address on stdout, flushed, before
    accepting (scripts wait for that line, so it is printed even in quiet mode); a route's
    and the SOCKS5 listener's lines say what they are, in parentheses.
    """
    plan: list[tuple[tuple[str, int], str, Handler]] = []
    if config.serve_fixed:
        fixed: Handler = partial(_handle, routing.fixed_config(config), view)
        plan.append((config.listen, "", fixed))
    for route in config.routes:
        route_view = routing.LabelledView(view, f"route {route.text}") if view else None
        handler: Handler = partial(_handle, routing.route_config(config, route), route_view)
        plan.append((route.listen, f"route to {format_hostport(*route.upstream)}", handler))
    if config.socks is not None:
        socks: Handler = partial(handle_socks, config, view)
        plan.append((config.socks.listen, "SOCKS5", socks))
    bound: list[tuple[list[trio.SocketListener], Handler]] = []
    addresses: Addresses = []
    for (host, port), note, handler in plan:
        listeners, addrs = await open_listeners(host, port, announce=announce, note=note)
        bound.append((listeners, handler))
        addresses.extend(addrs)
    async with trio.open_nursery() as nursery:
        for listeners, handler in bound:
            nursery.start_soon(
                partial(trio.serve_listeners, handler, listeners, handler_nursery=nursery)
            )
        task_status.started(addresses)


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
