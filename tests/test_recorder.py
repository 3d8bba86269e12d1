"""The recorder: the shared ticker, a session's own writer, write failures, letting go."""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import pytest
import trio
import trio.testing

from popproxy.capture.recorder import FLUSH_INTERVAL, FLUSH_SIZE, Recorder
from popproxy.core import Direction
from popproxy.proxy.config import ProxyConfig
from popproxy.proxy.session import Session

S = Direction.SERVER
HEADER = {"session": 1, "upstream": "h:110"}


def records(path: Path) -> bytes:
    return path.read_bytes()


def add(recorder: Recorder, data: bytes, t: float = 0.5) -> None:
    """A chunk released at once (as the tap does once the observer settled it)."""
    recorder.writer.data(S, t, data)
    recorder.writer.advance(1 << 62, 1 << 62)
    recorder.changed()


async def test_small_batches_reach_the_file_within_the_flush_interval(tmp_path: Path) -> None:
    recorder = Recorder.create(tmp_path / "a.popcap", HEADER, keep_secrets=False)
    async with trio.open_nursery() as nursery:
        recorder.start(nursery, pytest.fail)
        add(recorder, b"+OK hello\r\n")
        assert b"+OK hello" not in records(recorder.path)  # gathered first...
        await trio.sleep(FLUSH_INTERVAL * 2)
        assert b"+OK hello\r\n" in records(recorder.path)  # ...and written by the ticker
        assert not recorder._writing  # no task of its own for small batches
        nursery.cancel_scope.cancel()
    recorder.close()


async def test_large_batches_get_a_writer_of_their_own(tmp_path: Path) -> None:
    recorder = Recorder.create(tmp_path / "a.popcap", HEADER, keep_secrets=False)
    big = b"x" * 78 + b"\r\n"
    async with trio.open_nursery() as nursery:
        recorder.start(nursery, pytest.fail)
        add(recorder, big * (FLUSH_SIZE // len(big) + 1))
        assert recorder._writing
        while recorder.unwritten:
            await recorder.wait_for_room()
            await trio.sleep(0.01)
        assert records(recorder.path).count(big) == FLUSH_SIZE // len(big) + 1
        nursery.cancel_scope.cancel()
    recorder.close()


async def test_a_write_failure_stops_the_session_with_the_reason(tmp_path: Path) -> None:
    recorder = Recorder.create(tmp_path / "a.popcap", HEADER, keep_secrets=False)
    os.close(recorder._fd or -1)
    recorder._fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    failed: list[str] = []
    async with trio.open_nursery() as nursery:
        recorder.start(nursery, failed.append)
        add(recorder, b"+OK hello\r\n")
        await trio.sleep(FLUSH_INTERVAL * 2)
        nursery.cancel_scope.cancel()
    assert failed == ["capture write failed: disk full"]
    assert recorder.room() > 0 and recorder.error == failed[0]
    assert recorder.lost > 0
    recorder.close()


async def test_a_finished_session_is_freed_without_the_garbage_collector(tmp_path: Path) -> None:
    """No reference cycle keeps a session (its tap, builder, recorder) alive once it ended:
    with a thousand sessions, the collector's passes over them cost more than the relay."""
    client_end, proxy_client = trio.testing.memory_stream_pair()
    upstream_end, proxy_upstream = trio.testing.memory_stream_pair()

    async def connect() -> trio.abc.Stream:
        return proxy_upstream

    async def upstream() -> None:
        await upstream_end.send_all(b"+OK ready\r\n")
        assert await upstream_end.receive_some(100) == b"QUIT\r\n"
        await upstream_end.send_all(b"+OK bye\r\n")
        await upstream_end.aclose()

    config = ProxyConfig(upstream=("192.0.2.1", 110), out_dir=tmp_path, linger=0.2)
    session = Session(config, proxy_client, None, connect=connect)
    freed = weakref.ref(session)
    gc.disable()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream)
            nursery.start_soon(session.run)
            assert await client_end.receive_some(100) == b"+OK ready\r\n"
            await client_end.send_all(b"QUIT\r\n")
            assert await client_end.receive_some(100) == b"+OK bye\r\n"
            await client_end.aclose()
        await trio.sleep(FLUSH_INTERVAL * 2)  # the shared ticker lets go of its recorder
        del session
        assert freed() is None
    finally:
        gc.enable()
