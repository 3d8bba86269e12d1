"""The fault matrix: peers, disks and load that misbehave, one row per test.

Every row checks the same promises: the relay does what it can, the person watching is told
why the session ended, a second session through the same proxy is unaffected, the capture
holds exactly the bytes that crossed (``export --streams`` against what each peer logged),
and nothing leaks (the harness compares open file descriptors before and after).  Nursery
errors fail the test by themselves; ``no_traceback`` checks stderr.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popproxy.capture import format as fmt
from popproxy.capture.format import Record
from popproxy.capture.reader import CaptureReader
from popproxy.capture.recorder import UNRECORDED_BUDGET
from popproxy.capture.writer import CaptureWriter, create_capture_file
from popproxy.core import Direction
from popproxy.inspect.document import capture_json
from popproxy.proxy.config import ProxyConfig
from popproxy.proxy.session import Session
from popproxy.proxy.tap import Tap
from tests.support.faults import (
    GREETING,
    ROOT,
    Bystander,
    Capture,
    FaultServer,
    Harness,
    Peer,
    RawClient,
    fd_count,
    harness,
    open_files,
    read_capture,
    recorder_process,
    relay_to,
    silent,
    standard,
    task_count,
)
from tests.support.tlsfakes import StlsServer

STEP = 20.0  # per-test bound: a stuck proxy fails instead of hanging
MB = 1 << 20


@pytest.fixture(autouse=True)
def no_traceback(capfd: pytest.CaptureFixture[str]) -> Iterator[None]:
    yield
    err = capfd.readouterr().err
    assert "Traceback" not in err, err


def body_of(size: int, seed: int = 1939) -> bytes:
    """A message body of about ``size`` octets: CRLF lines, some needing dot-stuffing."""
    rng = random.Random(seed)
    block = b"".join(
        (b"." if rng.random() < 0.1 else b"")
        + rng.randbytes(rng.randrange(20, 70)).hex().encode()
        + b"\r\n"
        for _ in range(512)
    )
    return (block * (size // len(block) + 1))[:size].rsplit(b"\r\n", 1)[0] + b"\r\n"


async def check_bystander(h: Harness, caps: dict[int, Capture], by: Bystander) -> None:
    cap = caps[by.client.port]
    assert cap.end["how"] == "quit", cap.end
    assert h.ended(cap) == ("quit", None)
    assert cap.client == bytes(by.client.sent)
    assert cap.server == bytes(by.client.received)
    assert [ex["command"] for ex in cap.doc["exchanges"] if ex["kind"] == "command"] == [
        "USER",
        "PASS",
        "STAT",
        "QUIT",
    ]


def commands(cap: Capture, verb: str) -> list[dict[str, object]]:
    return [ex for ex in cap.doc["exchanges"] if ex["command"] == verb]


# --------------------------------------------------------------------------- upstream faults


class _ResetAfter(trio.abc.HalfCloseableStream):
    """An upstream that sends ``chunks`` (one per read; a pause before the last two), then
    the last one and a failed read at once, as a socket whose RST is already queued does."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self.chunks:
            raise trio.BrokenResourceError("reset") from ConnectionResetError(
                104, "Connection reset by peer"
            )
        if len(self.chunks) == 2:
            await trio.sleep(0.2)  # the flusher has written the rest and waits for more
        if len(self.chunks) > 1:
            await trio.lowlevel.checkpoint()
        return self.chunks.pop(0)  # the last one at once, as if it came with the RST

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_end_while_a_flush_is_due_loses_nothing(tmp_path: Path) -> None:
    def lines(size: int) -> bytes:  # complete lines: the observer settles (releases) them
        body = (b"x" * 78 + b"\r\n") * (size // 80)
        return body + b"z" * (size - len(body) - 2) + b"\r\n"

    # Full reads (64 KiB, 256 KiB, 1 MiB) grow the pump's reads to 1 MiB; after a pause
    # (everything flushed) a small chunk and a big one make the pump wake the flusher...
    chunks = [
        GREETING + lines(65536 - len(GREETING)),
        lines(262144),
        lines(MB),
        lines(1000),
        lines(MB),
    ]
    upstream = _ResetAfter(list(chunks))  # ...and then the RST arrives in the same step
    client_end, proxy_client = trio.testing.memory_stream_pair()

    async def connect() -> trio.abc.Stream:
        return upstream

    async def drain() -> None:
        while await client_end.receive_some(MB):
            pass

    config = ProxyConfig(upstream=("fixture.example", 110), out_dir=tmp_path, keep_secrets=True)
    session = Session(config, proxy_client, None, connect=connect)
    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await session.run()
    assert session.path is not None
    cap = read_capture(session.path, tmp_path)
    assert cap.end["how"] == "server-reset"
    assert cap.end["octets"]["s"] == sum(map(len, chunks))
    assert len(cap.server) == cap.end["octets"]["s"]


async def test_upstream_resets_mid_retr(tmp_path: Path) -> None:
    body = body_of(8 * MB)

    async def on_line(line: bytes, peer: Peer) -> bool:
        if line.startswith(b"RETR"):
            await peer.send(b"+OK %d octets\r\n" % len(body))
            await peer.send(body[: 3 * MB])
            await peer.rst()
            return False
        return await standard(line, peer)

    server = FaultServer(on_line)
    with trio.fail_after(STEP):
        async with harness(tmp_path, server) as h:
            by = await h.bystander()
            client = await h.client()
            await client.send(b"RETR 1\r\n")
            got = await client.to_eof()
            await by.finish()
            caps = await h.captures(2)
            await client.aclose()
    peer = server.peers[1]
    assert peer.did_reset
    # What reached the client is what the server sent before the RST (the kernel may drop
    # the tail still queued at the server): nothing was made up or left out in between.
    assert bytes(peer.sent).startswith(got) and len(got) > MB
    cap = caps[client.port]
    assert cap.end["octets"]["s"] == len(got)  # the session saw it all, and so does the file
    assert cap.server == got and cap.client == bytes(client.sent)
    assert cap.end["how"] == "server-reset"
    assert h.ended(cap) == ("server-reset", "Connection reset by peer")
    (retr,) = commands(cap, "RETR")
    assert retr["status"] == "+OK" and retr["truncated"] is True
    assert cap.warnings == []
    await check_bystander(h, caps, by)


async def test_upstream_sends_10mb_line_without_lf(tmp_path: Path) -> None:
    size = 10 * MB
    block = b"x" * 65536

    async def on_line(line: bytes, peer: Peer) -> bool:
        if line.startswith(b"BIG"):
            for _ in range(size // len(block)):
                await peer.send(block)
            await peer.send(b"\r\n")
            return True
        return await standard(line, peer)

    server = FaultServer(on_line, keep=False)  # a hash of what was sent, not 10 MB of it
    with trio.fail_after(STEP):
        async with harness(tmp_path, server) as h:
            by = await h.bystander()
            client = await h.client()
            greeting = await client.line()
            tracemalloc.start()
            try:
                await client.send(b"BIG\r\n")
                # Read without keeping: only the proxy's own buffers count below.
                digest, total = hashlib.sha256(greeting), len(greeting)
                while total < len(greeting) + size + 2:
                    data = await client.stream.receive_some(MB)
                    assert data
                    digest.update(data)
                    total += len(data)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            await client.send(b"QUIT\r\n")
            tail = (await client.to_eof())[client.pos :]
            await by.finish()
            caps = await h.captures(2)
            await client.aclose()
    peer = server.peers[1]
    assert tail == b"+OK bye\r\n"
    digest.update(tail)
    assert total + len(tail) == peer.sent_octets
    assert digest.hexdigest() == peer.sent_hash.hexdigest()  # relayed all 10 MB, unchanged
    print(f"traced peak while relaying a 10 MB line: {peak / MB:.1f} MB")
    assert peak < 3 * size, f"peak {peak / MB:.1f} MB while relaying a 10 MB line"
    cap = caps[client.port]
    assert len(cap.server) == peer.sent_octets
    assert hashlib.sha256(cap.server).hexdigest() == peer.sent_hash.hexdigest()
    assert cap.client == bytes(client.sent)
    assert [a["dir"] for a in cap.anomalies("line-too-long")] == ["s"]
    assert cap.end["how"] == "server-closed" and cap.end["observer_error"] is None
    await check_bystander(h, caps, by)


async def test_upstream_sends_1mb_random_binary(tmp_path: Path) -> None:
    junk = random.Random(7).randbytes(MB)

    async def on_line(line: bytes, peer: Peer) -> bool:
        if line.startswith(b"BIN"):
            await peer.send(junk)
            return True
        return await standard(line, peer)

    server = FaultServer(on_line)
    with trio.fail_after(STEP):
        async with harness(tmp_path, server) as h:
            by = await h.bystander()
            client = await h.client()
            await client.line()
            await client.send(b"BIN\r\n")
            await client.until(len(GREETING) + len(junk))
            await client.send(b"QUIT\r\n")
            got = await client.to_eof()
            await by.finish()
            caps = await h.captures(2)
            await client.aclose()
    peer = server.peers[1]
    assert got == bytes(peer.sent) == GREETING + junk + b"+OK bye\r\n"
    cap = caps[client.port]
    assert cap.server == got and cap.client == bytes(client.sent) == bytes(peer.received)
    assert cap.doc["anomalies"], "1 MB of random bytes produced no anomaly"
    assert cap.end["observer_error"] is None
    # The junk has no line structure, so "+OK bye" is not seen as QUIT's reply.
    assert cap.end["how"] == "server-closed"
    await check_bystander(h, caps, by)


async def test_upstream_closes_without_answering_quit(tmp_path: Path) -> None:
    async def on_line(line: bytes, peer: Peer) -> bool:
        if line == b"QUIT\r\n":  # the bystander says "quit": answered
            return False  # close, no +OK
        return await standard(line, peer)

    server = FaultServer(on_line)
    with trio.fail_after(STEP):
        async with harness(tmp_path, server) as h:
            by = await h.bystander()
            client = await h.client()
            await client.line()
            await client.send(b"STAT\r\n")
            await client.line()
            await client.send(b"QUIT\r\n")
            got = await client.to_eof()
            await client.aclose()
            by.SCRIPT = (*by.SCRIPT[:-1], b"quit\r\n")  # the bystander's QUIT is answered
            await by.finish()
            caps = await h.captures(2)
    peer = server.peers[1]
    assert got == bytes(peer.sent) == GREETING + b"+OK\r\n"
    cap = caps[client.port]
    assert cap.server == got and cap.client == bytes(client.sent)
    (quit_,) = commands(cap, "QUIT")
    assert quit_["status"] is None
    (no_reply,) = cap.anomalies("no-reply")
    assert no_reply["seq"] == quit_["seq"] and no_reply["dir"] == "s"
    assert cap.end["how"] == "server-closed", cap.end  # the server never said +OK to QUIT
    cap_by = caps[by.client.port]
    assert cap_by.end["how"] == "quit" and cap_by.server == bytes(by.client.received)


async def test_upstream_stls_greeting_never_comes(tmp_path: Path) -> None:
    fake = StlsServer()
    async with trio.open_nursery() as nursery:
        fake_port = await nursery.start(fake.serve)
        server = FaultServer(behaviours={0: silent, 1: relay_to(fake_port)})
        with trio.fail_after(STEP):
            async with harness(
                tmp_path,
                server,
                upstream_stls=True,
                connect_timeout=0.5,
                upstream_context=fake.client_context(),
            ) as h:
                client = await h.client()
                await server.accepted.wait()
                by = await h.bystander()  # its upstream leg is TLS, set up by popproxy
                t0 = trio.current_time()
                got = await client.to_eof()
                elapsed = trio.current_time() - t0
                await client.aclose()
                await by.finish()
                caps = await h.captures(2)
                await server.peers[0].closed.wait()
        nursery.cancel_scope.cancel()
    assert got == b"-ERR [SYS/TEMP] popproxy: upstream did not answer\r\n"
    assert 0.3 < elapsed < 5
    cap = caps[client.port]
    assert cap.end["how"] == "upstream-error"
    assert h.ended(cap) == ("upstream-error", "upstream did not answer")
    assert cap.client == b"" and cap.server == b""  # popproxy's own line is marked as such
    assert server.peers[0].received == b""  # popproxy said nothing (no STLS) to the mute server
    cap_by = caps[by.client.port]
    assert cap_by.end["how"] == "quit"
    conn = fake.connections[0]
    assert conn.handshake_ok and bytes(conn.plain_received) == b"STLS\r\n"
    assert bytes(conn.tls_received) == bytes(by.client.sent) == cap_by.client
    assert cap_by.server == bytes(conn.sent)
    assert [t["leg"] for t in cap_by.doc["tls"]] == ["upstream", "client"]


# --------------------------------------------------------------------------- client faults


async def test_client_resets_right_after_retr(tmp_path: Path) -> None:
    asked, go = trio.Event(), trio.Event()
    body = body_of(MB)

    async def on_line(line: bytes, peer: Peer) -> bool:
        if line.startswith(b"RETR"):
            asked.set()
            await go.wait()
            await peer.send(b"+OK %d octets\r\n" % len(body) + body + b".\r\n")
            return True
        return await standard(line, peer)

    server = FaultServer(on_line)
    with trio.fail_after(STEP):
        async with harness(tmp_path, server) as h:
            by = await h.bystander()
            client = await h.client()
            await client.line()
            await client.send(b"RETR 1\r\n")
            await asked.wait()
            await client.rst()
            while not h.view.ended:
                await trio.sleep(0.01)
            go.set()
            await server.peers[1].closed.wait()  # popproxy closed its upstream leg
            await by.finish()
            caps = await h.captures(2)
    peer = server.peers[1]
    assert peer.got_eof or peer.broken
    cap = caps[client.port]
    assert cap.end["how"] == "client-reset"
    assert h.ended(cap) == ("client-reset", "Connection reset by peer")
    assert cap.client == bytes(client.sent) == bytes(peer.received)
    assert cap.server == GREETING  # the reply came after the session was over
    (retr,) = commands(cap, "RETR")
    assert retr["status"] is None
    assert [a["seq"] for a in cap.anomalies("no-reply")] == [retr["seq"]]
    await check_bystander(h, caps, by)


async def test_client_sends_1mb_line(tmp_path: Path) -> None:
    line = b"NOOP " + b"a" * MB + b"\r\n"
    server = FaultServer()
    with trio.fail_after(STEP):
        async with harness(tmp_path, server) as h:
            by = await h.bystander()
            client = await h.client()
            await client.line()
            await client.send(line)
            assert await client.line() == b"+OK\r\n"
            await client.send(b"QUIT\r\n")
            got = await client.to_eof()
            await client.aclose()
            await by.finish()
            caps = await h.captures(2)
    peer = server.peers[1]
    assert bytes(peer.received) == bytes(client.sent)  # relayed whole
    assert got == bytes(peer.sent)
    cap = caps[client.port]
    assert cap.client == bytes(client.sent) and cap.server == got
    assert [a["dir"] for a in cap.anomalies("line-too-long")] == ["c"]
    assert cap.end["how"] == "quit" and cap.end["observer_error"] is None
    await check_bystander(h, caps, by)


async def test_client_pipelines_10000_commands(tmp_path: Path) -> None:
    n = 10_000
    server = FaultServer()
    with trio.fail_after(STEP):
        async with harness(tmp_path, server) as h:
            by = await h.bystander()
            client = await h.client()
            await client.line()
            await client.send(b"NOOP\r\n" * n)  # one write
            await client.until(len(GREETING) + 5 * n)
            await client.send(b"QUIT\r\n")
            got = await client.to_eof()
            await client.aclose()
            await by.finish()
            caps = await h.captures(2)
    assert got == GREETING + b"+OK\r\n" * n + b"+OK bye\r\n"
    peer = server.peers[1]
    assert bytes(peer.received) == bytes(client.sent) and bytes(peer.sent) == got
    cap = caps[client.port]
    assert cap.client == bytes(client.sent) and cap.server == got
    noops = commands(cap, "NOOP")
    assert len(noops) == n
    assert all(ex["status"] == "+OK" for ex in noops)
    seqs = [ex["seq"] for ex in noops]
    assert seqs == sorted(seqs) and len(set(seqs)) == n
    assert cap.doc["anomalies"] == []
    assert cap.end["how"] == "quit" and cap.end["commands"] == n + 1
    await check_bystander(h, caps, by)


async def test_client_connects_and_says_nothing(tmp_path: Path) -> None:
    server = FaultServer()
    with trio.fail_after(STEP):
        async with harness(tmp_path, server, idle_timeout=1.0) as h:
            client = await h.client()
            assert await client.line() == GREETING  # the server's greeting is relayed
            t0 = trio.current_time()
            by = await h.bystander()  # a whole session while the mute one waits
            await by.finish()
            got = await client.to_eof()
            elapsed = trio.current_time() - t0
            await client.aclose()
            caps = await h.captures(2)
            await server.peers[0].closed.wait()
    assert got == GREETING
    assert 0.8 < elapsed < 5
    cap = caps[client.port]
    assert cap.end["how"] == "idle-timeout"
    assert h.ended(cap) == ("idle-timeout", "no traffic for 1 s")
    assert cap.client == b"" and cap.server == GREETING == bytes(server.peers[0].sent)
    assert server.peers[0].got_eof  # popproxy closed the upstream leg too
    await check_bystander(h, caps, by)


# --------------------------------------------------------------------------- recorder faults


def read_back(path: Path) -> tuple[list[Record], list[str]]:
    """Every record a damaged capture still holds, and the reader's warnings."""
    with CaptureReader(path) as reader:
        records = list(reader.records())
        return records, list(reader.warnings)


def recorded(records: list[Record], direction: str) -> bytes:
    return b"".join(
        r.data or b""
        for r in records
        if r.kind == fmt.DATA and r.fields["d"] == direction and not r.fields.get("p")
    )


@pytest.mark.slow
async def test_capture_file_too_large_mid_session(tmp_path: Path) -> None:
    """RLIMIT_FSIZE on the proxy process: its writes fail with EFBIG at ``limit`` octets."""
    limit = 512 * 1024
    body = body_of(24 * MB)
    server = FaultServer(partial(standard, messages={1: body}))
    out = tmp_path / "captures"
    out.mkdir()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        with trio.fail_after(STEP):
            async with recorder_process(port, out, fsize=limit) as proxy:
                by = await Bystander.open(proxy.addr)
                client = await RawClient.connect(proxy.addr)
                await client.line()
                await client.send(b"RETR 1\r\n")
                got = await client.to_eof()
                await proxy.wait_output(b"capture-error")
                await by.finish()
                await proxy.wait_output(b"session ended: quit")
                await client.aclose()
        nursery.cancel_scope.cancel()
    stdout, stderr = proxy.stdout.decode(), proxy.stderr.decode()
    assert proxy.proc.returncode == 0, stderr
    assert "Traceback" not in stdout + stderr
    (line,) = [x for x in stdout.splitlines() if "capture-error" in x]
    assert "capture write failed: File too large" in line, stdout
    # The session was closed, not relayed unrecorded to its end.
    assert len(got) < len(body) // 2, f"{len(got)} of {len(body)} octets relayed"
    paths = {p: read_back(p) for p in out.glob("*.popcap")}
    assert len(paths) == 2
    (fault,) = [p for p in paths if p.stat().st_size >= limit]
    records, warnings = paths[fault]
    assert fault.stat().st_size == limit
    assert not [r for r in records if r.kind == fmt.END]  # no room left for it
    assert warnings and "read up to the last complete record" in warnings[0]
    server_rec = recorded(records, "s")
    assert len(server_rec) > limit // 2 and got.startswith(server_rec)
    assert recorded(records, "c") == bytes(client.sent)
    unrecorded = len(got) - len(server_rec)
    print(
        f"EFBIG at {limit} octets: the client got {len(got)} octets, {unrecorded} of them "
        f"unrecorded"
    )
    assert unrecorded <= UNRECORDED_BUDGET  # the disk may lag this far, no further
    (other,) = [p for p in paths if p != fault]
    cap = read_capture(other, tmp_path)
    assert cap.end["how"] == "quit" and cap.warnings == []
    assert cap.client == bytes(by.client.sent) and cap.server == bytes(by.client.received)


@contextlib.contextmanager
def tiny_disk(path: Path, size: str = "1m") -> Iterator[Path]:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_disk_full_mid_session_then_new_sessions_refused(tmp_path: Path) -> None:
    body = body_of(24 * MB)  # more than the disk may lag behind (UNRECORDED_BUDGET)
    server = FaultServer(partial(standard, messages={1: body}))
    with tiny_disk(tmp_path / "disk") as disk, trio.fail_after(STEP):
        (disk / "filler").write_bytes(b"\0" * 256 * 1024)  # freed later: space returns
        async with harness(tmp_path, server, out=disk, check_fds=False) as h:
            client = await h.client()
            await client.line()
            await client.send(b"RETR 1\r\n")
            got = await client.to_eof()
            await client.aclose()
            while not h.view.ended:
                await trio.sleep(0.01)
            late = await h.client()  # the disk is full now: no capture, no session
            refused = await late.to_eof()
            await late.aclose()
            (disk / "filler").unlink()
            again = await h.client()  # space is back: sessions are accepted again
            greeting = await again.line()
            await again.aclose()
        ((number, (how, error)), *_) = h.view.ended.items()
        assert how == "capture-error", (how, error)
        assert error.startswith("capture write failed: disk full; up to "), error
        assert error.endswith(f"relayed unrecorded (the bound is {UNRECORDED_BUDGET:,})")
        assert len(got) < len(body) // 2
        assert refused == b"-ERR [SYS/TEMP] popproxy cannot record this session: disk full\r\n"
        assert greeting.startswith(b"+OK")
        ((_, reason),) = h.view.failed
        assert reason.startswith(f"cannot create a capture file in {disk}"), reason
        assert reason.endswith("No space left on device"), reason
        assert len(server.peers) == 2  # the refused client never reached the upstream
        matches = [p for p in disk.glob("*.popcap") if p.name.endswith(f"-{number:05d}.popcap")]
        assert len(matches) == 1, list(disk.iterdir())
        records, _ = read_back(matches[0])
        server_rec = recorded(records, "s")
        assert got.startswith(server_rec)
        unrecorded = len(got) - len(server_rec)
        print(f"disk full: {unrecorded} octets relayed unrecorded (bound {UNRECORDED_BUDGET})")
        assert unrecorded <= UNRECORDED_BUDGET


async def test_refused_session_leaks_nothing(tmp_path: Path) -> None:
    server = FaultServer()
    with tiny_disk(tmp_path / "disk", "4k") as disk, trio.fail_after(STEP):
        (disk / "filler").write_bytes(b"\0" * 4096)  # the disk is full from the start
        async with harness(tmp_path, server, out=disk, check_fds=False) as h:
            before = open_files()
            client = await h.client()
            refused = await client.to_eof()
            await client.aclose()
            while not h.view.failed:
                await trio.sleep(0.01)
            assert refused == b"-ERR [SYS/TEMP] popproxy cannot record this session: disk full\r\n"
            leaked = sorted(set(open_files().items()) - set(before.items()))
        leftovers = list(disk.glob("*.popcap"))
    assert (leaked, leftovers) == ([], [])


@pytest.mark.slow
async def test_proxy_killed_mid_retr(tmp_path: Path) -> None:
    body = body_of(40 * MB)
    server = FaultServer(partial(standard, messages={1: body}))
    out = tmp_path / "captures"
    out.mkdir()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        with trio.fail_after(STEP):
            async with recorder_process(port, out) as proxy:
                client = await RawClient.connect(proxy.addr)
                await client.line()
                await client.send(b"RETR 1\r\n")
                await client.until(4 * MB)
                (path,) = out.glob("*.popcap")
                while path.stat().st_size < 2 * MB:
                    await trio.sleep(0.005)
                proxy.proc.kill()
                got = await client.to_eof()
                await client.aclose()
                await server.peers[0].closed.wait()
        nursery.cancel_scope.cancel()
    assert proxy.proc.returncode == -signal.SIGKILL
    records, warnings = read_back(path)  # no exception
    assert records and records[-1].kind != fmt.END
    server_rec = recorded(records, "s")
    assert len(server_rec) > MB and got.startswith(server_rec)
    with CaptureReader(path) as reader:
        doc = capture_json(reader)
    (retr,) = [ex for ex in doc["exchanges"] if ex["command"] == "RETR"]
    assert retr["truncated"] is True and doc["session"]["end"] is None
    show = await trio.run_process(
        [sys.executable, "-m", "popproxy", "show", str(path)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    stderr = show.stderr.decode()
    assert show.returncode == 0 and "Traceback" not in stderr
    print(f"killed at {path.stat().st_size} octets of capture; reader warnings: {warnings}")
    # Killed mid-write, the last record is torn and said so; killed between writes (the
    # usual case), the file ends cleanly and nothing warns: see the test below.
    assert [f"popproxy show: warning: {w}" for w in warnings] == stderr.splitlines()


async def test_capture_cut_between_records_warns(tmp_path: Path) -> None:
    writer = CaptureWriter(
        {"session": 1, "client": "127.0.0.1:5", "upstream": "x:110"}, keep_secrets=True
    )
    tap = Tap(writer, None)
    tap.data(Direction.SERVER, 0.01, GREETING)
    tap.data(Direction.CLIENT, 0.02, b"RETR 1\r\n")
    tap.data(Direction.SERVER, 0.03, b"+OK 100 octets\r\nSubject: cut\r\n\r\nhalf a bo")
    writer.flush_all()
    path = tmp_path / "cut.popcap"
    fd = create_capture_file(path)
    fmt.write_all(fd, writer.take())  # what a proxy killed after this flush leaves behind
    os.close(fd)
    records, warnings = read_back(path)
    assert records[-1].kind == fmt.DATA
    show = await trio.run_process(
        [sys.executable, "-m", "popproxy", "show", str(path)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert show.returncode == 0
    assert warnings and "warning" in show.stderr.decode()


# --------------------------------------------------------------------------- load


async def test_1000_sessions_leave_nothing_behind(tmp_path: Path) -> None:
    sessions, concurrency = 1000, 100
    server = FaultServer()
    limiter = trio.CapacityLimiter(concurrency)

    async def one(h: Harness) -> None:
        async with limiter:
            by = await h.bystander()
            await by.finish()

    with trio.fail_after(40):
        async with harness(tmp_path, server) as h:
            fds, tasks = fd_count(), task_count()
            t0 = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(sessions):
                    nursery.start_soon(one, h)
            while len(h.view.ended) < sessions or not all(p.closed.is_set() for p in server.peers):
                await trio.sleep(0.02)
            elapsed = trio.current_time() - t0
            fds_after, tasks_after = fd_count(), task_count()
    print(f"{sessions} sessions, {concurrency} at a time: {elapsed:.1f} s")
    assert fds_after <= fds + 2 and tasks_after <= tasks + 2, (fds, fds_after, tasks, tasks_after)
    assert set(h.view.ended.values()) == {("quit", None)}
    paths = list(h.out.glob("*.popcap"))
    assert len(paths) == sessions
    for path in paths:
        with CaptureReader(path) as reader:
            end = reader.end()
        assert end is not None and end["how"] == "quit" and end["commands"] == 4


# --------------------------------------------------------------------------- segmentation

FIXTURES = Path(__file__).parent / "fixtures"
SESSIONS = {
    p.stem: [(c["dir"], base64.b64decode(c["b64"])) for c in json.loads(p.read_text())["chunks"]]
    for p in sorted(FIXTURES.glob("*.json"))
}


def resplit(data: bytes, rng: random.Random | None) -> list[bytes]:
    """``data`` cut at random points (one piece without ``rng``)."""
    if rng is None or len(data) < 2:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(1, 8))))
    if rng.random() < 0.2:
        cuts = list(range(1, min(len(data), 40))) + [c for c in cuts if c >= 40]  # bytewise
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


async def drive_session(
    chunks: list[tuple[str, bytes]], out: Path, seed: int | None
) -> tuple[bytes, bytes, Path]:
    """One recorded session through ``Session`` over in-memory streams, re-split by ``seed``.

    Each side sends its chunks in the recorded order, waiting first for every byte the other
    side had sent before that chunk.  Returns what the client and the server received.
    """
    client_end, proxy_client = trio.testing.memory_stream_pair()
    proxy_upstream, server_end = trio.testing.memory_stream_pair()

    async def connect() -> trio.abc.Stream:
        return proxy_upstream

    config = ProxyConfig(
        upstream=("fixture.example", 110), out_dir=out, keep_secrets=True, linger=0.05
    )
    session = Session(config, proxy_client, None, connect=connect)
    got = {"c": bytearray(), "s": bytearray()}  # what the client / the server received
    arrived = {"c": trio.Event(), "s": trio.Event()}

    def rng(k: int) -> random.Random | None:  # one per task: each is reproducible by itself
        return None if seed is None else random.Random(seed * 4 + k)

    async def side(me: str, stream: trio.abc.Stream, k: int) -> None:
        reads, writes = rng(k), rng(k + 1)

        async def reader() -> None:
            while data := await stream.receive_some(reads.randrange(1, 4096) if reads else MB):
                got[me] += data
                arrived[me].set()
                arrived[me] = trio.Event()
            arrived[me].set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            seen = 0  # the other side's octets sent before this chunk
            for direction, data in chunks:
                if direction != me:
                    seen += len(data)
                    continue
                while len(got[me]) < seen:
                    await arrived[me].wait()
                for piece in resplit(data, writes):
                    await stream.send_all(piece)
                    for _ in range(writes.randrange(3) if writes else 0):
                        await trio.lowlevel.checkpoint()
            if me == "s":
                await stream.send_eof()  # type: ignore[attr-defined]  # after QUIT's reply
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            nursery.start_soon(side, "c", client_end, 0)
            nursery.start_soon(side, "s", server_end, 2)
    assert session.path is not None
    return bytes(got["c"]), bytes(got["s"]), session.path


def transcript(cap: Capture) -> dict[str, object]:
    """The capture's transcript without timings."""

    def untimed(items: list[dict[str, object]]) -> list[dict[str, object]]:
        return [{k: v for k, v in x.items() if not k.startswith("t")} for x in items]

    return {
        "exchanges": untimed(cap.doc["exchanges"]),
        "anomalies": untimed(cap.doc["anomalies"]),
        "end": {k: v for k, v in cap.end.items() if k != "t"},
    }


_BASELINES: dict[str, dict[str, object]] = {}


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(name=st.sampled_from(sorted(SESSIONS)), seed=st.integers(0, 2**32))
async def test_random_segmentation_changes_nothing(
    tmp_path_factory: pytest.TempPathFactory, name: str, seed: int
) -> None:
    chunks = SESSIONS[name]
    sent = {d: b"".join(data for dd, data in chunks if dd == d) for d in ("c", "s")}
    work = tmp_path_factory.mktemp("seg")
    if name not in _BASELINES:
        _, _, path = await drive_session(chunks, work, None)
        _BASELINES[name] = transcript(read_capture(path, work))
        assert _BASELINES[name]["exchanges"]
    at_client, at_server, path = await drive_session(chunks, work, seed)
    assert at_client == sent["s"] and at_server == sent["c"]
    cap = read_capture(path, work)
    assert cap.client == sent["c"] and cap.server == sent["s"]
    assert transcript(cap) == _BASELINES[name]
    assert cap.end["how"] == "quit" and cap.end["observer_error"] is None


@pytest.mark.slow
async def test_out_of_descriptors_is_reported_once_and_service_resumes(tmp_path: Path) -> None:
    """RLIMIT_NOFILE 64 and 80 clients at once: no traceback per accept retry, refused
    clients are told the real cause, and once descriptors are free clients are served
    (the clients that gave up still wait in the listen queue: each becomes a session that
    lingers for the server before its descriptors are free again)."""
    server = FaultServer()
    out = tmp_path / "captures"
    out.mkdir()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        with trio.fail_after(STEP * 3):
            async with recorder_process(port, out, nofile=64) as proxy:
                clients = []
                for _ in range(80):
                    with contextlib.suppress(OSError):
                        clients.append(await RawClient.connect(proxy.addr))
                firsts: list[bytes] = []

                async def first_line(client: RawClient) -> None:
                    firsts.append(await client.line())

                with trio.move_on_after(3):  # accept keeps failing meanwhile
                    async with trio.open_nursery() as readers:
                        for client in clients:
                            readers.start_soon(first_line, client)
                for client in clients:
                    await client.aclose()
                greeting = b""
                with trio.move_on_after(30):  # the proxy frees descriptors as sessions end
                    while not greeting.startswith(b"+OK"):
                        late = await RawClient.connect(proxy.addr)
                        greeting = await late.line()
                        await late.send(b"QUIT\r\n")
                        await late.to_eof()
                        await late.aclose()
                        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    stdout, stderr = proxy.stdout.decode(), proxy.stderr.decode()
    assert "Traceback" not in stdout + stderr
    reports = [x for x in (stdout + stderr).splitlines() if "cannot accept new clients" in x]
    assert 1 <= len(reports) <= 2, reports
    assert "Too many open files" in reports[0]
    refused = [f for f in firsts if f.startswith(b"-ERR")]
    for line in refused:
        assert line.startswith(b"-ERR [SYS/TEMP] ") and b"Too many open files" in line, line
    assert greeting.startswith(b"+OK"), (greeting, stdout[-2000:], stderr[-2000:])


@pytest.mark.parametrize("streams", ["stdout", "both"])
async def test_sigint_ends_within_2s_with_stdout_a_blocked_pipe(
    tmp_path: Path, streams: str
) -> None:
    """Nobody reads the proxy's stdout (and stderr): the view blocks, the relay does not,
    and SIGINT still finishes every capture within 2 s."""
    server = FaultServer()
    out = tmp_path / "captures"
    out.mkdir()
    r, w = os.pipe()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        argv = [sys.executable, "-m", "popproxy", "record", "--upstream", f"127.0.0.1:{port}"]
        argv += ["--listen", "127.0.0.1:0", "--out", str(out), "--no-check", "--verbose"]
        stderr = w if streams == "both" else subprocess.DEVNULL
        proc = await trio.lowlevel.open_process(argv, stdout=w, stderr=stderr, cwd=ROOT)
        os.close(w)
        line = b""
        while not line.endswith(b"\n"):
            line += os.read(r, 1)  # "listening on HOST:PORT", then never read again
        addr = ("127.0.0.1", int(line.decode().strip().rsplit(":", 1)[1]))
        clients = [await RawClient.connect(addr) for _ in range(20)]
        for _ in range(100):  # far more display lines than a pipe holds
            for client in clients:
                await client.send(b"NOOP\r\n")
        await trio.sleep(1.5)
        t0 = trio.current_time()
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            await proc.wait()
        elapsed = trio.current_time() - t0
        for client in clients:
            await client.aclose()
        nursery.cancel_scope.cancel()
    os.close(r)
    assert proc.returncode == 0
    assert elapsed < 2.0, f"{elapsed:.2f} s"
    paths = list(out.glob("*.popcap"))
    assert len(paths) == 20
    for path in paths:
        with CaptureReader(path) as reader:
            end = reader.end()
        assert end is not None and end["how"] == "proxy-shutdown"
