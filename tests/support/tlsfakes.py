"""Scripted TLS/STLS peers for popproxy's TLS tests: injection and fault cases.

- ``StlsServer``: a POP3 server on 127.0.0.1:0 with a trustme certificate that offers STLS
  and answers it with scripted bytes (one write), then does TLS.  Per connection it keeps
  what arrived in plaintext and what arrived inside TLS, so a test can tell whether
  injected bytes crossed into the encrypted leg.
- ``LineClient``: a tiny client over any trio stream (plain or TLS) that sends raw bytes and
  reads lines, for clients that misbehave on purpose.
- ``client_hello()``: the first flight of a real TLS client, to send half of it.
- ``client_ssl_context()``: a client context that, unlike ``ssl.create_default_context``,
  ignores ``SSLKEYLOGFILE`` unless given a key log file explicitly.
"""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import trio
import trustme

_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
BODY = b"Subject: scripted\r\n\r\nhello over TLS\r\n"


def client_ssl_context(
    cafile: str | Path | None, *, keylog: str | Path | None = None
) -> ssl.SSLContext:
    """A verifying client context that trusts only ``cafile`` (None: no trust anchors)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
    if cafile is not None:
        ctx.load_verify_locations(cafile=str(cafile))
    if keylog is not None:
        ctx.keylog_filename = str(keylog)
    return ctx


def client_hello(server_hostname: str = "localhost") -> bytes:
    """The bytes a TLS client sends first (its ClientHello), made in memory."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@dataclass
class TlsConn:
    """One connection to ``StlsServer``."""

    plain_received: bytearray = field(default_factory=bytearray)  # before the handshake
    tls_received: bytearray = field(default_factory=bytearray)  # decrypted, after it
    sent: bytearray = field(default_factory=bytearray)
    handshake_ok: bool = False
    error: str | None = None
    closed: trio.Event = field(default_factory=trio.Event)


class StlsServer:
    """POP3 over STLS with scripted answers; ``stls_reply`` is sent in ONE write.

    With ``implicit`` it is a pop3s server instead (STLS gets -ERR).
    After the STLS reply it discards whatever plaintext it had buffered (as RFC 2595 §4
    requires of a server) and starts TLS; USER/PASS/STAT/RETR 1/QUIT get canned answers.
    """

    def __init__(self, *, stls_reply: bytes = b"+OK Begin TLS\r\n", implicit: bool = False) -> None:
        self.stls_reply = stls_reply
        self.implicit = implicit  # pop3s: TLS from the first byte, STLS refused
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.context)
        self.connections: list[TlsConn] = []
        self.port = 0

    def write_ca(self, path: Path) -> str:
        self.ca.cert_pem.write_to_path(str(path))
        return str(path)

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(ctx)
        return ctx

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, raw: trio.SocketStream) -> None:
        conn = TlsConn()
        self.connections.append(conn)
        stream: trio.abc.Stream = raw
        try:
            stream = await self._converse(raw, conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            conn.error = repr(exc)
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(*_ERRORS):
                await stream.aclose()
            conn.closed.set()

    async def _converse(self, raw: trio.SocketStream, conn: TlsConn) -> trio.abc.Stream:
        stream: trio.abc.Stream = raw
        log = conn.plain_received
        if self.implicit:
            stream = trio.SSLStream(raw, self.context, server_side=True, https_compatible=True)
            await stream.do_handshake()
            conn.handshake_ok = True
            log = conn.tls_received

        async def send(data: bytes) -> None:
            conn.sent += data
            await stream.send_all(data)

        await send(b"+OK scripted STLS server ready\r\n")
        pending = b""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return stream
            log += data
            pending += data
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                verb = line.strip().split(b" ")[0].upper()
                if verb == b"STLS" and stream is raw:
                    await send(self.stls_reply)
                    if not self.stls_reply.startswith(b"+OK"):
                        continue
                    pending = b""  # RFC 2595 §4: drop plaintext pipelined after STLS
                    tls = trio.SSLStream(raw, self.context, server_side=True, https_compatible=True)
                    await tls.do_handshake()
                    conn.handshake_ok = True
                    stream, log = tls, conn.tls_received
                    break
                if verb == b"QUIT":
                    await send(b"+OK bye\r\n")
                    return stream
                if verb == b"CAPA":
                    caps = b"USER\r\nUIDL\r\n" + (b"STLS\r\n" if stream is raw else b"")
                    await send(b"+OK\r\n" + caps + b".\r\n")
                elif verb == b"STAT":
                    await send(b"+OK 1 %d\r\n" % len(BODY))
                elif verb == b"RETR":
                    await send(b"+OK %d octets\r\n" % len(BODY) + BODY + b".\r\n")
                elif verb == b"STLS":
                    await send(b"-ERR TLS already active\r\n")
                else:
                    await send(b"+OK\r\n")


class LineClient:
    """Raw bytes out, CRLF lines in, over a plain or TLS trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = b""
        self.received = bytearray()  # everything read, in order (plain and TLS alike)

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> LineClient:
        return cls(await trio.open_tcp_stream(host, port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def line(self) -> bytes:
        """The next line (with its CRLF); b"" on EOF."""
        while b"\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                rest, self.buf = self.buf, b""
                return rest
            self.received += data
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    async def multiline(self) -> list[bytes]:
        lines: list[bytes] = []
        while True:
            line = await self.line()
            if line in (b".\r\n", b""):
                return lines
            lines.append(line)

    async def start_tls(self, ctx: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> bytes:
        """Switch to TLS; returns (and clears) plaintext already buffered, which must be empty
        for a conforming server (RFC 2595 §4)."""
        leftover, self.buf = self.buf, b""
        tls = trio.SSLStream(
            self.stream, ctx, server_hostname=server_hostname, https_compatible=True
        )
        await tls.do_handshake()
        self.stream = tls
        return leftover

    async def rest(self, timeout: float = 2.0) -> bytes:
        """Everything until EOF (or ``timeout``), errors swallowed."""
        out = self.buf
        self.buf = b""
        with trio.move_on_after(timeout):
            try:
                while True:
                    data = await self.stream.receive_some(65536)
                    if not data:
                        break
                    self.received += data
                    out += data
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        return out

    async def aclose(self) -> None:
        with contextlib.suppress(*_ERRORS):
            await self.stream.aclose()
