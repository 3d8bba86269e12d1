"""Fast POP3 client routines for benchmarks: blocking sockets, and asyncio for many sessions."""

from __future__ import annotations

import asyncio
import socket
import time

from bench.pop3server import raise_nofile

TERMINATOR = b"\r\n.\r\n"
RECV_SIZE = 1 << 20


class ProtocolError(Exception):
    """The server answered something a benchmark did not expect."""


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_line(sock: socket.socket) -> bytes:
    """Read one reply line; replies of the single-line commands used here come whole."""
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ProtocolError(f"connection closed after {data!r}")
        data += chunk
    if not data.startswith(b"+OK"):
        raise ProtocolError(f"unexpected reply {data[:80]!r}")
    return data


def _login(sock: socket.socket) -> None:
    _read_line(sock)
    sock.sendall(b"USER bench\r\n")
    _read_line(sock)
    sock.sendall(b"PASS bench\r\n")
    _read_line(sock)


def _quit(sock: socket.socket) -> None:
    try:
        sock.sendall(b"QUIT\r\n")
        _read_line(sock)
    except (OSError, ProtocolError):
        pass


def read_multiline(sock: socket.socket, buf: bytearray) -> int:
    """Read a multi-line reply until CRLF.CRLF, scanning only each recv's tail; return bytes."""
    view = memoryview(buf)
    total = 0
    tail = b""
    while True:
        n = sock.recv_into(view)
        if not n:
            raise ProtocolError(f"connection closed after {total} bytes")
        if total == 0 and view[0] != ord("+"):
            raise ProtocolError(f"unexpected reply {bytes(view[: min(n, 80)])!r}")
        total += n
        tail = (tail + bytes(view[max(0, n - 5) : n]))[-5:]
        if tail == TERMINATOR:
            return total


def retr_throughput(host: str, port: int, size: int, timeout: float = 600.0) -> float:
    """Log in, time one ``RETR 1`` of about ``size`` body bytes; return seconds."""
    with _connect(host, port, timeout) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        _login(sock)
        buf = bytearray(RECV_SIZE)
        start = time.perf_counter()
        sock.sendall(b"RETR 1\r\n")
        total = read_multiline(sock, buf)
        elapsed = time.perf_counter() - start
        _quit(sock)
    if total < size * 0.99:
        raise ProtocolError(f"RETR gave {total} bytes, expected about {size}")
    return elapsed


def noop_latency(host: str, port: int, n: int, warmup: int = 50) -> list[float]:
    """Log in, then time ``n`` NOOP round trips one after another; return seconds each."""
    times: list[float] = []
    with _connect(host, port, 60.0) as sock:
        _login(sock)
        clock = time.perf_counter
        for i in range(warmup + n):
            start = clock()
            sock.sendall(b"NOOP\r\n")
            reply = sock.recv(256)
            while not reply.endswith(b"\r\n"):
                more = sock.recv(256)
                if not more:
                    raise ProtocolError("connection closed during NOOP")
                reply += more
            if i >= warmup:
                times.append(clock() - start)
        _quit(sock)
    return times


async def _session(host: str, port: int, gate: asyncio.Semaphore, timeout: float) -> None:
    async with gate:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=1 << 20), timeout
        )
        try:
            async with asyncio.timeout(timeout):
                await pop3_session(reader, writer)
        finally:
            writer.close()


async def pop3_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The benchmark's session: greeting, USER, PASS, STAT, RETR 1, QUIT, each checked."""
    for command in (None, b"USER bench\r\n", b"PASS bench\r\n", b"STAT\r\n"):
        if command:
            writer.write(command)
        line = await reader.readuntil(b"\r\n")
        if not line.startswith(b"+OK"):
            raise ProtocolError(f"unexpected reply {line[:80]!r}")
    writer.write(b"RETR 1\r\n")
    body = await reader.readuntil(TERMINATOR)
    if not body.startswith(b"+OK"):
        raise ProtocolError(f"unexpected reply {body[:80]!r}")
    writer.write(b"QUIT\r\n")
    await reader.readuntil(b"\r\n")


async def _sessions(
    host: str, port: int, n: int, concurrency: int, timeout: float
) -> tuple[int, int, float]:
    gate = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    results = await asyncio.gather(
        *(_session(host, port, gate, timeout) for _ in range(n)), return_exceptions=True
    )
    wall = time.perf_counter() - start
    errors = sum(1 for r in results if isinstance(r, BaseException))
    return n - errors, errors, wall


def sessions(
    host: str, port: int, n: int = 1000, concurrency: int = 1000, timeout: float = 60.0
) -> tuple[int, int, float]:
    """Run ``n`` sessions, ``concurrency`` at once, each greeting, USER, PASS, STAT, RETR 1,
    QUIT; return (completed, errors, wall seconds)."""
    raise_nofile()
    return asyncio.run(_sessions(host, port, n, concurrency, timeout))
