"""Accepting clients: every connection waiting in the listen queue, each time it is ready."""

from __future__ import annotations

import errno
import os
import resource
import socket
import time
from collections.abc import Awaitable, Callable

import trio

from popproxy.netutil import describe_error

Handler = Callable[[trio.SocketStream], Awaitable[None]]
ACCEPT_REPORT_INTERVAL = 10.0  # seconds between two reports of the same accept trouble
RETRY_AFTER = 0.1  # out of descriptors: accept again this much later
BURST = 256  # connections accepted per wake-up at most, so relaying goes on meanwhile
# A session holds about three descriptors (client, capture file, upstream): bursts stop
# this close to the descriptor limit, so connections wait in the listen queue rather
# than be accepted and refused for want of a capture file.
HEADROOM = 4 * BURST
# accept(2) says the system is out of something (descriptors, memory): wait and retry.
CAPACITY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# accept(2) says this one connection went wrong before it was accepted: take the next.
_NAMES = "ECONNABORTED EPERM EPROTO ENETDOWN ENOPROTOOPT EHOSTDOWN ENONET EHOSTUNREACH"
_NAMES += " EOPNOTSUPP ENETUNREACH"
SKIP = frozenset(getattr(errno, name) for name in _NAMES.split() if hasattr(errno, name))


class AcceptTrouble:
    """Accept keeps failing while descriptors are out (ten times a second): one line per
    ACCEPT_REPORT_INTERVAL, naming the cause."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self.report = report
        self.last = float("-inf")
        self.suppressed = 0

    def failed(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self.last < ACCEPT_REPORT_INTERVAL:
            self.suppressed += 1
            return
        self.last = now
        more = f"; {self.suppressed} more since the last report" if self.suppressed else ""
        self.suppressed = 0
        self.report(
            f"cannot accept new clients: {describe_error(exc)} (they wait in the listen "
            f"queue; accepting again as soon as descriptors are free{more})"
        )


class Acceptor:
    """Starts ``handler(stream)`` in a nursery for each client of ``listener``; the stream
    is closed when the handler returns.

    trio's ``serve_listeners`` takes one connection per scheduling round: with hundreds of
    sessions busy, a burst of a thousand clients waited seconds in the listen queue.  Here
    every connection waiting is taken at once (up to BURST), from a duplicate of the
    listening socket's descriptor, made here and closed by ``close`` (the listener itself
    is closed by its owner).  Close to the descriptor limit it goes back to one per round,
    as trio does, so that sessions get their capture files before more clients come in.
    """

    def __init__(
        self, listener: trio.SocketListener, handler: Handler, trouble: AcceptTrouble
    ) -> None:
        self.listener, self.handler, self.trouble = listener, handler, trouble
        self._sock = socket.socket(fileno=os.dup(listener.socket.fileno()))
        self._sock.setblocking(False)

    def close(self) -> None:
        self._sock.close()

    async def serve(self, nursery: trio.Nursery) -> None:
        """Accept until cancelled."""
        limit, sock, handler = _descriptor_limit(), self._sock, self.handler
        careful = limit <= HEADROOM  # a small limit: never a burst
        while True:
            if careful:
                try:
                    stream = await self.listener.accept()
                except OSError as exc:
                    await _trouble(exc, self.trouble)
                    continue
                careful = stream.socket.fileno() > limit - HEADROOM
                nursery.start_soon(_run, handler, stream)
                continue
            await trio.lowlevel.wait_readable(sock)
            for _ in range(BURST):
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in SKIP:
                        continue
                    await _trouble(exc, self.trouble)
                    break
                careful = conn.fileno() > limit - HEADROOM  # the lowest free number
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
                nursery.start_soon(_run, handler, stream)
                if careful:
                    break


async def _trouble(exc: OSError, trouble: AcceptTrouble) -> None:
    """Out of descriptors (or memory): say so, wait, retry; anything else is raised."""
    if exc.errno not in CAPACITY:
        raise exc
    trouble.failed(exc)
    await trio.sleep(RETRY_AFTER)


def _descriptor_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 30


async def _run(handler: Handler, stream: trio.SocketStream) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)
