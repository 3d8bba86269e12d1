"""The captures ``popproxy serve --out`` writes: what each real client got, faults explained."""

from __future__ import annotations

import contextlib
import errno
import os
import poplib
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy.capture import format as fmt
from popproxy.capture.reader import CaptureReader
from popproxy.capture.recorder import Recorder
from popproxy.cli.lint import lint_capture
from popproxy.faults import FaultSet, parse_rule
from popproxy.inspect.lint_rules import Finding
from popproxy.replay.fake import FakeServer, ServeConfig, serve_replay
from popproxy.replay.script import load_session
from tests.support import clients
from tests.test_fault_serve import CURL_SESSION, SESSION, poplib_run, raw_run, run
from tests.test_record_e2e import finished_captures, read_json
from tests.test_replay import write_capture

pytest_plugins = ["pytester"]

RETR1 = SESSION[12][1]  # the recorded reply to RETR 1


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    return write_capture(tmp_path / "s.popcap", SESSION)


@asynccontextmanager
async def serving(
    capture: Path, out: Path, *rules: str, seed: int = 1, **kw: Any
) -> AsyncIterator[tuple[FakeServer, int, list[str]]]:
    """A fake server playing ``capture`` with ``rules``, each session captured in ``out``."""
    out.mkdir(exist_ok=True)
    config = ServeConfig(
        [load_session(capture)] if capture.suffix == fmt.SUFFIX else [],
        listen=("127.0.0.1", 0),
        repeat=True,
        timeout=10,
        faults=FaultSet([parse_rule(x) for x in rules], seed=seed),
        out_dir=out,
        **kw,
    )
    log: list[str] = []
    server = FakeServer(config, lambda text: log.append(text.plain))

    async def serve(task_status: trio.TaskStatus[Any]) -> None:
        await serve_replay(config, None, announce=False, server=server, task_status=task_status)

    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(serve)
        yield server, addresses[0][1], log
        nursery.cancel_scope.cancel()


def records(path: Path) -> list[fmt.Record]:
    with CaptureReader(path) as reader:
        return list(reader.records())


def stream(recs: list[fmt.Record], d: str, *, own: bool | None = None) -> bytes:
    """Direction ``d``'s stream; ``own``: only popproxy's bytes (True) or only the peer's."""
    return b"".join(
        r.data or b""
        for r in recs
        if r.kind == fmt.DATA
        and r.fields["d"] == d
        and (own is None or bool(r.fields.get("p")) == own)
    )


def reached_client(recs: list[fmt.Record]) -> bytes:
    """The ``s`` stream minus its ``drop`` spans: what the client received."""
    reached = bytearray(stream(recs, "s"))
    drops = [r.fields for r in recs if r.kind == fmt.DROP and r.fields["d"] == "s"]
    for drop in sorted(drops, key=lambda f: -int(f["off"])):
        del reached[drop["off"] : drop["off"] + drop["len"]]
    return bytes(reached)


def lint(path: Path) -> list[Finding]:
    with CaptureReader(path) as reader:
        return lint_capture(reader)


def blamed(findings: list[Finding], who: str) -> list[str]:
    return [f.rule for f in findings if f.direction == who]


@pytest.mark.parametrize(
    ("ended", "fault", "quit_acked", "cancelled", "expected"),
    [
        ("client closed", False, False, False, ("client-closed", None, True)),
        ("client closed", False, True, False, ("quit", None, True)),
        ("script finished", False, True, False, ("quit", None, True)),
        ("script finished", False, False, False, ("server-closed", None, True)),
        ("mismatch (strict)", False, False, False, ("server-closed", "mismatch (strict)", True)),
        (
            "cut 5 bytes into the reply",
            True,
            False,
            False,
            ("fault", "cut 5 bytes into the reply", False),
        ),
        (
            "QUIT answered by a fault",
            False,
            True,
            False,
            ("fault", "QUIT answered by a fault", False),
        ),
        (
            "capture write failed: disk full",
            False,
            False,
            False,
            ("capture-error", "capture write failed: disk full", False),
        ),
        (
            "TLS handshake failed: x",
            False,
            False,
            False,
            ("client-tls-error", "TLS handshake failed: x", False),
        ),
        (
            "idle for 60 s",
            False,
            False,
            False,
            ("idle-timeout", "the client was idle for 60 s", False),
        ),
        ("connection lost", False, False, False, ("client-reset", "connection lost", False)),
        ("open", False, False, True, ("proxy-shutdown", None, False)),
        ("open", False, False, False, ("closed", None, False)),
    ],
)
def test_the_end_record_says_who_ended_the_session(
    ended: str, fault: bool, quit_acked: bool, cancelled: bool, expected: tuple[Any, ...]
) -> None:
    from popproxy.replay.fake import ConnectionReport
    from popproxy.replay.served import ending

    report = ConnectionReport(1, None, "peer", ended=ended, fault_ended=fault)
    end = ending(report, quit_acked, cancelled)
    assert (end.how, end.error, end.by_server) == expected


# ------------------------------------------------------------------ bytes


async def test_an_unfaulted_session_is_the_recording_byte_for_byte(
    capture: Path, tmp_path: Path
) -> None:
    lines = [data for d, data in SESSION if d == "c"]
    async with serving(capture, tmp_path / "out", "RETR 9: cut", "*: stall state=UPDATE") as (
        server,
        port,
        _,
    ):
        got = await run(raw_run, port, lines)
        [path] = await finished_captures(tmp_path / "out")
    recorded = b"".join(data for d, data in SESSION if d == "s")
    assert got == recorded
    recs = records(path)
    assert stream(recs, "s") == recorded  # the served bytes, as recorded
    assert stream(recs, "c") == b"".join(lines)  # the client's (PASS masked either way)
    assert not [r for r in recs if r.kind in (fmt.DROP, fmt.EVENT) or r.fields.get("p")]
    assert server.report.faults == []
    doc = read_json(path)
    assert doc["session"]["end"]["how"] == "quit"
    assert [ex["command"] for ex in doc["exchanges"][1:]] == [
        data.split()[0].decode() for data in lines
    ]
    assert {ex["reply_by"] for ex in doc["exchanges"]} == {"server"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_the_password_is_redacted(capture: Path, tmp_path: Path) -> None:
    async with serving(capture, tmp_path / "out") as (_, port, _):
        await run(poplib_run, port)
        [path] = await finished_captures(tmp_path / "out")
    raw = path.read_bytes()
    assert b"PASS secret" not in raw and b"PASS ######\r\n" in raw
    assert [r.fields["kind"] for r in records(path) if r.kind == fmt.REDACT] == ["PASS"]


# ------------------------------------------------------------------ each action, explained


@pytest.mark.parametrize(("how", "code"), [("", 0), ("rst", 56)])
async def test_curl_cut_mid_retr_is_popproxys_in_show_and_lint(
    tmp_path: Path, how: str, code: int
) -> None:
    capture = write_capture(tmp_path / "curl.popcap", CURL_SESSION)
    rule = f"RETR 1: cut after 300 {how}".strip()
    async with serving(capture, tmp_path / "out", rule) as (_, port, log):
        proc = await run(
            subprocess.run,
            ["curl", "-s", "-S", "--max-time", "10", "-u", "alice:x", f"pop3://127.0.0.1:{port}/1"],
            capture_output=True,
        )
        [path] = await finished_captures(tmp_path / "out")
    assert proc.returncode == code, proc.stderr
    recs = records(path)
    served = stream(recs, "s")
    assert served == b"".join(data for d, data in CURL_SESSION[:9] if d == "s")  # all recorded
    retr_at = served.index(RETR1)
    assert reached_client(recs) == served[: retr_at + 300]  # what curl got: cut at 300
    doc = read_json(path)
    [fault] = [e for e in doc["events"] if e.get("kind") == "fault"]
    [cut] = [e for e in doc["events"] if e.get("kind") == "fault-cut"]
    assert fault["rule"] == rule and fault["verb"] == "RETR" and fault["index"] == 1
    assert "withheld" in fault["detail"] and cut["how"] == (how or "fin")
    assert cut["offset"] == retr_at + 300
    [drop] = [e for e in doc["events"] if e.get("r") == "drop"]
    assert drop["off"] == retr_at + 300 and drop["len"] == len(RETR1) - 300
    assert doc["session"]["end"]["how"] == "fault" and rule in doc["session"]["end"]["error"]
    eofs = [r.fields for r in recs if r.kind == fmt.EOF]
    assert [(e["d"], e.get("by")) for e in eofs] == [("s", "popproxy"), ("c", "popproxy")]
    findings = lint(path)
    assert blamed(findings, "popproxy") == ["fault-by-popproxy"] * 2
    assert blamed(findings, "server") == []
    shown = subprocess.run(
        [sys.executable, "-m", "popproxy", "show", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    assert "fault-cut" in shown and f"popproxy did not forward {len(RETR1) - 300} octets" in shown
    assert any(f"recording to {path}" in line for line in log)


async def test_poplib_answer_is_popproxys_and_the_command_never_reached_the_server(
    capture: Path, tmp_path: Path
) -> None:
    async with serving(capture, tmp_path / "out", "PASS: -ERR [IN-USE] mailbox locked") as (
        _,
        port,
        _,
    ):
        got = await run(poplib_run, port)
        [path] = await finished_captures(tmp_path / "out")
    assert got["error"].args == (b"-ERR [IN-USE] mailbox locked",)
    recs = records(path)
    assert stream(recs, "s", own=True) == b"-ERR [IN-USE] mailbox locked\r\n"
    [drop] = [r.fields for r in recs if r.kind == fmt.DROP]
    c = stream(recs, "c")
    assert drop["d"] == "c" and c[drop["off"] : drop["off"] + drop["len"]] == b"PASS ######\r\n"
    assert "answered by popproxy" in drop["why"]
    doc = read_json(path)
    [pass_ex] = [ex for ex in doc["exchanges"] if ex["command"] == "PASS"]
    assert (pass_ex["status"], pass_ex["code"], pass_ex["reply_by"]) == (
        "-ERR",
        "IN-USE",
        "popproxy",
    )
    assert blamed(lint(path), "server") == []


async def test_greeting_replaced_and_exact_bare_lf_answer_are_not_the_servers(
    capture: Path, tmp_path: Path
) -> None:
    rules = ("greeting: -ERR [SYS/TEMP] too busy",)
    async with serving(capture, tmp_path / "g", *rules) as (_, port, _):
        assert await run(raw_run, port, []) == b"-ERR [SYS/TEMP] too busy\r\n"
        [path] = await finished_captures(tmp_path / "g")
    recs = records(path)
    assert reached_client(recs) == b"-ERR [SYS/TEMP] too busy\r\n"
    assert stream(recs, "s", own=False) == b"+OK fake ready\r\n"  # withheld, still recorded
    doc = read_json(path)
    # One exchange, the greeting the client got: popproxy's, the server's withheld.
    [greeting] = doc["exchanges"]
    assert greeting["reply_by"] == "popproxy" and greeting["status"] == "-ERR"
    assert greeting["withheld"]["status"] == "+OK"
    assert blamed(lint(path), "server") == []
    quoted = 'LIST: "+OK\\r\\n1 100\\n.\\r\\n"'  # popproxy's own bare LF
    async with serving(capture, tmp_path / "l", quoted, "STAT: corrupt bare-lf") as (_, port, _):
        await run(raw_run, port, [b"USER a\r\n", b"PASS b\r\n", b"STAT\r\n", b"LIST\r\n"])
        [path] = await finished_captures(tmp_path / "l")
    findings = lint(path)
    assert "bare-lf" not in blamed(findings, "server")
    assert blamed(findings, "popproxy") == ["fault-by-popproxy"] * 2
    recs = records(path)
    crs = [r.fields for r in recs if r.kind == fmt.DROP and "bare LF" in r.fields["why"]]
    assert len(crs) == 1 and stream(recs, "s")[crs[0]["off"]] == ord("\r")


async def test_stall_and_inactivity_close_are_recorded_where_they_struck(
    capture: Path, tmp_path: Path
) -> None:
    async with serving(capture, tmp_path / "out", "STAT: stall", "USER: inactivity 200ms") as (
        _,
        port,
        _,
    ):

        def stalled() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"USER alice\r\nPASS x\r\nSTAT\r\n")
                time.sleep(0.2)
                s.sendall(b"NOOP\r\n")  # read and ignored by the stalled server
                s.settimeout(0.3)
                got = b""
                with contextlib.suppress(TimeoutError):
                    while chunk := s.recv(100):
                        got += chunk
                return got

        before = await run(stalled)
        got = await run(_after_silence, port, b"USER alice\r\n", 0.5)
        first, second = await finished_captures(tmp_path / "out", 2)
    recs = records(first)
    [stall] = [r.fields for r in recs if r.kind == fmt.EVENT and r.fields["kind"] == "fault-stall"]
    s = stream(recs, "s")
    assert stall["offset"] == s.index(b"+OK 2 ")  # before STAT's reply, which was withheld
    assert reached_client(recs) == s[: stall["offset"]] == before
    assert b"+OK 2 " not in before
    assert stream(recs, "c") == b"USER alice\r\nPASS #\r\nSTAT\r\nNOOP\r\n"  # all the client sent
    assert read_json(first)["session"]["end"]["how"] == "fault"
    assert got == b"+OK fake ready\r\n+OK\r\n-ERR Disconnected for inactivity.\r\n"
    recs = records(second)
    own = [r for r in recs if r.kind == fmt.DATA and r.fields.get("p")]
    assert [r.data for r in own] == [b"-ERR Disconnected for inactivity.\r\n"]
    assert "inactivity" in str(own[0].fields["why"])
    kinds = [r.fields["kind"] for r in recs if r.kind == fmt.EVENT]
    assert kinds == ["fault", "fault-close"]
    assert [r.fields.get("by") for r in recs if r.kind == fmt.EOF and r.fields["d"] == "s"] == [
        "popproxy"
    ]


def _after_silence(port: int, line: bytes, wait: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        got = s.recv(100)
        s.sendall(line)
        time.sleep(wait)
        while chunk := s.recv(100):
            got += chunk
    return got


async def test_advertised_mechanism_and_its_refusal(capture: Path, tmp_path: Path) -> None:
    async with serving(capture, tmp_path / "out", "CAPA: advertise XOAUTH2") as (_, port, _):
        await run(raw_run, port, [b"CAPA\r\n", b"AUTH XOAUTH2 dG9rZW4=\r\n"])
        [path] = await finished_captures(tmp_path / "out")
    recs = records(path)
    own = [r.data for r in recs if r.kind == fmt.DATA and r.fields.get("p")]
    assert own == [b"SASL XOAUTH2\r\n", b"-ERR Unsupported authentication mechanism.\r\n"]
    assert stream(recs, "s", own=False) == b"+OK fake ready\r\n" + SESSION[2][1]
    [drop] = [r.fields for r in recs if r.kind == fmt.DROP]
    assert drop["d"] == "c" and drop["len"] == len(b"AUTH XOAUTH2 dG9rZW4=\r\n")
    assert b"dG9rZW4=" not in path.read_bytes()  # the initial response is a credential


async def test_seeded_chaos_gives_the_same_capture_twice(capture: Path, tmp_path: Path) -> None:
    shapes = []
    for n in range(2):
        out = tmp_path / f"run{n}"
        async with serving(capture, out, "*: -ERR chaos p=0.5 seed=11", seed=99) as (_, port, _):
            await run(raw_run, port, [b"CAPA\r\n", b"USER a\r\n", b"PASS b\r\n", b"STAT\r\n"] * 2)
            [path] = await finished_captures(out)
        shape = []
        for r in records(path):
            fields = {k: v for k, v in r.fields.items() if k not in ("t", "t0", "start")}
            fields = {k: v for k, v in fields.items() if k not in ("client", "listen", "upstream")}
            shape.append((r.kind, fields, r.data))
        shapes.append(shape)
    assert shapes[0] == shapes[1]
    assert any(kind == fmt.EVENT for kind, _, _ in shapes[0])


async def test_implicit_tls_is_recorded_decrypted(capture: Path, tmp_path: Path) -> None:
    async with serving(capture, tmp_path / "out", tls=True, ca_dir=tmp_path / "ca") as (
        server,
        port,
        _,
    ):
        cafile = str(server.config.certificate_authority().cert_path)

        def fetch() -> int:
            c = poplib.POP3_SSL(
                "127.0.0.1", port, timeout=5, context=ssl.create_default_context(cafile=cafile)
            )
            c.user("alice")
            c.pass_("x")
            count = int(c.stat()[0])
            c.quit()
            return count

        assert await run(fetch) == 2
        [path] = await finished_captures(tmp_path / "out")
    recs = records(path)
    tls = [r.fields for r in recs if r.kind == fmt.TLS]
    assert [(t["d"], t["leg"], t["mode"], t["off"]) for t in tls] == [
        ("c", "client", "implicit", 0),
        ("s", "client", "implicit", 0),
    ]
    assert stream(recs, "s").startswith(b"+OK fake ready\r\n+OK\r\n")
    assert read_json(path)["session"]["end"]["tls"] == ["client"]


async def test_curl_stls_and_sasl_login_keep_no_secret_on_disk(
    capture: Path, tmp_path: Path
) -> None:
    import base64

    from popproxy.replay.sources import load_mailbox

    sasl = [
        (d, b"+OK\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n" if i == 2 else x)
        for i, (d, x) in enumerate(SESSION)
    ]
    mailbox = load_mailbox([str(write_capture(tmp_path / "sasl.popcap", sasl))])
    rules = ("RETR 1: throttle 1MiB/s",)
    kw: dict[str, Any] = {"mailbox": mailbox, "ca_dir": tmp_path / "ca", "offer_stls": True}
    async with serving(tmp_path / "none", tmp_path / "out", *rules, **kw) as (server, port, _):
        cafile = str(server.config.certificate_authority().cert_path)
        got = await run(
            clients.curl_fetch,
            "127.0.0.1",
            port,
            "alice",
            "s3cretpw",
            mech="LOGIN",
            msg=1,
            tls="stls",
            cafile=cafile,
        )
        [path] = await finished_captures(tmp_path / "out")
    assert got == SESSION[12][1].split(b"\r\n", 1)[1][: -len(b".\r\n")].replace(b"\n..", b"\n.")
    raw = path.read_bytes()
    assert b"s3cretpw" not in raw and base64.b64encode(b"s3cretpw") not in raw
    recs = records(path)
    tls = [(r.fields["d"], r.fields["mode"]) for r in recs if r.kind == fmt.TLS]
    assert tls == [("c", "stls"), ("s", "stls")]
    assert [r.fields["identity"] for r in recs if r.kind == fmt.IDENTITY] == ["alice"]
    s = stream(recs, "s")
    assert s.count(RETR1) == 1 and reached_client(recs) == s  # throttled, nothing withheld
    assert blamed(lint(path), "server") == []


# ------------------------------------------------------------------ fetchmail, the mailbox


async def test_fetchmail_against_the_mailbox_cut_mid_retr(capture: Path, tmp_path: Path) -> None:
    from popproxy.replay.sources import load_mailbox

    mailbox = load_mailbox([str(capture)])
    async with serving(
        tmp_path / "none", tmp_path / "out", "RETR 2: cut after 10 rst", mailbox=mailbox
    ) as (_, port, _):
        with pytest.raises(clients.ClientError):
            await run(
                clients.fetchmail_fetch,
                "127.0.0.1",
                port,
                "alice",
                "x",
                workdir=tmp_path / "fm",
                keep=False,
            )
        [path] = await finished_captures(tmp_path / "out")
    doc = read_json(path)
    retr = [ex for ex in doc["exchanges"] if ex["command"] == "RETR"]
    assert [ex["args"] for ex in retr] == ["1", "2"]
    assert retr[0]["reply_by"] == "server" and retr[0]["status"] == "+OK"
    [cut] = [e for e in doc["events"] if e.get("kind") == "fault-cut"]
    assert cut["how"] == "rst"
    recs = records(path)
    s = stream(recs, "s")
    two = s.rindex(b"+OK", 0, cut["offset"])
    assert cut["offset"] == two + 10 and reached_client(recs) == s[: two + 10]
    with CaptureReader(path) as reader:
        assert reader.header["via"] == {"how": "serve", "mode": "mailbox", "played": None}
        assert reader.header["faults"] == ["RETR 2: cut after 10 rst"]
    assert blamed(lint(path), "server") == []


# ------------------------------------------------------------------ disk errors


async def test_an_unwritable_folder_refuses_the_client_in_one_line(
    capture: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    async with serving(capture, out) as (server, port, log):
        out.rmdir()
        out.write_bytes(b"")  # the folder became a file: nothing can be created in it
        got = await run(raw_run, port, [])
    assert got.startswith(b"-ERR [SYS/TEMP] popproxy cannot record this session: ")
    assert got.count(b"\r\n") == 1
    [line] = [x for x in log if "cannot create a capture file" in x]
    assert "\n" not in line
    assert server.report.unserved == [capture]  # the session was not used up


async def test_a_write_failure_stops_the_session(
    capture: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, pieces: list[bytes]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async with serving(capture, tmp_path / "out") as (server, port, log):
        monkeypatch.setattr(Recorder, "_write_fd", staticmethod(full))

        def slow() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                got = s.recv(100)
                time.sleep(0.3)  # the first flush fails meanwhile: the session stops
                with contextlib.suppress(OSError):
                    s.sendall(b"USER alice\r\n")
                    got += s.recv(100)
                return got

        got = await run(slow)
        await trio.sleep(0.1)
    assert got == b"+OK fake ready\r\n"  # nothing after the failure
    assert server.report.connections[0].ended == "capture write failed: disk full"
    assert any("#1 ended: capture write failed: disk full" in line for line in log), log


# ------------------------------------------------------------------ the command line


def test_cli_serve_out_writes_captures_show_and_lint_explain(capture: Path, tmp_path: Path) -> None:
    out = tmp_path / "served"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "popproxy", "serve", str(capture), "--listen", "127.0.0.1:0"),
            *("--out", str(out), "--fault", "RETR 1: -ERR [SYS/TEMP] not now"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        port = int(line.split()[-1].rsplit(":", 1)[1])
        got = poplib_run(port)
        assert got["error"].args == (b"-ERR [SYS/TEMP] not now",)
        deadline = time.monotonic() + 5
        while not list(out.glob("*.popcap")) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    assert f"recording every served session in {out}" in " ".join(stderr.split())
    [path] = out.glob("*.popcap")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    shown = subprocess.run(
        [sys.executable, "-m", "popproxy", "show", str(out)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert "popproxy: -ERR [SYS/TEMP] not now" in shown.stdout
    assert "popproxy serve, playing" in shown.stdout
    linted = subprocess.run(
        [sys.executable, "-m", "popproxy", "lint", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (
        '"direction": "popproxy"' in linted.stdout and '"direction": "server"' not in linted.stdout
    )


def test_cli_refuses_to_write_into_the_served_folder(capture: Path) -> None:
    folder = str(capture.parent)
    proc = subprocess.run(
        [sys.executable, "-m", "popproxy", "serve", folder, "--out", folder],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"popproxy serve: error: --out {folder}: that folder is being served; write elsewhere"
    ]


# ------------------------------------------------------------------ the pytest plugin

PLUGIN_TESTS = """
import poplib
import pytest
from popproxy.capture.reader import CaptureReader
from popproxy.inspect.document import capture_json

def login(pop3_server):
    c = poplib.POP3(pop3_server.host, pop3_server.port, timeout=5)
    c.user("alice")
    c.pass_("x")
    return c

@pytest.mark.pop3_capture("s.popcap", faults=["RETR 1: -ERR [SYS/TEMP] not now"],
                          allow_unplayed=True)
def test_faulted(pop3_server):
    c = login(pop3_server)
    with pytest.raises(poplib.error_proto):
        c.retr(1)
    c.quit()
    [path] = pop3_server.served_captures()
    with CaptureReader(path) as reader:
        doc = capture_json(reader)
    assert [e["kind"] for e in doc["events"] if e["r"] == "event"] == ["fault"]
    assert doc["session"]["end"]["how"] == "quit"

@pytest.mark.pop3_capture("s.popcap", allow_unplayed=True)
def test_clean(pop3_server):
    login(pop3_server).quit()

@pytest.mark.pop3_capture("s.popcap", allow_unplayed=True)
def test_fails(pop3_server):
    c = login(pop3_server)
    count = c.stat()[0]
    c.quit()
    assert count == 3, "the client misread STAT"

@pytest.mark.pop3_capture("s.popcap")
def test_unplayed(pop3_server):
    login(pop3_server).quit()
"""


def test_plugin_keeps_the_served_captures_of_failed_and_faulted_tests(
    pytester: pytest.Pytester, capture: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))  # this tree
    (pytester.path / "s.popcap").write_bytes(capture.read_bytes())
    pytester.makepyfile(test_served=PLUGIN_TESTS)
    kept = pytester.path / "kept" / "test_served"
    (kept / "test_fails").mkdir(parents=True)
    stale = write_capture(kept / "test_fails" / "20200101T000000.000000Z-00001.popcap", SESSION)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "--pop3-served-dir=kept")
    result.assert_outcomes(passed=3, failed=1, errors=1)  # test_unplayed fails at teardown
    assert sorted(p.name for p in kept.iterdir()) == ["test_fails", "test_faulted", "test_unplayed"]
    assert not stale.exists()  # a test's folder holds its latest run's captures only
    for name in ("test_fails", "test_faulted", "test_unplayed"):
        [path] = (kept / name).glob("*.popcap")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = result.stdout.str()
    assert "popproxy served sessions" in text  # the failed test's report section
    assert f"popproxy show {kept / 'test_fails'}" in text
    assert f"popproxy show {kept / 'test_unplayed'}" in text  # the teardown failure's message
