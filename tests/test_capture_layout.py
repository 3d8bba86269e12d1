"""The record layout: every record kind, byte for byte as docs/capture-format.md has it."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from popproxy.capture import format as fmt
from popproxy.capture.format import Record, SessionEnd
from popproxy.capture.reader import CaptureReader
from popproxy.capture.recorder import Recorder
from popproxy.capture.validate import parse_record
from popproxy.capture.writer import CaptureWriter
from popproxy.core import Direction, Observer
from popproxy.proxy.config import ProxyConfig, StlsMode
from popproxy.proxy.opaque import OpaqueRelay
from popproxy.proxy.session import Session
from popproxy.proxy.tap import Tap

C, S = Direction.CLIENT, Direction.SERVER
TOKEN = base64.b64encode(b"\x00alice\x00pw-of-alice")
_T = re.compile(rb'"t":[0-9.]+')

# What popproxy wrote before the writer had a method per record kind: the goldens below
# were taken from that code, so the named methods are proven to write the same bytes.
EVERY_KIND = [
    b'{"r":"popproxy-capture","v":"1.0","session":1,"upstream":"h:110"}',
    b'{"r":"event","t":0.000123,"kind":"upstream-connected","addr":"127.0.0.1:110"}',
    b'{"r":"d","d":"s","t":0.010000,"n":11}',
    b"+OK ready\r",
    b"",
    b'{"r":"d","d":"c","t":0.020000,"n":6}',
    b"STLS\r",
    b"",
    b'{"r":"d","d":"s","t":0.030000,"n":8}',
    b"+OK go\r",
    b"",
    (
        b'{"r":"tls","d":"c","t":0.04,"off":6,"decrypted":true,"leg":"client","mode":"stls",'
        b'"version":"TLSv1.3","cipher":null,"sni":"pop.example","peer_subject":null,'
        b'"peer_issuer":null,"peer_sha256":null,"verified":false}'
    ),
    b'{"r":"tls","d":"s","t":0.05,"off":19,"decrypted":false,"leg":"both","mode":"passthrough"}',
    b'{"r":"redact","d":"c","off":19,"len":6,"kind":"PASS","masked":true}',
    b'{"r":"d","d":"c","t":0.060000,"n":21}',
    b"USER a\r",
    b"PASS ######\r",
    b"",
    b'{"r":"d","d":"s","t":0.070000,"n":10}',
    b"+OK\r",
    b"+OK\r",
    b"",
    b'{"r":"drop","d":"s","off":5,"len":5,"why":"withheld: \\"quoted\\" \\u00e9"}',
    b'{"r":"event","t":0.08,"kind":"fault-cut","detail":"rule 1","how":"rst","offset":10}',
    b'{"r":"d","d":"s","t":0.090000,"n":10,"p":1,"why":"a fault\'s answer"}',
    b"-ERR own\r",
    b"",
    b'{"r":"d","d":"c","t":0.100000,"n":8,"p":1}',
    b"RETR 1\r",
    b"",
    b'{"r":"opaque","d":"c","off":35,"why":"not POP3"}',
    b'{"r":"eof","d":"s","t":0.11}',
    b'{"r":"eof","d":"c","t":0.12,"by":"popproxy","why":"proxy-shutdown"}',
    b'{"r":"eof","d":"c","t":0.13,"by":"popproxy","why":"popproxy closed"}',
    (
        b'{"r":"end","t":0.141235,"how":"proxy-shutdown",'
        b'"error":"capture write failed: disk full; 77 octets","octets":{"c":35,"s":39},'
        b'"commands":3,"user":"a","mechanism":null,"anomalies":1,'
        b'"anomaly_kinds":{"truncated-body":1},"errors":0,"verbs":{"USER":1,"PASS":1},'
        b'"tls":["client","both"],"redactions":1,"observer_error":null,"late_redactions":2,'
        b'"unrecorded":77}'
    ),
    b"",
]


def write_every_kind(path: Path) -> None:
    recorder = Recorder.create(path, {"session": 1, "upstream": "h:110"}, keep_secrets=False)
    tap = Tap(recorder.writer, None)
    tap.event(0.0001234567, "upstream-connected", addr="127.0.0.1:110")
    tap.data(S, 0.01, b"+OK ready\r\n")
    tap.data(C, 0.02, b"STLS\r\n")
    tap.data(S, 0.03, b"+OK go\r\n")
    facts: dict[str, Any] = {"leg": "client", "mode": "stls", "version": "TLSv1.3"}
    facts["cipher"] = None
    facts |= {"sni": "pop.example", "peer_subject": None, "peer_issuer": None}
    facts |= {"peer_sha256": None, "verified": False}
    tap.start_tls(C, 0.04, facts)
    tap.start_tls(S, 0.05, {"leg": "both", "mode": "passthrough"}, decrypted=False)
    tap.data(C, 0.06, b"USER a\r\nPASS secret\r\n")
    tap.data(S, 0.07, b"+OK\r\n+OK\r\n")
    tap.drop(S, 5, 5, 'withheld: "quoted" \u00e9')
    tap.drop(S, 5, 0, "nothing")  # a drop of nothing is no record
    tap.event(0.08, "fault-cut", detail="rule 1", how="rst", offset=10)
    tap.data(S, 0.09, b"-ERR own\r\n", proxy=True, why="a fault's answer")
    tap.data(C, 0.10, b"RETR 1\r\n", proxy=True)
    recorder.writer.opaque(C, "not POP3")
    tap.data(S, 0.11, b"")
    tap.data(C, 0.12, b"", proxy=True, why="proxy-shutdown")
    tap.data(C, 0.13, b"", proxy=True)
    recorder.writer.stats.late_redactions = 2
    recorder.error, recorder.lost = "capture write failed: disk full", 77
    end = SessionEnd(
        0.1412345678,
        "proxy-shutdown",
        "capture write failed: disk full; 77 octets",
        commands=3,
        user="a",
        anomaly_kinds={"truncated-body": 1},
        verbs={"USER": 1, "PASS": 1},
    )
    assert recorder.finish(end) == "capture write failed: disk full"


def test_every_record_kind_is_written_as_before(tmp_path: Path) -> None:
    path = tmp_path / f"every{fmt.SUFFIX}"
    write_every_kind(path)
    assert path.read_bytes().split(b"\n") == EVERY_KIND


def test_records_read_back_typed(tmp_path: Path) -> None:
    path = tmp_path / f"every{fmt.SUFFIX}"
    write_every_kind(path)
    with CaptureReader(path) as reader:
        records = list(reader.records())
    seen = [
        (r.kind, r.direction, r.proxy, r.why, r.offset, r.length)
        for r in records
        if r.kind != fmt.EVENT
    ]
    assert seen == [
        (fmt.DATA, S, False, None, 0, 11),
        (fmt.DATA, C, False, None, 0, 6),
        (fmt.DATA, S, False, None, 0, 8),
        (fmt.TLS, C, False, None, 6, 0),
        (fmt.TLS, S, False, None, 19, 0),
        (fmt.REDACT, C, False, None, 19, 6),
        (fmt.DATA, C, False, None, 0, 21),
        (fmt.DATA, S, False, None, 0, 10),
        (fmt.DROP, S, False, 'withheld: "quoted" \u00e9', 5, 5),
        (fmt.DATA, S, True, "a fault's answer", 0, 10),
        (fmt.DATA, C, True, None, 0, 8),
        (fmt.OPAQUE, C, False, "not POP3", 35, 0),
        (fmt.EOF, S, False, None, 0, 0),
        (fmt.EOF, C, True, "proxy-shutdown", 0, 0),
        (fmt.EOF, C, True, "popproxy closed", 0, 0),
        (fmt.END, None, False, None, 0, 0),
    ]
    assert [r.decrypted for r in records if r.kind == fmt.TLS] == [True, False]


def test_an_observer_failure_is_an_event_without_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    writer = CaptureWriter({})
    tap = Tap(writer, None)
    tap.data(S, 0.0, b"+OK ready\r\n")

    def broken(self: Observer, direction: Direction, data: bytes) -> list[object]:
        raise RuntimeError("observer bug")

    monkeypatch.setattr(Observer, "receive_data", broken)
    tap.data(C, 0.5, b"USER a\r\n")
    writer.flush_all()
    assert b"".join(writer.take()).split(b"\n") == [
        b'{"r":"popproxy-capture","v":"1.0"}',
        b'{"r":"d","d":"s","t":0.000000,"n":11}',
        b"+OK ready\r",
        b"",
        b'{"r":"redact","d":"c","off":0,"len":8,"kind":"SASL","masked":true}',
        b'{"r":"d","d":"c","t":0.500000,"n":8}',
        b"########",
        b'{"r":"event","kind":"observer-error","detail":"RuntimeError: observer bug"}',
        b"",
    ]


def test_an_unknown_or_damaged_direction_reads_as_none() -> None:
    assert Record("future", {"d": ["c"]}).direction is None
    assert Record("future", {"d": "x", "off": "1", "why": 3}).direction is None
    assert Record("future", {"off": "1", "why": 3, "len": None}).offset == 0
    assert Record("future", {"why": 3, "len": None}).why is None
    assert Record("future", {"len": None}).length == 0


directions = st.sampled_from([C, S])
texts = st.text(max_size=30)
times = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@given(directions, times, texts, st.booleans(), st.integers(0, 1 << 40))
def test_named_records_round_trip(
    direction: Direction, t: float, why: str, proxy: bool, offset: int
) -> None:
    lines = [
        fmt.encode_eof(direction, t, proxy=proxy, why=why),
        fmt.encode_drop(direction, offset, offset + 1, why),
        fmt.encode_opaque(direction, offset, why),
        fmt.encode_meta(fmt.tls_fields(direction, t, offset, {"leg": why}, decrypted=proxy)),
        fmt.encode_redact(direction, offset, 3, "PASS", masked=proxy),
        b"".join(fmt.encode_data(direction, t, b"x", proxy=proxy, why=why or None)[:1]),
    ]
    for line in lines:
        kind, fields = parse_record(line)
        record = Record(kind, fields)
        assert record.direction is direction
        assert abs(record.t - round(t, 6)) <= 1e-6 or kind in (fmt.DROP, fmt.OPAQUE, fmt.REDACT)
    eof, drop, opaque, tls, redact, data = (Record(*parse_record(line)) for line in lines)
    assert eof.proxy is proxy and eof.why == ((why or "popproxy closed") if proxy else None)
    assert (drop.offset, drop.length, drop.why) == (offset, offset + 1, why)
    assert (opaque.offset, opaque.why) == (offset, why)
    assert (tls.offset, tls.decrypted) == (offset, proxy)
    assert (redact.offset, redact.length) == (offset, 3)
    assert (data.proxy, data.why, data.length) == (proxy, why or None, 1)


def test_a_session_end_sums_up_its_anomalies() -> None:
    from popproxy.core.transcript import SessionSummary

    summary = SessionSummary(user="u", commands=2, errors=1, verbs={"USER": 1, "QUIT": 1})
    summary.anomalies = [{"kind": "bare-lf"}, {"kind": "no-reply"}, {"kind": "bare-lf"}]
    end = SessionEnd.of(1.5, "quit", None, summary, observer_error="boom")
    line = fmt.encode_end(end, octets={C: 1, S: 2}, tls=["client"], redactions=0)
    assert line == (
        b'{"r":"end","t":1.5,"how":"quit","error":null,"octets":{"c":1,"s":2},"commands":2,'
        b'"user":"u","mechanism":null,"anomalies":3,"anomaly_kinds":{"bare-lf":2,"no-reply":1},'
        b'"errors":1,"verbs":{"USER":1,"QUIT":1},"tls":["client"],"redactions":0,'
        b'"observer_error":"boom"}\n'
    )


# ------------------------------------------------------- a proxied session, whole

# Taken from the same session before the change (times shown as T: they vary).
SESSION = [
    b'{"r":"event","t":T,"kind":"upstream-connected","addr":"?"}',
    b'{"r":"d","d":"s","t":T,"n":16}',
    b"+OK POP3 ready\r",
    b"",
    b'{"r":"d","d":"c","t":T,"n":6}',
    b"CAPA\r",
    b"",
    b'{"r":"d","d":"s","t":T,"n":51}',
    b"+OK\r",
    b"SASL PLAIN SCRAM-SHA-256-PLUS\r",
    b"STLS\r",
    b"USER\r",
    b".\r",
    b"",
    (
        b'{"r":"drop","d":"s","off":31,"len":19,'
        b'"why":"-PLUS mechanism hidden by popproxy (--hide-plus)"}'
    ),
    b'{"r":"event","t":T,"kind":"hide-plus","detail":"-PLUS mechanisms hidden (--hide-plus)"}',
    b'{"r":"drop","d":"s","off":52,"len":6,"why":"STLS capability hidden by popproxy"}',
    b'{"r":"event","t":T,"kind":"strip","detail":"STLS hidden from CAPA"}',
    b'{"r":"d","d":"c","t":T,"n":6}',
    b"STLS\r",
    b"",
    b'{"r":"drop","d":"c","off":6,"len":6,"why":"STLS answered by popproxy"}',
    b'{"r":"event","t":T,"kind":"strip","detail":"STLS refused by popproxy (strip mode)"}',
    b'{"r":"d","d":"s","t":T,"n":26,"p":1,"why":"strip mode: popproxy refuses STLS"}',
    b"-ERR STLS not available.\r",
    b"",
    b'{"r":"d","d":"c","t":T,"n":12}',
    b"USER alice\r",
    b"",
    b'{"r":"d","d":"s","t":T,"n":5}',
    b"+OK\r",
    b"",
    b'{"r":"redact","d":"c","off":29,"len":8,"kind":"PASS","masked":true}',
    b'{"r":"d","d":"c","t":T,"n":15}',
    b"PASS ########\r",
    b"",
    b'{"r":"d","d":"s","t":T,"n":16}',
    b"-ERR [AUTH] no\r",
    b"",
    b'{"r":"redact","d":"c","off":50,"len":24,"kind":"AUTH-IR","masked":true}',
    b'{"r":"d","d":"c","t":T,"n":37}',
    b"AUTH PLAIN ########################\r",
    b"",
    b'{"r":"identity","seq":5,"mech":"PLAIN","identity":"alice"}',
    b'{"r":"d","d":"s","t":T,"n":13}',
    b"+OK welcome\r",
    b"",
    b'{"r":"d","d":"c","t":T,"n":6}',
    b"QUIT\r",
    b"",
    b'{"r":"d","d":"s","t":T,"n":9}',
    b"+OK bye\r",
    b"",
    b'{"r":"eof","d":"s","t":T}',
    b'{"r":"eof","d":"c","t":T,"by":"popproxy","why":"server-closed"}',
    (
        b'{"r":"end","t":T,"how":"quit","error":null,"octets":{"c":82,"s":136},"commands":6,'
        b'"user":"alice","mechanism":"PLAIN","anomalies":0,"anomaly_kinds":{},"errors":2,'
        b'"verbs":{"CAPA":1,"STLS":1,"USER":1,"PASS":1,"AUTH":1,"QUIT":1},"tls":[],'
        b'"redactions":2,"observer_error":null}'
    ),
    b"",
]
OPAQUE = [
    b'{"r":"event","t":T,"kind":"upstream-connected","addr":"?"}',
    b'{"r":"event","t":T,"kind":"opaque","detail":"no greeting"}',
    b'{"r":"opaque","d":"c","off":0,"why":"no greeting"}',
    b'{"r":"opaque","d":"s","off":0,"why":"no greeting"}',
    b'{"r":"d","d":"s","t":T,"n":11}',
    b"SSH-2.0-x\r",
    b"",
    b'{"r":"redact","d":"c","off":0,"len":5,"kind":"OPAQUE","masked":true}',
    b'{"r":"d","d":"c","t":T,"n":5}',
    b"#####",
    b'{"r":"d","d":"s","t":T,"n":3}',
    b"bye",
    b'{"r":"eof","d":"c","t":T}',
    b'{"r":"eof","d":"s","t":T}',
    (
        b'{"r":"end","t":T,"how":"client-closed","error":null,"octets":{"c":5,"s":14},'
        b'"commands":0,"user":null,"mechanism":null,"anomalies":2,"anomaly_kinds":{"opaque":2},'
        b'"errors":0,"verbs":{},"tls":[],"redactions":1,"observer_error":null}'
    ),
    b"",
]


def body_lines(path: Path) -> list[bytes]:
    """The capture after its header, split at LF (data inline), every time as ``T``."""
    return [_T.sub(b'"t":T', line) for line in path.read_bytes().split(b"\n")[1:]]


async def read_until(stream: trio.abc.Stream, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = await stream.receive_some()
        if not chunk:
            break
        got += chunk
    return got


async def _session(tmp_path: Path, **kw: Any) -> Path:
    client_end, proxy_client = trio.testing.memory_stream_pair()
    proxy_upstream, server_end = trio.testing.memory_stream_pair()

    async def connect() -> trio.abc.Stream:
        return proxy_upstream

    async def server(s: trio.abc.Stream) -> None:
        await s.send_all(b"+OK POP3 ready\r\n")
        await read_until(s, b"CAPA\r\n")
        await s.send_all(b"+OK\r\nSASL PLAIN SCRAM-SHA-256-PLUS\r\nSTLS\r\nUSER\r\n.\r\n")
        await read_until(s, b"USER alice\r\n")
        await s.send_all(b"+OK\r\n")
        await read_until(s, b"PASS wrong-pw\r\n")
        await s.send_all(b"-ERR [AUTH] no\r\n")
        await read_until(s, b"\r\n")
        await s.send_all(b"+OK welcome\r\n")
        await read_until(s, b"QUIT\r\n")
        await s.send_all(b"+OK bye\r\n")
        await s.aclose()

    async def client(c: trio.abc.Stream) -> None:
        await read_until(c, b"\r\n")
        for line, until in [
            (b"CAPA\r\n", b".\r\n"),
            (b"STLS\r\n", b"\r\n"),
            (b"USER alice\r\n", b"\r\n"),
            (b"PASS wrong-pw\r\n", b"\r\n"),
            (b"AUTH PLAIN " + TOKEN + b"\r\n", b"\r\n"),
            (b"QUIT\r\n", b"bye\r\n"),
        ]:
            await c.send_all(line)
            await read_until(c, until)
        await trio.sleep_forever()  # popproxy ends the client's direction

    config = ProxyConfig(upstream=("pop.example", 110), out_dir=tmp_path, linger=0.2, **kw)
    session = Session(config, proxy_client, None, connect=connect)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server, server_end)
            nursery.start_soon(client, client_end)
            await session.run()
            nursery.cancel_scope.cancel()
    (path,) = tmp_path.glob(f"*{fmt.SUFFIX}")
    return path


async def test_a_proxied_session_is_recorded_as_before(tmp_path: Path) -> None:
    """Drops, popproxy's own bytes, events, redaction, identity, EOFs and the end."""
    path = await _session(tmp_path, stls=StlsMode.STRIP, hide_plus=True)
    assert body_lines(path) == SESSION


async def test_an_opaque_connection_is_recorded_as_before(tmp_path: Path) -> None:
    client_end, proxy_client = trio.testing.memory_stream_pair()
    proxy_upstream, server_end = trio.testing.memory_stream_pair()

    async def server() -> None:
        await server_end.send_all(b"SSH-2.0-x\r\n")
        await read_until(server_end, b"hello")
        await server_end.send_all(b"bye")
        await read_until(server_end, b"never")  # until the client's EOF
        await server_end.aclose()

    async def client() -> None:
        await read_until(client_end, b"\r\n")
        await client_end.send_all(b"hello")
        await read_until(client_end, b"bye")
        await client_end.send_eof()
        await read_until(client_end, b"never")

    config = ProxyConfig(upstream=("pop.example", 110), out_dir=tmp_path)
    relay = OpaqueRelay(
        config, proxy_client, proxy_upstream, None, number=3, reason="no greeting", label="x"
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            nursery.start_soon(client)
            await relay.run()
    (path,) = tmp_path.glob(f"*{fmt.SUFFIX}")
    assert body_lines(path) == OPAQUE
