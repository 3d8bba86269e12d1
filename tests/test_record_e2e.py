"""The recording proxy end to end: real clients and Dovecot, a scripted server, and faults.

Each proxy runs in-process (``serve_record`` in the test's nursery on 127.0.0.1:0).  A
``TeeRelay`` between the proxy and the server logs exactly what crossed that leg, so the
capture can be compared with the truth byte for byte.
"""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy.capture import format as fmt
from popproxy.capture.format import CaptureError
from popproxy.capture.reader import CaptureReader
from popproxy.inspect.document import capture_json
from popproxy.inspect.streams import export_streams
from popproxy.proxy.config import ProxyConfig
from popproxy.proxy.server import serve_record
from popproxy.proxy.view import SessionView
from popproxy.views.live import LiveView
from popproxy.views.theme import make_console
from tests.support import clients
from tests.support.dovecot import STANDARD_MESSAGES, USERS, DovecotServer, free_port
from tests.support.scripted import ScriptedServer, TeeRelay, default_answer

ALICE = "alice"
PASSWORD = USERS[ALICE]
STEP = 20.0  # generous per-step limit: a stuck proxy fails instead of hanging


# --------------------------------------------------------------------------- helpers


@asynccontextmanager
async def running_proxy(
    config: ProxyConfig, view: SessionView | None = None
) -> AsyncIterator[tuple[str, int]]:
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(partial(serve_record, announce=False), config, view)
        yield addrs[0]
        nursery.cancel_scope.cancel()


async def finished_captures(out: Path, count: int = 1, timeout: float = 10.0) -> list[Path]:
    """Wait until ``count`` captures in ``out`` have their end record."""
    with trio.fail_after(timeout):
        while True:
            paths = sorted(out.glob(f"*{fmt.SUFFIX}"))
            if len(paths) >= count:
                ends = []
                for path in paths:
                    try:
                        with CaptureReader(path) as reader:
                            ends.append(reader.end())
                    except CaptureError:  # created, header not written yet
                        ends.append(None)
                if all(e is not None for e in ends):
                    return paths
            await trio.sleep(0.02)


def read_json(path: Path) -> dict[str, Any]:
    with CaptureReader(path) as reader:
        return capture_json(reader)


def exported(path: Path, tmp: Path) -> tuple[bytes, bytes]:
    out = tmp / f"export-{path.stem}"
    with CaptureReader(path) as reader:
        export_streams(reader, out)
    return (out / "client.bin").read_bytes(), (out / "server.bin").read_bytes()


def b64_alignments(secret: bytes) -> list[bytes]:
    """The base64 of ``secret`` as it appears after 0, 1 or 2 other bytes: full groups only."""
    found = []
    for k in range(3):
        encoded = base64.b64encode(b"\0" * k + secret)
        total = k + len(secret)
        groups = [
            encoded[4 * i : 4 * i + 4]
            for i in range(len(encoded) // 4)
            if 3 * i >= k and 3 * i + 3 <= total
        ]
        if groups:
            found.append(b"".join(groups))
    return found


def sasl_response_lines(client_stream: bytes) -> list[bytes]:
    """Client lines inside AUTH exchanges (initial responses and continuation answers)."""
    verbs = {
        b"USER",
        b"PASS",
        b"APOP",
        b"AUTH",
        b"STLS",
        b"CAPA",
        b"QUIT",
        b"STAT",
        b"LIST",
        b"RETR",
        b"DELE",
        b"NOOP",
        b"RSET",
        b"TOP",
        b"UIDL",
        b"LAST",
    }
    out: list[bytes] = []
    in_auth = False
    for line in client_stream.split(b"\r\n"):
        words = line.split()
        verb = words[0].upper() if words else b""
        if verb == b"AUTH":
            in_auth = True
            if len(words) > 2:
                out.append(words[2])
            continue
        if verb in verbs:
            in_auth = False
        elif in_auth and line and line != b"*":
            out.append(line)
    return out


def assert_no_secret(raw: bytes, password: str, blobs: list[bytes]) -> None:
    pw = password.encode()
    assert pw not in raw, "the password is in the capture"
    for enc in b64_alignments(pw):
        assert enc not in raw, f"base64 of the password ({enc!r}) is in the capture"
    for blob in blobs:
        if len(blob) >= 8:
            assert blob not in raw, f"the SASL blob {blob!r} is in the capture"


def masked_equal(recorded: bytes, truth: bytes) -> None:
    """``recorded`` is ``truth`` with some spans replaced by '#' (same length, same offsets)."""
    assert len(recorded) == len(truth)
    diff = [i for i, (a, b) in enumerate(zip(recorded, truth, strict=True)) if a != b]
    assert all(recorded[i] == ord("#") for i in diff)


def verbs_of(doc: dict[str, Any]) -> list[str | None]:
    return [ex["command"] for ex in doc["exchanges"] if ex["kind"] == "command"]


# --------------------------------------------------------------------------- real clients


def _poplib(apop: bool) -> Callable[[str, int, Path], Any]:
    def run(host: str, port: int, work: Path) -> Any:
        result = clients.poplib_session(host, port, ALICE, PASSWORD, apop=apop)
        result.pop("welcome")  # Dovecot's APOP timestamp differs per connection
        return result

    return run


def _curl(mech: str) -> Callable[[str, int, Path], Any]:
    def run(host: str, port: int, work: Path) -> Any:
        return clients.curl_fetch(host, port, ALICE, PASSWORD, mech=mech, msg=2)  # type: ignore[arg-type]

    return run


def _fetchmail(host: str, port: int, work: Path) -> Any:
    return clients.fetchmail_fetch(host, port, ALICE, PASSWORD, workdir=work / f"fm-{port}")


def _getmail(host: str, port: int, work: Path) -> Any:
    return clients.getmail_fetch(host, port, ALICE, PASSWORD, workdir=work / f"gm-{port}")


CLIENTS: dict[str, tuple[Callable[[str, int, Path], Any], str | None]] = {
    # name: (runner, SASL mechanism or None)
    "poplib-user-pass": (_poplib(False), None),
    "poplib-apop": (_poplib(True), None),
    "curl-plain": (_curl("PLAIN"), "PLAIN"),
    "curl-login": (_curl("LOGIN"), "LOGIN"),
    "curl-cram-md5": (_curl("CRAM-MD5"), "CRAM-MD5"),
    "fetchmail": (_fetchmail, None),
    "getmail": (_getmail, None),
}

CASES = [pytest.param(name, False, id=name) for name in CLIENTS] + [
    pytest.param("poplib-user-pass", True, id="poplib-user-pass-keep-secrets"),
    pytest.param("curl-plain", True, id="curl-plain-keep-secrets"),
    pytest.param("curl-login", True, id="curl-login-keep-secrets"),
]


@pytest.mark.dovecot
@pytest.mark.parametrize(("name", "keep"), CASES)
async def test_real_client_through_proxy(
    dovecot_clean: DovecotServer, tmp_path: Path, name: str, keep: bool
) -> None:
    run, mech = CLIENTS[name]
    dovecot = dovecot_clean
    with trio.fail_after(STEP):
        direct = await trio.to_thread.run_sync(run, dovecot.host, dovecot.port, tmp_path)
    out = tmp_path / "captures"
    out.mkdir()
    tee = TeeRelay((dovecot.host, dovecot.port))
    async with trio.open_nursery() as nursery:
        tee_port = await nursery.start(tee.serve)
        config = ProxyConfig(
            upstream=("127.0.0.1", tee_port),
            listen=("127.0.0.1", 0),
            out_dir=out,
            keep_secrets=keep,
        )
        async with running_proxy(config) as (host, port):
            with trio.fail_after(STEP):
                proxied = await trio.to_thread.run_sync(run, host, port, tmp_path)
                (path,) = await finished_captures(out)
                await tee.connections[0].closed.wait()
        nursery.cancel_scope.cancel()

    assert proxied == direct

    # The capture file: private, well-formed, and what the client and server did.
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = read_json(path)
    json.dumps(doc)  # the document is plain JSON
    assert doc["session"]["end"]["how"] == "quit"
    assert doc["session"]["warnings"] == []
    assert doc["session"]["user"] == ALICE
    verbs = verbs_of(doc)
    assert verbs[-1] == "QUIT"
    assert all(ex["status"] == "+OK" for ex in doc["exchanges"]), doc["exchanges"]
    retr = [ex for ex in doc["exchanges"] if ex["command"] == "RETR"]
    if name.startswith("curl"):
        assert verbs.count("RETR") == 1 and retr[0]["body_octets"] == len(STANDARD_MESSAGES[1])
    else:
        assert verbs.count("RETR") == len(STANDARD_MESSAGES)
        assert [ex["body_octets"] for ex in retr] == [len(m) for m in STANDARD_MESSAGES]
        assert all(ex["message"]["from"] for ex in retr)
    if name == "poplib-user-pass":
        assert verbs == ["CAPA", "USER", "PASS", "STAT", "LIST", "UIDL", "TOP"] + ["RETR"] * 4 + [
            "QUIT"
        ]
    if name == "poplib-apop":
        assert "APOP" in verbs and "PASS" not in verbs
    if mech is not None:
        assert "AUTH" in verbs
        assert doc["session"]["mechanism"] == mech
        assert doc["session"]["end"]["mechanism"] == mech
        auth = next(ex for ex in doc["exchanges"] if ex["command"] == "AUTH")
        assert auth["args"].split()[0].upper() == mech

    # What crossed the wire (the tee) against what the capture holds.
    truth_c, truth_s = bytes(tee.connections[0].received), bytes(tee.connections[0].sent)
    rec_c, rec_s = exported(path, tmp_path)
    assert rec_s == truth_s
    raw = path.read_bytes()
    blobs = sasl_response_lines(truth_c)
    if mech in ("PLAIN", "LOGIN"):
        assert blobs, "the tee saw no SASL response: the secret check would be vacuous"
    if keep:
        assert rec_c == truth_c
    else:
        masked_equal(rec_c, truth_c)
        assert_no_secret(raw, PASSWORD, blobs)
        assert_no_secret(rec_c, PASSWORD, blobs)
        if "PASS" in verbs:
            assert PASSWORD.encode() in truth_c  # the check above was not vacuous


# --------------------------------------------------------------------------- byte-exactness


def _junk(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(n))


def _recv_all(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _raw_client(
    port: int, pieces: list[bytes], *, close_write: bool = True, timeout: float = 10.0
) -> bytes:
    """Send ``pieces`` (each with its own send), half-close, read until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        received = bytearray()
        sock.setblocking(True)
        reader = threading.Thread(target=lambda: received.extend(_recv_all(sock)))
        reader.start()
        for piece in pieces:
            sock.sendall(piece)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        reader.join(timeout)
        assert not reader.is_alive(), "the proxy never closed the client connection"
        return bytes(received)


def _big_body(rng: random.Random) -> bytes:
    lines = []
    size = 0
    while size < 100_000:
        kind = rng.randrange(5)
        if kind == 0:
            line = b"." * rng.randrange(1, 4)
        elif kind == 1:
            line = b"." + bytes(rng.choice(b"abc. \t") for _ in range(rng.randrange(80)))
        else:
            line = bytes(rng.randrange(32, 127) for _ in range(rng.randrange(200)))
        lines.append(line + b"\r\n")
        size += len(line) + 2
    return b"".join(lines)


@pytest.mark.parametrize("keep", [True, False], ids=["keep-secrets", "redacted"])
async def test_byte_exact_against_scripted_server(tmp_path: Path, keep: bool) -> None:
    rng = random.Random(1939)
    body = _big_body(rng)
    small = b".\r\n..\r\n\r\n"
    server = ScriptedServer(answer=default_answer({1: body, 2: small}))
    pieces = [
        b"CAPA\r\nUSER bob\r\nPASS hunter2-secret\r\n",  # pipelined
        b"NOOP\n",  # bare LF
        b"RETR 1\r\nLIST\r\nRETR 2\r\n",
        _junk(rng, 300).replace(b"\n", b"") + b"\r\n",  # binary junk as one line
        b"no\rline\rend\r",  # bare CRs
        b"\x00\xff" * 50 + b"\n",
        b"RETR 1\r\nSTAT\r\n",
        b"QUIT\r\n",
    ]
    out = tmp_path / "captures"
    out.mkdir()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        config = ProxyConfig(
            upstream=("127.0.0.1", port), listen=("127.0.0.1", 0), out_dir=out, keep_secrets=keep
        )
        async with running_proxy(config) as (_, pport):
            with trio.fail_after(STEP):
                got = await trio.to_thread.run_sync(_raw_client, pport, pieces)
                (path,) = await finished_captures(out)
                await server.connections[0].closed.wait()
        nursery.cancel_scope.cancel()
    conn = server.connections[0]
    sent_by_client = b"".join(pieces)
    assert bytes(conn.received) == sent_by_client
    assert got == bytes(conn.sent)
    assert body.replace(b"\r\n.", b"\r\n..") in got  # dot-stuffing went through untouched
    rec_c, rec_s = exported(path, tmp_path)
    assert rec_s == got
    if keep:
        assert rec_c == sent_by_client
    else:
        masked_equal(rec_c, sent_by_client)
        assert b"hunter2-secret" not in path.read_bytes()
        assert rec_c.count(b"#") >= len("hunter2-secret")
    doc = read_json(path)
    retr = [ex for ex in doc["exchanges"] if ex["command"] == "RETR"]
    assert [ex["body_octets"] for ex in retr] == [len(body), len(small), len(body)]
    assert not any(ex["truncated"] for ex in retr)


# --------------------------------------------------------------------------- faults


async def _recv_until_eof(stream: trio.SocketStream) -> bytes:
    got = bytearray()
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return bytes(got)
        got += data


async def test_upstream_refusing_connections(tmp_path: Path) -> None:
    config = ProxyConfig(
        upstream=("127.0.0.1", free_port()),
        listen=("127.0.0.1", 0),
        out_dir=tmp_path,
        connect_timeout=5,
    )
    async with running_proxy(config) as addr:
        with trio.fail_after(STEP):
            stream = await trio.open_tcp_stream(*addr)
            got = await _recv_until_eof(stream)
            await stream.aclose()
            (path,) = await finished_captures(tmp_path)
    assert got.startswith(b"-ERR [SYS/TEMP]")
    assert got.count(b"\r\n") == 1 and got.endswith(b"\r\n")
    with CaptureReader(path) as reader:
        records = list(reader.records())
        end = reader.end()
    assert end is not None and end["how"] == "upstream-error"
    assert end["error"] and "cannot reach upstream" in end["error"]
    data = [r for r in records if r.kind == fmt.DATA]
    assert len(data) == 1
    assert data[0].data == got and data[0].fields.get("p") == 1 and data[0].fields["d"] == "s"
    c_bin, s_bin = exported(path, tmp_path)
    assert c_bin == b"" and s_bin == b""  # popproxy's own line is not the server's stream


async def test_silent_upstream_hits_idle_timeout(tmp_path: Path) -> None:
    server = ScriptedServer(greeting=None, silent=True)
    out = tmp_path / "captures"
    out.mkdir()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        config = ProxyConfig(
            upstream=("127.0.0.1", port),
            listen=("127.0.0.1", 0),
            out_dir=out,
            connect_timeout=0.5,
            idle_timeout=0.6,
        )
        async with running_proxy(config) as addr:
            with trio.fail_after(STEP):
                stream = await trio.open_tcp_stream(*addr)
                t0 = trio.current_time()
                got = await _recv_until_eof(stream)
                elapsed = trio.current_time() - t0
                await stream.aclose()
                (path,) = await finished_captures(out)
        nursery.cancel_scope.cancel()
    assert got == b""  # no greeting was made up by the proxy
    assert 0.5 <= elapsed < 5
    with CaptureReader(path) as reader:
        end = reader.end()
    assert end is not None and end["how"] == "idle-timeout"
    assert server.connections and server.connections[0].closed.is_set()


async def test_client_disconnects_mid_retr(tmp_path: Path) -> None:
    big = STANDARD_MESSAGES[3] * 240  # ~50 MB, far more than the socket buffers hold
    server = ScriptedServer(answer=default_answer({1: big}))
    out = tmp_path / "captures"
    out.mkdir()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        config = ProxyConfig(upstream=("127.0.0.1", port), listen=("127.0.0.1", 0), out_dir=out)
        async with running_proxy(config) as addr:
            with trio.fail_after(STEP):
                stream = await trio.open_tcp_stream(*addr)
                got = b""
                await stream.send_all(b"RETR 1\r\n")
                while len(got) < 200_000:
                    got += await stream.receive_some(65536)
                # A hard close (RST) mid-body, as a killed client does.
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                await stream.aclose()
                await server.connections[0].closed.wait()  # upstream connection closed
                (path,) = await finished_captures(out)
        nursery.cancel_scope.cancel()
    assert server.connections[0].broken  # the proxy closed upstream mid-body
    doc = read_json(path)
    end = doc["session"]["end"]
    assert end["how"].startswith("client-"), end
    (retr,) = [ex for ex in doc["exchanges"] if ex["command"] == "RETR"]
    assert retr["truncated"] is True
    assert retr["body_octets"] < len(big)


async def test_server_garbage_is_relayed_unchanged(tmp_path: Path) -> None:
    rng = random.Random(42)
    garbage = _junk(rng, 20_000)
    server = ScriptedServer(greeting=garbage, answer=lambda line: _junk(rng, 500))
    out = tmp_path / "captures"
    out.mkdir()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        config = ProxyConfig(upstream=("127.0.0.1", port), listen=("127.0.0.1", 0), out_dir=out)
        async with running_proxy(config) as (_, pport):
            with trio.fail_after(STEP):
                got = await trio.to_thread.run_sync(
                    _raw_client, pport, [b"CAPA\r\n", b"STAT\r\nLIST\r\n", b"QUIT\r\n"]
                )
                (path,) = await finished_captures(out)
        nursery.cancel_scope.cancel()
    assert got == bytes(server.connections[0].sent)
    assert got.startswith(garbage)
    _, rec_s = exported(path, tmp_path)
    assert rec_s == got
    doc = read_json(path)
    assert doc["anomalies"], "random server bytes produced no anomaly"
    assert doc["session"]["end"]["anomalies"] == len(doc["anomalies"])
    assert doc["session"]["end"]["observer_error"] is None


class _GatedWriter(io.TextIOBase):
    """A terminal that is paused (Ctrl-S): ``write`` blocks until the gate opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.blocked = threading.Event()
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.blocked.set()
        self.gate.wait()
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


async def test_paused_terminal_does_not_stall_the_relay(tmp_path: Path) -> None:
    writer = _GatedWriter()
    view = LiveView(make_console(file=writer, width=100))  # type: ignore[arg-type]
    server = ScriptedServer()
    rounds = 2000
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            config = ProxyConfig(
                upstream=("127.0.0.1", port), listen=("127.0.0.1", 0), out_dir=tmp_path
            )
            async with running_proxy(config, view) as addr:
                stream = await trio.open_tcp_stream(*addr)
                with trio.fail_after(STEP):
                    buf = b""
                    while b"\n" not in buf:
                        buf += await stream.receive_some(4096)
                    await trio.to_thread.run_sync(writer.blocked.wait, 5.0)
                    assert writer.blocked.is_set(), "the view never tried to print"
                t0 = time.monotonic()
                with trio.fail_after(STEP):
                    for _ in range(rounds):
                        await stream.send_all(b"NOOP\r\n")
                        buf = b""
                        while not buf.endswith(b"\r\n"):
                            buf += await stream.receive_some(4096)
                        assert buf == b"+OK\r\n"
                elapsed = time.monotonic() - t0
                await stream.send_all(b"QUIT\r\n")
                with trio.fail_after(STEP):
                    await _recv_until_eof(stream)
                    await stream.aclose()
                    await finished_captures(tmp_path)
            nursery.cancel_scope.cancel()
    finally:
        writer.gate.set()
        view.close(timeout=10)
    assert elapsed < 5.0, f"{rounds} NOOPs took {elapsed:.1f}s behind a paused terminal"
    text = "".join(writer.parts)
    assert "lines skipped" in text
    assert "session ended" in text  # forced lines survive the flood
