"""record --hide-plus: SASL -PLUS mechanisms hidden from CAPA and AUTH listings, as drops."""

from __future__ import annotations

import functools
import socket
from pathlib import Path

import trio

from popproxy.capture.reader import CaptureReader
from popproxy.proxy.config import ProxyConfig
from popproxy.proxy.controller import Drop
from popproxy.proxy.server import serve_record
from tests.support.faults import wait_ended
from tests.support.scripted import ScriptedServer

SASL = b"SASL PLAIN SCRAM-SHA-1 SCRAM-SHA-1-PLUS SCRAM-SHA-256\tSCRAM-SHA-256-PLUS"
CAPA = b"+OK\r\nTOP\r\nUIDL\r\n" + SASL + b"\r\nX-NOT-A-PLUS\r\n.\r\n"
AUTH_LIST = b"+OK\r\nPLAIN\r\nSCRAM-SHA-256-PLUS\r\nSCRAM-SHA-256\r\n.\r\n"


def answer(line: bytes) -> bytes | None:
    verb = line.strip().upper()
    if verb == b"CAPA":
        return CAPA
    if verb == b"AUTH":
        return AUTH_LIST
    return None if verb == b"QUIT" else b"+OK\r\n"


def talk(port: int) -> list[bytes]:
    """CAPA and a bare AUTH over a raw socket: exactly the bytes the client received."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rwb")
        got = [f.readline()]
        for command, end in ((b"CAPA", b".\r\n"), (b"AUTH", b".\r\n")):
            f.write(command + b"\r\n")
            f.flush()
            block = b""
            while not block.endswith(b"\r\n" + end):
                line = f.readline()
                assert line, block
                block += line
            got.append(block)
        f.write(b"QUIT\r\n")
        f.flush()
        got.append(f.readline())
        return got


async def run(tmp_path: Path, hide: bool) -> tuple[list[bytes], Path]:
    server = ScriptedServer(answer=answer)
    out = tmp_path / "captures"
    out.mkdir()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        config = ProxyConfig(
            upstream=("127.0.0.1", port),
            listen=("127.0.0.1", 0),
            out_dir=out,
            linger=0.2,
            hide_plus=hide,
        )
        addrs = await nursery.start(functools.partial(serve_record, config, None, announce=False))
        with trio.fail_after(20):
            got = await trio.to_thread.run_sync(talk, addrs[0][1])
            (path,) = await wait_ended(out, 1)
        nursery.cancel_scope.cancel()
    return got, path


async def test_hide_plus_drops_plus_mechanisms_only(tmp_path: Path) -> None:
    got, path = await run(tmp_path, hide=True)
    assert got[1] == (
        b"+OK\r\nTOP\r\nUIDL\r\nSASL PLAIN SCRAM-SHA-1 SCRAM-SHA-256\r\nX-NOT-A-PLUS\r\n.\r\n"
    )
    assert got[2] == b"+OK\r\nPLAIN\r\nSCRAM-SHA-256\r\n.\r\n"
    with CaptureReader(path) as reader:
        header = reader.header
        records = list(reader.records())
    assert header.get("hide_plus") is True
    drops = [r.fields for r in records if r.kind == "drop"]
    assert [d["len"] for d in drops] == [
        len(b" SCRAM-SHA-1-PLUS"),
        len(b"\tSCRAM-SHA-256-PLUS"),
        len(b"SCRAM-SHA-256-PLUS\r\n"),
    ]
    assert all(d["d"] == "s" and "--hide-plus" in d["why"] for d in drops)
    # The capture keeps what the server sent; minus the drops it is what the client got.
    server = b"".join(r.data or b"" for r in records if r.kind == "d" and r.fields["d"] == "s")
    assert CAPA in server and AUTH_LIST in server
    kept = bytearray(server)
    for d in sorted(drops, key=lambda d: -d["off"]):
        del kept[d["off"] : d["off"] + d["len"]]
    assert bytes(kept) == b"".join(got)


async def test_without_hide_plus_nothing_changes(tmp_path: Path) -> None:
    got, _ = await run(tmp_path, hide=False)
    assert got[1] == CAPA and got[2] == AUTH_LIST


def test_plus_spans_in_capa_and_auth_listings_only() -> None:
    from tests.test_controller import Case, bytewise, play, whole

    steps = [
        ("s", b"+OK hi\r\n"),
        ("c", b"CAPA\r\nAUTH\r\nLIST\r\n"),
        ("s", CAPA + AUTH_LIST + b"+OK\r\nX-PLUS\r\n.\r\n"),
    ]
    stream = b"+OK hi\r\n" + CAPA + AUTH_LIST
    for split in (whole, bytewise):
        run = play(Case("hide-plus", steps, [], hide_plus=True), split)
        drops = [c for c in run.out if isinstance(c, Drop)]
        assert [stream[d.offset : d.offset + d.length] for d in drops] == [
            b" SCRAM-SHA-1-PLUS",
            b"\tSCRAM-SHA-256-PLUS",
            b"SCRAM-SHA-256-PLUS\r\n",
        ]
        assert {d.why for d in drops} == {"-PLUS mechanism hidden by popproxy (--hide-plus)"}
