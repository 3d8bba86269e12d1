"""Is a fresh connection POP3?  Read the first bytes of both sides and decide, losing none."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import trio

STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
LIMIT = 4096  # more than any greeting line needs; a side's sniffed bytes never exceed it

# RFC 1939 §4 onwards, RFC 2449 §5 (CAPA), RFC 2595 §4 (STLS), RFC 5034 §4 (AUTH) and the
# historic extensions a client might send: the verbs a POP3 client may start with.
POP3_VERBS = frozenset(
    b"USER PASS APOP AUTH CAPA STLS QUIT STAT LIST RETR DELE NOOP RSET TOP UIDL LAST "
    b"RPOP XTND UTF8 LANG".split()
)
_GREETINGS = (b"+OK", b"-ERR")
_WORD = re.compile(rb"[A-Za-z0-9]*")


class Verdict(enum.Enum):
    POP3 = "pop3"
    OPAQUE = "opaque"
    UNDECIDED = "undecided"


def judge_server(data: bytes, eof: bool) -> Verdict:
    """RFC 1939 §4: a POP3 server speaks first, with a status indicator (+OK or -ERR)."""
    if any(data.startswith(g) for g in _GREETINGS):
        return Verdict.POP3
    if not eof and len(data) < 4 and any(g.startswith(data) for g in _GREETINGS):
        return Verdict.UNDECIDED  # "+O" so far: wait for the rest
    return Verdict.OPAQUE


def judge_client(data: bytes, eof: bool) -> Verdict:
    """A client that speaks before the greeting: POP3 only if it starts with a POP3 verb.

    ``POP3`` here means "could be POP3": the server's greeting still decides.
    """
    word = _WORD.match(data)
    assert word is not None
    verb = word.group().upper()
    if word.end() < len(data):  # the verb is complete: a space or line end follows
        return (
            Verdict.POP3 if verb in POP3_VERBS and data[word.end()] in b" \r\n" else Verdict.OPAQUE
        )
    if eof or len(verb) > 4 or not any(v.startswith(verb) for v in POP3_VERBS):
        return Verdict.OPAQUE
    return Verdict.UNDECIDED


@dataclass
class Sniffed:
    verdict: Verdict  # POP3 or OPAQUE
    reason: str  # why, in one line (shown and recorded for opaque connections)
    client: PrefixedStream | None  # None when only the server was watched
    server: PrefixedStream


async def sniff(client: trio.abc.Stream | None, server: trio.abc.Stream, timeout: float) -> Sniffed:
    """Watch both sides (or only the server) until the server greets (POP3), something
    else shows, or ``timeout`` passes (opaque).  Every byte read is handed back through
    the returned streams, so whoever relays next sees the connection from its first byte."""
    bufs = {"client": b"", "server": b""}
    eofs = {"client": False, "server": False}
    verdict: list[tuple[Verdict, str]] = []

    def decide() -> tuple[Verdict, str] | None:
        server = judge_server(bufs["server"], eofs["server"]) if bufs["server"] else None
        if server is Verdict.POP3:
            return Verdict.POP3, "the server greeted like POP3"
        if server is Verdict.OPAQUE:
            return (
                Verdict.OPAQUE,
                f"the server's first bytes are not POP3: {preview(bufs['server'])}",
            )
        if eofs["server"]:
            return Verdict.OPAQUE, "the server closed without a greeting"
        if bufs["client"]:
            client = judge_client(bufs["client"], eofs["client"])
            if client is Verdict.OPAQUE:
                return (
                    Verdict.OPAQUE,
                    f"the client spoke first, not POP3: {preview(bufs['client'])}",
                )
        return None

    async def read(side: str, stream: trio.abc.Stream, scope: trio.CancelScope) -> None:
        while len(bufs[side]) < LIMIT:
            try:
                data = await stream.receive_some(LIMIT - len(bufs[side]))
            except STREAM_ERRORS:
                data = b""
            bufs[side] += data
            eofs[side] = eofs[side] or not data
            found = decide()
            if found is not None:
                verdict.append(found)
                scope.cancel()
                return
            if not data:
                return
        verdict.append((Verdict.OPAQUE, f"no POP3 greeting in the first {LIMIT} bytes"))
        scope.cancel()

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            if client is not None:
                nursery.start_soon(read, "client", client, nursery.cancel_scope)
            nursery.start_soon(read, "server", server, nursery.cancel_scope)
    if verdict:
        found = verdict[0]
    elif eofs["client"] and eofs["server"]:
        found = (Verdict.OPAQUE, "both sides closed before a greeting")
    else:
        found = (Verdict.OPAQUE, f"the server sent no POP3 greeting within {timeout:g} s")
    return Sniffed(
        found[0],
        found[1],
        None if client is None else PrefixedStream(client, bufs["client"], eofs["client"]),
        PrefixedStream(server, bufs["server"], eofs["server"]),
    )


def preview(data: bytes, size: int = 24) -> str:
    """The first bytes, printable (peer bytes never reach a terminal raw)."""
    text = data[:size].decode("ascii", "backslashreplace")
    text = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)
    return repr(text + ("…" if len(data) > size else ""))


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A stream whose first received bytes (and EOF, if seen) were read ahead already."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes, eof: bool = False) -> None:
        self.stream = stream
        self._prefix = prefix
        self._eof = eof

    @property
    def socket(self) -> object:  # stream_address() reads the peer's address through it
        return getattr(self.stream, "socket", None)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return data
        if self._eof:
            await trio.lowlevel.checkpoint()
            return b""
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()
