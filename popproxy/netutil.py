"""Small network helpers every command shares: error wording, address checks, listeners."""

from __future__ import annotations

import ipaddress
import ssl
import sys

import trio

from popproxy.proxy.config import format_hostport

BACKLOG = 4096  # room for 1,000 simultaneous connects and more


def describe_error(exc: BaseException) -> str:
    """One human line for a network or TLS failure (the cause, not trio's wrapper)."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, trio.BrokenResourceError) and cause is not None:
        exc = cause
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def open_listeners(
    host: str, port: int, *, announce: bool
) -> tuple[list[trio.SocketListener], list[tuple[str, int]]]:
    """Bind ``host:port`` (port 0 picks one) and print ``listening on HOST:PORT`` per
    bound address on stdout, flushed: scripts wait for that line, even in quiet mode."""
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=BACKLOG)
    addresses: list[tuple[str, int]] = []
    for listener in listeners:
        name = listener.socket.getsockname()
        addresses.append((name[0], name[1]))
        if announce:
            print(f"listening on {format_hostport(name[0], name[1])}", flush=True, file=sys.stdout)
    return listeners, addresses


def stream_address(stream: object, *, peer: bool) -> str:
    """``host:port`` of a socket stream's peer (or its own end); ``?`` when unknown."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "?"
    try:
        addr = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return "?"
    return format_hostport(addr[0], addr[1])
