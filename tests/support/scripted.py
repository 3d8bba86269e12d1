"""A small scripted POP3 server on 127.0.0.1:0 that logs every byte it sent and received.

It greets (unless told not to), answers each LF-terminated line through ``answer``, and
keeps, per connection, the exact bytes it received and sent, so byte-exactness and fault
tests can compare both ends of a proxied session.

Usage (inside a trio test)::

    server = ScriptedServer()
    port = await nursery.start(server.serve)
    ...
    conn = server.connections[0]
    await conn.closed.wait()
    conn.received, conn.sent
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

Answer = Callable[[bytes], bytes | None]  # one line (with its LF) -> bytes to send; None closes


def dot_stuff(body: bytes) -> bytes:
    """RFC 1939 §3: a body as sent on the wire, terminator included (``body`` ends in CRLF)."""
    lines = body.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


def default_answer(messages: dict[int, bytes] | None = None) -> Answer:
    """+OK to everything, CAPA/LIST/UIDL as listings; RETR N sends message N (dot-stuffed).

    QUIT makes the server say ``bye`` and close.
    """
    messages = messages or {}

    def answer(line: bytes) -> bytes | None:
        words = line.strip().split()
        verb = words[0].upper() if words else b""
        if verb == b"QUIT":
            return None
        if verb == b"CAPA":
            return b"+OK capability list follows\r\nUSER\r\nUIDL\r\nTOP\r\n.\r\n"
        if verb in (b"LIST", b"UIDL") and len(words) == 1:
            lines = b"".join(
                b"%d %d\r\n" % (n, len(m)) if verb == b"LIST" else b"%d uid-%d\r\n" % (n, n)
                for n, m in sorted(messages.items())
            )
            return b"+OK\r\n" + lines + b".\r\n"
        if verb == b"RETR" and len(words) > 1 and words[1].isdigit():
            body = messages.get(int(words[1]))
            if body is None:
                return b"-ERR no such message\r\n"
            return b"+OK %d octets\r\n" % len(body) + dot_stuff(body)
        return b"+OK\r\n"

    return answer


@dataclass
class Connection:
    """One accepted connection: what the server received and sent, byte for byte."""

    received: bytearray = field(default_factory=bytearray)
    sent: bytearray = field(default_factory=bytearray)
    got_eof: bool = False
    broken: bool = False  # a send failed: the peer went away mid-way
    closed: trio.Event = field(default_factory=trio.Event)


class ScriptedServer:
    """``greeting=None`` never greets; ``silent`` never answers (reads until EOF)."""

    def __init__(
        self,
        *,
        greeting: bytes | None = b"+OK scripted POP3 ready\r\n",
        answer: Answer | None = None,
        silent: bool = False,
        bye: bytes = b"+OK bye\r\n",
    ) -> None:
        self.greeting = greeting
        self.answer = answer or default_answer()
        self.silent = silent
        self.bye = bye
        self.connections: list[Connection] = []
        self.accepted = trio.Event()
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = Connection()
        self.connections.append(conn)
        self.accepted.set()
        try:
            await self._converse(stream, conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            conn.closed.set()

    async def _converse(self, stream: trio.SocketStream, conn: Connection) -> None:
        async def send(data: bytes) -> None:
            if data:
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    conn.broken = True
                    raise
                conn.sent += data

        if self.greeting is not None:
            await send(self.greeting)
        pending = b""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                conn.got_eof = True
                return
            conn.received += data
            if self.silent:
                continue
            pending += data
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                reply = self.answer(line + b"\n")
                if reply is None:
                    await send(self.bye)
                    return
                await send(reply)


class TeeRelay:
    """A transparent TCP relay on 127.0.0.1:0 that logs both directions, for every connection.

    Put it between the proxy and the real server: ``client_bytes``/``server_bytes`` are then
    exactly what the proxy sent upstream and what the server sent back.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.connections: list[Connection] = []  # received: from the client; sent: from server
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        conn = Connection()
        self.connections.append(conn)
        try:
            server = await trio.open_tcp_stream(*self.upstream)
        except OSError:
            await client.aclose()
            conn.closed.set()
            return

        async def pump(src: trio.SocketStream, dst: trio.SocketStream, log: bytearray) -> None:
            try:
                while True:
                    data = await src.receive_some(65536)
                    if not data:
                        break
                    log += data
                    await dst.send_all(data)
                await dst.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, server, conn.received)
                nursery.start_soon(pump, server, client, conn.sent)
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
                await server.aclose()
            conn.closed.set()
