"""Small network helpers every command shares: addresses, error wording, listeners, closing."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import ssl
import struct
import sys

import trio

from popproxy.errors import UsageError
from popproxy.hints import Leg, tls_hint

BACKLOG = 4096  # room for 1,000 simultaneous connects and more
# What a send, receive or close on a peer's stream may raise when the peer misbehaves or goes.
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def parse_hostport(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``host:port``, ``1.2.3.4:port`` or ``[v6]:port`` (names allowed) → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host:
            raise UsageError(f"bad address {text!r}: expected [IPv6]:PORT")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise UsageError(f"bad address {text!r}: expected [IPv6]:PORT")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
        if ":" in host:
            raise UsageError(f"bad address {text!r}: write IPv6 addresses as [ADDR]:PORT")
    if not host:
        raise UsageError(f"bad address {text!r}: the host is missing")
    if not port_text:
        if default_port is None:
            raise UsageError(f"bad address {text!r}: expected HOST:PORT")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"bad address {text!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe_error(
    exc: BaseException,
    leg: Leg | None = None,
    *,
    ca_flag: str = "--upstream-ca",
    listen_flag: str = "--listen-tls",
) -> str:
    """One human line for a network or TLS failure (the cause, not trio's wrapper), with a
    hint naming the likely fix when the failing ``leg`` is known (popproxy/hints.py)."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, trio.BrokenResourceError) and cause is not None:
        exc = cause
    if isinstance(exc, ssl.SSLCertVerificationError):
        text = f"certificate verification failed: {exc.verify_message}"
    elif isinstance(exc, ssl.SSLError) and len(exc.args) > 1:
        text = re.sub(r"\s*\(_ssl\.c:\d+\)", "", str(exc.args[1]))  # OpenSSL's source line
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    hint = tls_hint(exc, leg, ca_flag=ca_flag, listen_flag=listen_flag) if leg else None
    return f"{text} (hint: {hint})" if hint else text


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def open_listeners(
    host: str, port: int, *, announce: bool, note: str = ""
) -> tuple[list[trio.SocketListener], list[tuple[str, int]]]:
    """Bind ``host:port`` (port 0 picks one) and print ``listening on HOST:PORT`` (then
    `` (note)`` if given) per bound address on stdout, flushed: scripts wait for that
    line, even in quiet mode."""
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=BACKLOG)
    addresses: list[tuple[str, int]] = []
    for listener in listeners:
        name = listener.socket.getsockname()
        addresses.append((name[0], name[1]))
        if announce:
            suffix = f" ({note})" if note else ""
            line = f"listening on {format_hostport(name[0], name[1])}{suffix}"
            print(line, flush=True, file=sys.stdout)
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


async def send_quietly(stream: trio.abc.Stream, data: bytes) -> None:
    """Send ``data`` if the stream still takes it; a gone peer is not an error here."""
    try:
        await stream.send_all(data)
    except (*STREAM_ERRORS, trio.BusyResourceError):
        pass


async def close_quietly(stream: trio.abc.Stream) -> None:
    """Close a stream whatever state its peer left it in."""
    try:
        await stream.aclose()
    except (*STREAM_ERRORS, trio.BusyResourceError):
        pass


def socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket under a stream (through TLS layers), if there is one."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return getattr(stream, "socket", None)


def abort_on_close(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """Make closing ``stream`` send an RST instead of a FIN (``SO_LINGER`` 0 s); its socket."""
    sock = socket_of(stream)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return sock
