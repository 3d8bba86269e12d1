"""Peers that misbehave on purpose, and a harness that runs them through an in-process proxy.

- ``FaultServer``: a POP3 server on 127.0.0.1:0 whose per-line behaviour is an async
  callback (``standard`` answers like ``ScriptedServer``); a callback can stream huge bodies,
  reset the connection (RST) or close without answering.  Each connection is a ``Peer`` that
  logs what it sent and received (bytes, or only a count and a hash for huge streams).
- ``RawClient``: a client over a trio TCP stream that records what it sent and received.
- ``Bystander``: a well-behaved session opened before a fault and finished after it.
- ``Harness``: server + ``serve_record`` + a ``RecordingView`` in one nursery; finds each
  session's capture by the client's port.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from popproxy.capture.reader import CaptureReader
from popproxy.core.transcript import Item, SessionSummary
from popproxy.inspect.document import capture_json
from popproxy.inspect.streams import export_streams
from popproxy.proxy.config import ProxyConfig
from popproxy.proxy.server import serve_record
from tests.support.captures import wait_ended
from tests.support.scripted import default_answer

ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
GREETING = b"+OK fault server ready\r\n"


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def open_files() -> dict[int, str]:
    """This process's open descriptors and what they point at."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return found


def task_count() -> int:
    """Every task alive in this trio run (the root task's tree)."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


def set_rst_on_close(sock: Any) -> None:
    """SO_LINGER 0: the next close sends RST instead of FIN (a killed peer)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --------------------------------------------------------------------------- server side


@dataclass
class Peer:
    """One accepted connection of ``FaultServer``."""

    stream: trio.SocketStream
    keep: bool = True  # keep every byte (else only counts and a hash of what was sent)
    received: bytearray = field(default_factory=bytearray)
    sent: bytearray = field(default_factory=bytearray)
    sent_octets: int = 0
    sent_hash: Any = field(default_factory=hashlib.sha256)
    lines: list[bytes] = field(default_factory=list)
    got_eof: bool = False
    broken: bool = False  # a send or receive failed: the proxy went away
    did_reset: bool = False
    closed: trio.Event = field(default_factory=trio.Event)

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except ERRORS:
            self.broken = True
            raise
        self.sent_octets += len(data)
        self.sent_hash.update(data)
        if self.keep:
            self.sent += data

    async def rst(self) -> None:
        set_rst_on_close(self.stream.socket)
        self.did_reset = True
        await self.stream.aclose()


OnLine = Callable[[bytes, Peer], Awaitable[bool]]  # False: stop (the server closes)
Behaviour = Callable[[Peer], Awaitable[None]]  # a whole connection, instead of conversing


async def standard(line: bytes, peer: Peer, messages: dict[int, bytes] | None = None) -> bool:
    """``ScriptedServer``'s default answers; QUIT gets ``+OK bye`` and a close."""
    reply = default_answer(messages)(line)
    if reply is None:
        await peer.send(b"+OK bye\r\n")
        return False
    await peer.send(reply)
    return True


class FaultServer:
    """Greets, then hands each LF-terminated line to ``on_line``; ``behaviours[i]`` replaces
    the whole conversation of the i-th connection."""

    def __init__(
        self,
        on_line: OnLine = standard,
        *,
        greeting: bytes = GREETING,
        keep: bool = True,
        behaviours: dict[int, Behaviour] | None = None,
    ) -> None:
        self.on_line = on_line
        self.greeting = greeting
        self.keep = keep
        self.behaviours = behaviours or {}
        self.peers: list[Peer] = []
        self.accepted = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        peer = Peer(stream, keep=self.keep)
        index = len(self.peers)
        self.peers.append(peer)
        self.accepted.set()
        try:
            behaviour = self.behaviours.get(index)
            if behaviour is not None:
                await behaviour(peer)
            else:
                await self._converse(peer)
        except ERRORS:
            peer.broken = True
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(*ERRORS):
                await stream.aclose()
            peer.closed.set()

    async def _converse(self, peer: Peer) -> None:
        await peer.send(self.greeting)
        pending = b""
        while True:
            data = await peer.stream.receive_some(65536)
            if not data:
                peer.got_eof = True
                return
            if self.keep:
                peer.received += data
            pending += data
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                peer.lines.append(line + b"\n")
                if not await self.on_line(line + b"\n", peer):
                    return


# --------------------------------------------------------------------------- client side


class RawClient:
    """Raw bytes out and in over TCP; ``received`` is everything read, in order."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.port = int(stream.socket.getsockname()[1])  # names its capture
        self.sent = bytearray()
        self.received = bytearray()
        self.pos = 0  # how much of ``received`` the read_* helpers have consumed
        self.eof = False
        self.error: str | None = None

    @classmethod
    async def connect(cls, addr: tuple[str, int]) -> RawClient:
        return cls(await trio.open_tcp_stream(*addr))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)
        self.sent += data

    async def _more(self) -> bool:
        if self.eof:
            return False
        try:
            data = await self.stream.receive_some(1 << 20)
        except ERRORS as exc:
            self.error, self.eof = repr(exc), True
            return False
        if not data:
            self.eof = True
            return False
        self.received += data
        return True

    async def line(self) -> bytes:
        """The next line (with its LF); what is left on EOF."""
        while self.received.find(b"\n", self.pos) < 0 and await self._more():
            pass
        nl = self.received.find(b"\n", self.pos)
        end = len(self.received) if nl < 0 else nl + 1
        out, self.pos = bytes(self.received[self.pos : end]), end
        return out

    async def until(self, total: int) -> None:
        """Read until ``total`` octets have arrived (or EOF)."""
        while len(self.received) < total and await self._more():
            pass

    async def to_eof(self) -> bytes:
        while await self._more():
            pass
        return bytes(self.received)

    async def rst(self) -> None:
        set_rst_on_close(self.stream.socket)
        await self.aclose()

    async def aclose(self) -> None:
        with contextlib.suppress(*ERRORS):
            await self.stream.aclose()


class Bystander:
    """A normal session through the same proxy: opened before a fault, finished after it."""

    SCRIPT = (b"USER bob\r\n", b"PASS bystander-pw\r\n", b"STAT\r\n", b"QUIT\r\n")

    def __init__(self, client: RawClient) -> None:
        self.client = client

    @classmethod
    async def open(cls, addr: tuple[str, int]) -> Bystander:
        client = await RawClient.connect(addr)
        greeting = await client.line()
        assert greeting.startswith(b"+OK"), greeting
        return cls(client)

    async def finish(self) -> None:
        for command in self.SCRIPT:
            await self.client.send(command)
            reply = await self.client.line()
            assert reply.startswith(b"+OK"), (command, reply)
        assert await self.client.to_eof() == bytes(self.client.received)
        await self.client.aclose()


# --------------------------------------------------------------------------- the proxy


@dataclass
class RecordingView:
    """A ``SessionView`` that keeps what the person watching would be told."""

    ended: dict[int, tuple[str, str | None]] = field(default_factory=dict)
    failed: list[tuple[int, str]] = field(default_factory=list)
    started: list[int] = field(default_factory=list)


class _ViewAdapter:
    detail = True

    def __init__(self, record: RecordingView) -> None:
        self.record = record

    def started(self, number: int, peer: str, upstream: str, path: Path | None) -> None:
        self.record.started.append(number)

    def items(self, number: int, items: list[Item]) -> None:
        pass

    def ended(
        self, number: int, how: str, error: str | None, duration: float, session: SessionSummary
    ) -> None:
        self.record.ended[number] = (how, error)

    def failed(self, number: int, peer: str, reason: str) -> None:
        self.record.failed.append((number, reason))


@dataclass
class Capture:
    """One capture file read back: its ``show --json`` document and its two streams."""

    path: Path
    doc: dict[str, Any]
    client: bytes  # what the client sent, as recorded (popproxy's own bytes left out)
    server: bytes
    warnings: list[str]

    @property
    def end(self) -> dict[str, Any]:
        end = self.doc["session"]["end"]
        assert end is not None, f"{self.path} has no end record"
        return end  # type: ignore[no-any-return]

    def anomalies(self, kind: str) -> list[dict[str, Any]]:
        return [a for a in self.doc["anomalies"] if a["kind"] == kind]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.doc["events"] if e.get("kind") == kind]


def read_capture(path: Path, work: Path) -> Capture:
    out = work / f"export-{path.stem}"
    with CaptureReader(path) as reader:
        export_streams(reader, out)
    with CaptureReader(path) as reader:
        doc = capture_json(reader)
        warnings = list(reader.warnings)
    return Capture(
        path, doc, (out / "client.bin").read_bytes(), (out / "server.bin").read_bytes(), warnings
    )


class Harness:
    def __init__(
        self,
        config: ProxyConfig,
        addr: tuple[str, int],
        view: RecordingView,
        server: FaultServer,
        work: Path,
    ) -> None:
        self.config, self.addr, self.view, self.server, self.work = (
            config,
            addr,
            view,
            server,
            work,
        )

    @property
    def out(self) -> Path:
        return self.config.out_dir

    async def client(self) -> RawClient:
        return await RawClient.connect(self.addr)

    async def bystander(self) -> Bystander:
        return await Bystander.open(self.addr)

    async def captures(self, count: int) -> dict[int, Capture]:
        """The ``count`` finished captures, by client port."""
        paths = await wait_ended(self.out, count)
        assert len(paths) == count, paths
        found = {}
        for path in paths:
            with CaptureReader(path) as reader:
                port = int(str(reader.header["client"]).rsplit(":", 1)[1])
            found[port] = read_capture(path, self.work)
        return found

    def ended(self, capture: Capture) -> tuple[str, str | None]:
        """What the live view said when that capture's session ended."""
        return self.view.ended[int(capture.doc["session"]["session"])]


@contextlib.asynccontextmanager
async def harness(
    work: Path,
    server: FaultServer,
    *,
    out: Path | None = None,
    check_fds: bool = True,
    **options: Any,
) -> AsyncIterator[Harness]:
    """``server`` and a recording proxy in front of it (``keep_secrets``, 0.2 s linger)."""
    fds = fd_count()
    if out is None:
        out = work / "captures"
        out.mkdir()
    view = RecordingView()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        settings: dict[str, Any] = {"keep_secrets": True, "linger": 0.2, **options}
        config = ProxyConfig(
            upstream=("127.0.0.1", port), listen=("127.0.0.1", 0), out_dir=out, **settings
        )
        addrs = await nursery.start(
            partial(serve_record, announce=False), config, _ViewAdapter(view)
        )
        yield Harness(config, addrs[0], view, server, work)
        nursery.cancel_scope.cancel()
    if check_fds:
        assert fd_count() <= fds, "a socket or file leaked"


def relay_to(port: int) -> Behaviour:
    """A connection behaviour: pass everything through to 127.0.0.1:``port`` and back."""

    async def behaviour(peer: Peer) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", port)

        async def pump(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
            with contextlib.suppress(*ERRORS):
                while data := await src.receive_some(65536):
                    await dst.send_all(data)
                await dst.send_eof()  # type: ignore[attr-defined]

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, peer.stream, upstream)
                nursery.start_soon(pump, upstream, peer.stream)
        finally:
            with trio.CancelScope(shield=True):
                await upstream.aclose()

    return behaviour


async def silent(peer: Peer) -> None:
    """A connection behaviour: accept, never say a word, read until the other side closes."""
    while data := await peer.stream.receive_some(65536):
        peer.received += data
    peer.got_eof = True


# --------------------------------------------------------------------------- a real process


ROOT = Path(__file__).resolve().parent.parent.parent


class Recorder:
    """``popproxy record`` in a subprocess; stdout and stderr are collected as they come."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.addr: tuple[str, int] = ("127.0.0.1", 0)

    async def collect(self, stream: trio.abc.ReceiveStream, into: bytearray) -> None:
        while data := await stream.receive_some(65536):
            into += data

    async def wait_output(self, text: bytes) -> None:
        while text not in self.stdout:
            assert self.proc.poll() is None, (self.stdout, self.stderr)
            await trio.sleep(0.02)


@contextlib.asynccontextmanager
async def recorder_process(
    upstream_port: int, out: Path, *, fsize: int | None = None, nofile: int | None = None
) -> AsyncIterator[Recorder]:
    """Run ``popproxy record`` (quiet, keep-secrets); ``fsize`` sets its RLIMIT_FSIZE,
    ``nofile`` its RLIMIT_NOFILE.

    On exit it is stopped with SIGINT (unless it is dead already) and waited for.
    """

    def limits() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR",)}
    env.update(NO_COLOR="1", COLUMNS="400", PYTHONDONTWRITEBYTECODE="1")
    argv = [
        sys.executable,
        "-m",
        "popproxy",
        "record",
        "--upstream",
        f"127.0.0.1:{upstream_port}",
        "--listen",
        "127.0.0.1:0",
        "--out",
        str(out),
        "--quiet",
        "--keep-secrets",
        "--no-check",  # scripted upstreams count their connections
    ]
    proc = await trio.lowlevel.open_process(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, preexec_fn=limits
    )
    rec = Recorder(proc)
    try:
        async with trio.open_nursery() as nursery:
            assert proc.stdout is not None and proc.stderr is not None
            nursery.start_soon(rec.collect, proc.stdout, rec.stdout)
            nursery.start_soon(rec.collect, proc.stderr, rec.stderr)
            await rec.wait_output(b"\n")
            line = bytes(rec.stdout).split(b"\n", 1)[0].decode()
            host, _, port = line.removeprefix("listening on ").rpartition(":")
            rec.addr = (host, int(port))
            yield rec
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            await proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    await pipe.aclose()
