"""The tap beside the relay: an observer failure spoils the transcript, never the redaction."""

from __future__ import annotations

import base64
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from popproxy.capture import format as fmt
from popproxy.capture.reader import CaptureReader
from popproxy.capture.writer import CaptureWriter
from popproxy.core import Direction, Observer
from popproxy.proxy.config import ProxyConfig
from popproxy.proxy.session import Session
from popproxy.proxy.tap import Tap

C, S = Direction.CLIENT, Direction.SERVER
TOKEN = base64.b64encode(b"\x00alice\x00very-secret-pw")


def test_an_observer_crash_redacts_every_client_byte_not_yet_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writer = CaptureWriter({}, keep_secrets=False)
    tap = Tap(writer, None)
    tap.data(S, 0.0, b"+OK ready\r\n")
    tap.data(C, 0.1, b"AUTH PLAIN\r\n")
    tap.data(C, 0.2, TOKEN + b"\r\n")  # sent before the challenge: held by the observer

    def broken(self: Observer, direction: Direction, data: bytes) -> list[object]:
        raise RuntimeError("observer bug")

    monkeypatch.setattr(Observer, "receive_data", broken)
    tap.data(S, 0.3, b"+ \r\n")
    tap.data(S, 0.4, b"+OK logged in\r\n")
    writer.flush_all()
    out = b"".join(writer.take())
    assert tap.broken is not None and b"observer-error" in out
    assert TOKEN not in out and b"very-secret" not in out
    assert b"AUTH PLAIN\r\n" in out  # already on disk before the crash: left as it was


async def test_a_reset_during_upstream_stls_ends_only_that_session(tmp_path: Path) -> None:
    """``--upstream-stls``: the upstream greets, then resets before answering STLS."""
    client_end, proxy_client = trio.testing.memory_stream_pair()
    proxy_upstream, server_end = trio.testing.memory_stream_pair()

    async def connect() -> trio.abc.Stream:
        return proxy_upstream

    async def server() -> None:
        await server_end.send_all(b"+OK ready\r\n")
        await server_end.aclose()  # gone: popproxy's own STLS meets a broken stream

    config = ProxyConfig(
        upstream=("pop.example", 110),
        out_dir=tmp_path,
        upstream_stls=True,
        connect_timeout=2,
        linger=0.1,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            nursery.start_soon(partial(Session(config, proxy_client, None, connect=connect).run))
            received = b""
            while chunk := await client_end.receive_some():
                received += chunk
    assert received.startswith(b"+OK ready\r\n")
    assert b"-ERR [SYS/TEMP] popproxy:" in received
    (path,) = tmp_path.glob(f"*{fmt.SUFFIX}")
    with CaptureReader(path) as reader:
        end = reader.end()
    assert end is not None and end["how"] == "upstream-error"
