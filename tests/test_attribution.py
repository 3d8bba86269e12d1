"""Three actors: what popproxy sends, drops or cuts is never put on the server's account."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.capture import format as fmt
from popproxy.capture.reader import CaptureReader
from popproxy.cli.lint import lint_capture
from popproxy.cli.main import main
from popproxy.faults import FaultSet, parse_rule
from popproxy.inspect.document import capture_json
from popproxy.inspect.lint_rules import ERROR, Finding
from popproxy.proxy.config import ProxyConfig, StlsMode
from popproxy.proxy.session import Session
from tests.support.captures import make_capture

GREETING = b"+OK POP3 ready\r\n"
Script = Callable[[trio.abc.Stream], Awaitable[None]]


async def run_session(
    tmp_path: Path, server: Script, client: Script, *, stop_after: float | None = None, **kw: Any
) -> tuple[dict[str, Any], list[Finding]]:
    """One session over in-memory streams; the capture as ``show --json`` and ``lint``."""
    client_end, proxy_client = trio.testing.memory_stream_pair()
    proxy_upstream, server_end = trio.testing.memory_stream_pair()

    async def connect() -> trio.abc.Stream:
        return proxy_upstream

    config = ProxyConfig(upstream=("pop.example", 110), out_dir=tmp_path, linger=0.2, **kw)
    session = Session(config, proxy_client, None, connect=connect)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server, server_end)
            nursery.start_soon(client, client_end)
            if stop_after is None:
                await session.run()
            else:
                with trio.move_on_after(stop_after):  # Ctrl-C: the proxy is cancelled
                    await session.run()
            nursery.cancel_scope.cancel()
    (path,) = tmp_path.glob(f"*{fmt.SUFFIX}")
    with CaptureReader(path) as reader:
        doc = capture_json(reader)
    with CaptureReader(path) as reader:
        findings = lint_capture(reader)
    return doc, findings


def blamed_on_server(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.direction == "server" and f.severity == ERROR]


async def read_until(stream: trio.abc.Stream, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = await stream.receive_some()
        if not chunk:
            break
        got += chunk
    return got


async def test_strip_mode_replies_are_popproxys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def server(s: trio.abc.Stream) -> None:
        await s.send_all(GREETING)
        assert await read_until(s, b"CAPA\r\n") == b"CAPA\r\n"
        await s.send_all(b"+OK\r\nUIDL\r\nSTLS\r\n.\r\n")
        rest = await read_until(s, b"QUIT\r\n")
        assert rest == b"QUIT\r\n"  # popproxy answered STLS: the server never saw it
        await s.send_all(b"+OK bye\r\n")
        await s.aclose()

    got: list[bytes] = []

    async def client(c: trio.abc.Stream) -> None:
        await read_until(c, b"\r\n")
        await c.send_all(b"CAPA\r\n")
        got.append(await read_until(c, b".\r\n"))
        await c.send_all(b"STLS\r\n")
        got.append(await read_until(c, b"\r\n"))
        await c.send_all(b"QUIT\r\n")
        await read_until(c, b"bye\r\n")

    doc, findings = await run_session(tmp_path, server, client, stls=StlsMode.STRIP)
    assert got == [b"+OK\r\nUIDL\r\n.\r\n", b"-ERR STLS not available.\r\n"]
    (capa,) = [ex for ex in doc["exchanges"] if ex["command"] == "CAPA"]
    (stls,) = [ex for ex in doc["exchanges"] if ex["command"] == "STLS"]
    assert stls["reply_by"] == "popproxy" and stls["status"] == "-ERR"
    assert stls["reply_why"] == "strip mode: popproxy refuses STLS" and stls["withheld"] is None
    # What popproxy did not forward, on the exchange it belongs to: the hidden capability,
    # and the client's STLS line that never reached the server.
    assert capa["dropped"] == [
        {"from": "server", "octets": 6, "why": "STLS capability hidden by popproxy"}
    ]
    assert stls["dropped"] == [{"from": "client", "octets": 6, "why": "STLS answered by popproxy"}]
    assert all(ex["reply_by"] == "server" for ex in doc["exchanges"] if ex is not stls)
    assert blamed_on_server(findings) == []
    (path,) = tmp_path.glob(f"*{fmt.SUFFIX}")
    assert main(["show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "popproxy: -ERR STLS not available." in shown
    assert "S: -ERR STLS" not in shown


async def test_upstream_tls_failing_after_ok_is_not_the_servers_plaintext(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def server(s: trio.abc.Stream) -> None:
        await s.send_all(GREETING)
        await read_until(s, b"STLS\r\n")
        await s.send_all(b"+OK go ahead\r\n")
        await read_until(s, b"\x16")  # popproxy's ClientHello
        await s.send_all(b"-ERR this is not TLS\r\n")  # the handshake fails
        await s.aclose()

    got: list[bytes] = []

    async def client(c: trio.abc.Stream) -> None:
        await read_until(c, b"\r\n")
        await c.send_all(b"STLS\r\n")
        got.append(await read_until(c, b"\r\n"))

    doc, findings = await run_session(
        tmp_path, server, client, upstream_context=ssl.create_default_context()
    )
    assert got[0].startswith(b"-ERR [SYS/TEMP] popproxy: TLS with upstream failed: ")
    assert doc["session"]["end"]["how"] == "upstream-tls-error"
    drops = [e for e in doc["events"] if e.get("r") == "drop"]
    assert [d["why"] for d in drops] == ["upstream TLS failed"]
    injected = [a for a in doc["anomalies"] if a["kind"] == "plaintext-after-stls"]
    assert injected and all(a["by"] == "popproxy" for a in injected)
    assert blamed_on_server(findings) == []
    # The STLS exchange shows what the client got: popproxy's refusal, not the +OK it
    # withheld (that is shown as withheld, with the drop record's why).
    (stls,) = [ex for ex in doc["exchanges"] if ex["command"] == "STLS"]
    assert (stls["status"], stls["code"], stls["reply_by"]) == ("-ERR", "SYS/TEMP", "popproxy")
    assert stls["text"].startswith("popproxy: TLS with upstream failed: ")
    assert {k: v for k, v in stls["withheld"].items() if k != "t"} == {
        "status": "+OK",
        "code": None,
        "text": "go ahead",
        "multiline": False,
        "why": "upstream TLS failed",
    }
    assert stls["dropped"] == [{"from": "server", "octets": 14, "why": "upstream TLS failed"}]
    assert stls["t_reply"] > stls["withheld"]["t"]
    assert main(["show", str(doc["path"])]) == 0
    shown = capsys.readouterr().out
    assert "popproxy: -ERR [SYS/TEMP] popproxy: TLS with upstream failed" in shown
    assert "withheld from the client: the server's +OK go ahead (upstream TLS failed)" in shown


async def test_ctrl_c_mid_retr_is_popproxys_cut(tmp_path: Path) -> None:
    async def server(s: trio.abc.Stream) -> None:
        await s.send_all(GREETING)
        await read_until(s, b"RETR 1\r\n")
        await s.send_all(b"+OK 1000000 octets\r\n" + b"x" * 1000 + b"\r\n")
        await trio.sleep_forever()  # the rest never comes before the proxy stops

    async def client(c: trio.abc.Stream) -> None:
        await read_until(c, b"\r\n")
        await c.send_all(b"RETR 1\r\n")
        await trio.sleep_forever()

    doc, findings = await run_session(tmp_path, server, client, stop_after=0.5)
    assert doc["session"]["end"]["how"] == "proxy-shutdown"
    assert not [f for f in findings if f.rule == "body-truncated"]
    assert [f.direction for f in findings if f.rule == "cut-by-popproxy"] == ["popproxy"]
    truncated = [a for a in doc["anomalies"] if a["kind"] == "truncated-body"]
    assert [a["by"] for a in truncated] == ["popproxy"]
    assert blamed_on_server(findings) == []


def test_replay_and_serve_leave_popproxys_commands_out(tmp_path: Path) -> None:
    """--upstream-stls: popproxy's own STLS is not a client command to replay or serve;
    strip mode: popproxy's -ERR to the client's STLS is marked as popproxy's."""
    from popproxy.replay.script import load_session
    from tests.support.captures import make_capture

    steps = [
        ("s", 0.01, GREETING),
        ("p", "c", 0.02, b"STLS\r\n", "popproxy upgrades the upstream leg (--upstream-stls)"),
        ("s", 0.03, b"+OK Begin TLS\r\n"),
        ("tls", "s", 0.04),
        ("tls", "c", 0.04),
        ("c", 0.05, b"STLS\r\n"),
        ("p", "s", 0.06, b"-ERR STLS not available.\r\n", "strip mode: popproxy refuses STLS"),
        ("c", 0.07, b"QUIT\r\n"),
        ("s", 0.08, b"+OK bye\r\n"),
    ]
    path = make_capture(tmp_path / f"own{fmt.SUFFIX}", steps)
    session = load_session(path)
    assert [(s.verb, s.reply_by) for s in session.steps] == [
        ("STLS", "popproxy"),
        ("QUIT", "server"),
    ]


async def test_a_greeting_a_fault_replaced_is_popproxys(tmp_path: Path) -> None:
    """popproxy's line comes before the drop record of the greeting it replaced."""

    async def server(s: trio.abc.Stream) -> None:
        await s.send_all(GREETING)
        await read_until(s, b"QUIT\r\n")
        await s.send_all(b"+OK bye\r\n")
        await s.aclose()

    got: list[bytes] = []

    async def client(c: trio.abc.Stream) -> None:
        got.append(await read_until(c, b"\r\n"))
        await c.send_all(b"QUIT\r\n")
        await read_until(c, b"bye\r\n")

    faults = FaultSet([parse_rule("greeting: -ERR [SYS/TEMP] too busy")], seed=1)
    doc, findings = await run_session(tmp_path, server, client, faults=faults)
    assert got == [b"-ERR [SYS/TEMP] too busy\r\n"]
    greeting, quit_ = doc["exchanges"]  # popproxy's line is the greeting, not an extra one
    assert (greeting["kind"], greeting["status"], greeting["code"]) == (
        "greeting",
        "-ERR",
        "SYS/TEMP",
    )
    assert greeting["reply_by"] == "popproxy" and "answered by popproxy" in greeting["reply_why"]
    assert greeting["withheld"]["status"] == "+OK" and greeting["withheld"]["text"] == "POP3 ready"
    assert quit_["command"] == "QUIT" and quit_["reply_by"] == "server"
    assert blamed_on_server(findings) == []


async def test_a_stalled_reply_is_withheld_not_answered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def server(s: trio.abc.Stream) -> None:
        await s.send_all(GREETING)
        await read_until(s, b"STAT\r\n")
        await s.send_all(b"+OK 2 320\r\n")
        await trio.sleep_forever()

    async def client(c: trio.abc.Stream) -> None:
        await read_until(c, b"\r\n")
        await c.send_all(b"STAT\r\n")
        with trio.move_on_after(0.3):
            assert await read_until(c, b"\r\n") == b""  # never comes
        await c.aclose()

    faults = FaultSet([parse_rule("STAT: stall")], seed=1)
    doc, _ = await run_session(tmp_path, server, client, faults=faults)
    (stat,) = [ex for ex in doc["exchanges"] if ex["command"] == "STAT"]
    assert (stat["status"], stat["reply_by"]) == (None, "popproxy")  # the client got none
    assert stat["withheld"]["status"] == "+OK" and stat["withheld"]["text"] == "2 320"
    assert stat["withheld"]["why"] == stat["reply_why"] == "fault rule 1 (STAT: stall)"
    assert main(["show", str(doc["path"])]) == 0
    shown = capsys.readouterr().out
    assert "popproxy: (no reply)  ✂ withheld from the client: the server's +OK 2 320" in shown


# ----------------------------------------------------------------- withheld, any segmentation

OK_TO_STLS = b"+OK go ahead\r\n"
REFUSAL = b"-ERR [SYS/TEMP] popproxy: TLS with upstream failed\r\n"
BUSY = b"-ERR [SYS/TEMP] too busy\r\n"
CASES = {
    # name: (server bytes before, command, the server line withheld, popproxy's line, why)
    "stls": (GREETING, b"STLS\r\n", OK_TO_STLS, REFUSAL, "upstream TLS failed"),
    "greeting": (b"", None, GREETING, BUSY, "greeting: reply withheld"),
    "stall": (GREETING, b"STAT\r\n", b"+OK 2 320\r\n", None, "STAT: stall"),
}


def withheld_case(
    path: Path, case: str, cuts: set[int], per_chunk: bool, own_first: bool
) -> dict[str, Any]:
    """A capture of ``case`` with the withheld line in chunks cut at ``cuts``, its drop
    records after each chunk or once after all of them, popproxy's line before or after
    them; the exchange that line answered, as ``show --json`` has it."""
    before, command, line, own, why = CASES[case]
    steps: list[tuple[Any, ...]] = [("s", 0.01, before)] if before else []
    if command:
        steps.append(("c", 0.02, command))
    at, drops = len(before), []
    cut = sorted(c for c in cuts if c < len(line))
    for lo, hi in zip([0, *cut], [*cut, len(line)], strict=True):
        steps.append(("s", 0.03, line[lo:hi]))
        drop = ("drop", "s", at + lo, hi - lo, why)
        if per_chunk and not own_first:
            steps.append(drop)
        else:
            drops.append(drop)
    if not per_chunk:
        drops = [("drop", "s", at, len(line), why)]
    own_steps = [("p", "s", 0.04, own, "popproxy's own")] if own else []
    steps += own_steps + drops if own_first else drops + own_steps
    steps.append(("c", 0.05, b""))
    path = make_capture(path, steps)
    with CaptureReader(path) as reader:
        doc = capture_json(reader)
    (ex,) = [e for e in doc["exchanges"] if e["withheld"] is not None]
    kinds = [e["kind"] for e in doc["exchanges"]]
    return {
        **ex,
        "t_reply": None,
        "t_end": None,
        "withheld": {**ex["withheld"], "t": None},
        "kinds": kinds,
    }


@given(
    case=st.sampled_from(sorted(CASES)),
    cuts=st.sets(st.integers(1, 13), max_size=4),
    per_chunk=st.booleans(),
    own_first=st.booleans(),
)
@settings(max_examples=80, deadline=None)
def test_a_withheld_reply_whatever_the_segmentation(
    tmp_path_factory: pytest.TempPathFactory,
    case: str,
    cuts: set[int],
    per_chunk: bool,
    own_first: bool,
) -> None:
    """Drop records follow their bytes, which the observer may place only later; popproxy's
    line may come before or after them: the exchange comes out the same."""
    folder = tmp_path_factory.mktemp("withheld")
    whole = withheld_case(folder / f"whole{fmt.SUFFIX}", case, set(), False, False)
    got = withheld_case(folder / f"cut{fmt.SUFFIX}", case, cuts, per_chunk, own_first)
    assert got == whole
    _, _, line, own, why = CASES[case]
    assert whole["withheld"]["status"] == line[:3].decode().strip()
    assert whole["dropped"] == [{"from": "server", "octets": len(line), "why": why}]
    assert whole["reply_by"] == "popproxy"
    assert whole["status"] == (None if own is None else "-ERR")
    assert (
        "unsolicited" not in whole["kinds"]
    )  # popproxy's line is the reply, not a line of its own


def test_a_partly_dropped_status_line_is_not_withheld(tmp_path: Path) -> None:
    """``corrupt bare-lf`` drops each CR: the client got the line, changed; not withheld."""
    steps: list[tuple[Any, ...]] = [
        ("s", 0.01, GREETING),
        ("c", 0.02, b"NOOP\r\n"),
        ("s", 0.03, b"+OK\r\n"),
        ("drop", "s", len(GREETING) + 3, 1, "NOOP: corrupt bare-lf: CR withheld (bare LF)"),
    ]
    path = make_capture(tmp_path / f"lf{fmt.SUFFIX}", steps)
    with CaptureReader(path) as reader:
        doc = capture_json(reader)
    (noop,) = [ex for ex in doc["exchanges"] if ex["command"] == "NOOP"]
    assert (noop["status"], noop["reply_by"], noop["withheld"]) == ("+OK", "server", None)
    assert noop["dropped"][0]["octets"] == 1
