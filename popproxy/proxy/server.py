"""The listeners: ``--listen`` (fixed upstream), each ``--route``, and ``--socks5``."""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial

import trio

from popproxy.netutil import open_listeners
from popproxy.proxy import accept, routing
from popproxy.proxy.config import ProxyConfig, format_hostport
from popproxy.proxy.session import Session
from popproxy.proxy.socks_front import handle_socks
from popproxy.proxy.view import SessionView

Addresses = list[tuple[str, int]]
Handler = Callable[[trio.SocketStream], Awaitable[None]]
GC_FIRST = 100_000  # allocations between two collections of the youngest generation


@dataclass
class Totals:
    """What the listeners did, for the shutdown summary."""

    sessions: int = 0
    refused: int = 0  # no capture could be created: told -ERR [SYS/TEMP]
    capture_errors: int = 0  # stopped because their capture could not be written
    unrecorded: int = 0  # record octets those sessions relayed that never reached a file

    def summary(self) -> str:
        text = f"{self.sessions} sessions"
        if self.refused:
            text += f", {self.refused} refused (no capture could be created)"
        if self.capture_errors:
            text += (
                f", {self.capture_errors} stopped by capture write failures "
                f"(up to {self.unrecorded:,} octets relayed unrecorded)"
            )
        return text


async def serve_record(
    config: ProxyConfig,
    view: SessionView | None = None,
    *,
    totals: Totals | None = None,
    announce: bool = True,
    task_status: trio.TaskStatus[Addresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen and relay until cancelled; ``task_status.started`` gets the bound addresses:
    the fixed listener's first, then each route's in order, then the SOCKS5 listener's.

    Prints ``listening on HOST:PORT`` once per bound address on stdout, flushed, before
    accepting (scripts wait for that line, so it is printed even in quiet mode); a route's
    and the SOCKS5 listener's lines say what they are, in parentheses.
    """
    totals = totals or Totals()
    plan: list[tuple[tuple[str, int], str, Handler]] = []
    if config.serve_fixed:
        fixed: Handler = partial(_handle, routing.fixed_config(config), view, totals)
        plan.append((config.listen, "", fixed))
    for route in config.routes:
        route_view = routing.LabelledView(view, f"route {route.text}") if view else None
        handler: Handler = partial(_handle, routing.route_config(config, route), route_view, totals)
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
    trouble = accept.AcceptTrouble(partial(_report, view))
    acceptors: list[accept.Acceptor] = []
    try:
        for listeners, handler in bound:
            acceptors += [accept.Acceptor(listener, handler, trouble) for listener in listeners]
        with _collector_tuned():
            async with trio.open_nursery() as nursery:
                for acceptor in acceptors:
                    nursery.start_soon(_serve, acceptor, nursery)
                task_status.started(addresses)
    finally:
        for acceptor in acceptors:
            acceptor.close()


async def _serve(acceptor: accept.Acceptor, nursery: trio.Nursery) -> None:
    async with acceptor.listener:
        await acceptor.serve(nursery)


@contextlib.contextmanager
def _collector_tuned() -> Iterator[None]:
    """The cyclic garbage collector, tuned for many sessions while the listeners serve.

    A finished session is freed by reference counting; the collector only finds the
    few cycles trio leaves.  With its default first threshold (700 allocations) it still
    ran every few sessions and walked every live session's objects: about a fifth of the
    CPU with 1,000 sessions at once.  What was loaded before serving (modules, the CLI) is
    frozen out of its walks, and it runs every GC_FIRST allocations (the sessions ended by
    then were freed already and are not walked at all); both as before after.
    """
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_FIRST, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def _report(view: SessionView | None, message: str) -> None:
    notice = getattr(view, "notice", None)
    if notice is not None:
        notice(message, "pop.error")
    else:
        print(f"popproxy: {message}", file=sys.stderr, flush=True)


async def _handle(
    config: ProxyConfig, view: SessionView | None, totals: Totals, stream: trio.SocketStream
) -> None:
    session = Session(config, stream, view)
    try:
        await session.run()
        totals.sessions += 1
        recorder = session.recorder
        if recorder is None:
            totals.refused += 1
        elif recorder.error is not None:
            totals.capture_errors += 1
            totals.unrecorded += recorder.lost
    except Exception as exc:  # a bug in one session must never end the proxy
        print(
            f"popproxy: session {session.number} failed: {type(exc).__name__}: {exc}",
            file=sys.stderr,
            flush=True,
        )
        with contextlib.suppress(Exception):
            await stream.aclose()
