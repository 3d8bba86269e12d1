"""Fault rules in ``popproxy record`` in front of the real Dovecot: clients, bytes, captures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy.capture.reader import CaptureReader
from popproxy.faults import FaultSet, parse_rule
from popproxy.proxy.config import ProxyConfig
from tests.support import clients
from tests.support.dovecot import STANDARD_MESSAGES, USERS, DovecotServer
from tests.test_record_e2e import finished_captures, read_json, running_proxy

ALICE = "alice"
PW = USERS[ALICE]
pytestmark = pytest.mark.dovecot


def _config(d: DovecotServer, out: Path, *rules: str) -> ProxyConfig:
    faults = FaultSet([parse_rule(r) for r in rules], seed=5)
    return ProxyConfig(
        upstream=(d.host, d.port), listen=("127.0.0.1", 0), out_dir=out, linger=0.2, faults=faults
    )


def _curl(host: str, port: int) -> subprocess.CompletedProcess[bytes]:
    argv = ["curl", "--silent", "--show-error", "--max-time", "10", "--user", f"{ALICE}:{PW}"]
    return subprocess.run([*argv, f"pop3://{host}:{port}/1"], capture_output=True, timeout=20)


@pytest.mark.parametrize(("how", "code"), [("", 0), ("rst", 56)])
async def test_cut_mid_retr_is_recorded_as_popproxys(
    dovecot_clean: DovecotServer, tmp_path: Path, how: str, code: int
) -> None:
    config = _config(dovecot_clean, tmp_path, f"RETR 1: cut after 100 {how}")
    async with running_proxy(config) as (host, port):
        proc = await trio.to_thread.run_sync(_curl, host, port)
        [path] = await finished_captures(tmp_path)
    assert proc.returncode == code, proc.stderr
    assert len(proc.stdout) < len(STANDARD_MESSAGES[0])
    doc = read_json(path)
    kinds = [e.get("kind") or e["r"] for e in doc["events"]]
    assert "fault" in kinds and "fault-cut" in kinds
    cut = next(e for e in doc["events"] if e.get("kind") == "fault-cut")
    assert cut["how"] == (how or "fin") and "RETR 1: cut after 100" in cut["detail"]
    assert doc["session"]["end"]["how"] == "fault"
    with CaptureReader(path) as reader:
        records = list(reader.records())
    s_stream = b"".join(r.data or b"" for r in records if r.kind == "d" and r.fields["d"] == "s")
    drops = [r.fields for r in records if r.kind == "drop" and r.fields["d"] == "s"]
    reached = bytearray(s_stream)
    for d in sorted(drops, key=lambda f: -f["off"]):
        del reached[d["off"] : d["off"] + d["len"]]
    # What reached the client ends exactly 100 bytes into RETR's reply.
    retr_at = s_stream.index(b"+OK", s_stream.index(b"\r\n.\r\n") + 5)  # after CAPA
    retr_at = s_stream.rindex(b"\r\n+OK", 0, cut["offset"]) + 2
    assert cut["offset"] == retr_at + 100
    assert len(reached) == cut["offset"]
    shown = subprocess.run(
        [sys.executable, "-m", "popproxy", "show", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    assert "fault-cut" in shown and "RETR 1: cut after 100" in shown
    assert "popproxy did not forward" in shown


@pytest.mark.parametrize(
    "rules",
    [
        [f"RETR {n}: cut after 1" for n in range(100, 200)],
        ["STAT: delay 100ms", "TOP: throttle 64KiB/s", "NOOP: stall"],
    ],
    ids=["100-idle-rules", "delay-and-throttle"],
)
async def test_everything_not_cut_keeps_every_byte(
    dovecot_clean: DovecotServer, tmp_path: Path, rules: list[str]
) -> None:
    direct = await trio.to_thread.run_sync(
        lambda: clients.poplib_session(dovecot_clean.host, dovecot_clean.port, ALICE, PW)
    )
    async with running_proxy(_config(dovecot_clean, tmp_path, *rules)) as (host, port):
        through: Any = await trio.to_thread.run_sync(
            lambda: clients.poplib_session(host, port, ALICE, PW)
        )
        [path] = await finished_captures(tmp_path)
    through.pop("welcome"), direct.pop("welcome")  # the APOP timestamp is per connection
    assert through == direct
    faults = [e for e in read_json(path)["events"] if str(e.get("kind", "")).startswith("fault")]
    assert len(faults) == (0 if len(rules) == 100 else 2)  # STAT delayed, TOP throttled


async def test_fetchmail_keeps_mail_after_a_cut(
    dovecot_clean: DovecotServer, tmp_path: Path
) -> None:
    (tmp_path / "caps").mkdir()
    config = _config(dovecot_clean, tmp_path / "caps", "RETR 2: cut after 50 rst")
    async with running_proxy(config) as (host, port):
        with pytest.raises(clients.ClientError):
            await trio.to_thread.run_sync(
                lambda: clients.fetchmail_fetch(
                    host, port, ALICE, PW, workdir=tmp_path / "fm", keep=False
                )
            )
        await finished_captures(tmp_path / "caps")
    count = await trio.to_thread.run_sync(
        lambda: len(
            clients.poplib_session(dovecot_clean.host, dovecot_clean.port, ALICE, PW)["messages"]
        )
    )
    assert count == len(STANDARD_MESSAGES)  # the cut session never reached UPDATE


async def test_delay_and_stall_and_inactivity(dovecot_clean: DovecotServer, tmp_path: Path) -> None:
    config = _config(dovecot_clean, tmp_path, "STAT: delay 300ms", "NOOP: inactivity 100ms")
    async with running_proxy(config) as (host, port):

        def run() -> tuple[float, bytes]:
            import poplib
            import time

            c = poplib.POP3(host, port, timeout=5)
            c.user(ALICE)
            c.pass_(PW)
            t0 = time.monotonic()
            c.stat()
            took = time.monotonic() - t0
            c.noop()
            time.sleep(0.5)
            return took, c.sock.recv(200)

        took, unsolicited = await trio.to_thread.run_sync(run)
        [path] = await finished_captures(tmp_path)
    assert took >= 0.3
    assert unsolicited == b"-ERR Disconnected for inactivity.\r\n"
    doc = read_json(path)
    assert doc["session"]["end"]["how"] == "fault"
    assert any(e.get("kind") == "fault-close" for e in doc["events"])


async def test_answer_instead_of_the_server(dovecot_clean: DovecotServer, tmp_path: Path) -> None:
    import poplib

    config = _config(dovecot_clean, tmp_path, "PASS: -ERR [IN-USE] mailbox locked")
    async with running_proxy(config) as (host, port):

        def run() -> bytes:
            c = poplib.POP3(host, port, timeout=5)
            c.user(ALICE)
            try:
                c.pass_(PW)
            except poplib.error_proto as exc:
                return bytes(exc.args[0])
            finally:
                c.close()
            return b"no error"

        said = await trio.to_thread.run_sync(run)
        [path] = await finished_captures(tmp_path)
    assert said == b"-ERR [IN-USE] mailbox locked"
    with CaptureReader(path) as reader:
        records = list(reader.records())
    own = [r.data for r in records if r.kind == "d" and r.fields.get("p")]
    assert own == [b"-ERR [IN-USE] mailbox locked\r\n"]  # popproxy's, not the server's
    [drop] = [r.fields for r in records if r.kind == "drop"]
    assert drop["d"] == "c" and "answered by popproxy" in drop["why"]
    doc = read_json(path)
    [pass_ex] = [ex for ex in doc["exchanges"] if ex["command"] == "PASS"]
    assert pass_ex["status"] == "-ERR" and pass_ex["code"] == "IN-USE"
    assert pass_ex["reply_by"] == "popproxy"  # three actors: never the server's
    assert any(e.get("kind") == "fault" for e in doc["events"])


def _shape_of(path: Path) -> dict[str, object]:
    """A capture without its times, addresses and read sizes (how the kernel cut the bytes
    into chunks varies from run to run): each stream's bytes with popproxy's spans, and
    every drop, event and the end, in order."""
    streams: dict[str, bytes] = {"c": b"", "s": b""}
    own: list[tuple[str, int, int]] = []
    meta: list[tuple[str, object]] = []
    with CaptureReader(path) as reader:
        for r in reader.records():
            fields = {k: v for k, v in r.fields.items() if k not in ("t", "addr")}
            if r.kind == "d" and r.data is not None:
                d = str(fields["d"])
                if fields.get("p"):
                    own.append((d, len(streams[d]), len(r.data)))
                streams[d] += r.data
            elif r.kind == "end":
                meta.append(("end", {k: fields.get(k) for k in ("how", "error", "octets")}))
            elif r.kind != "popproxy-capture":
                meta.append((r.kind, fields))
    # The APOP timestamp in the greeting differs per connection: compare the rest.
    greeting = streams["s"].index(b"\r\n") + 2
    return {"c": streams["c"], "s": streams["s"][greeting:], "own": own, "meta": meta}


async def test_seeded_probability_gives_identical_captures(
    dovecot_clean: DovecotServer, tmp_path: Path
) -> None:
    rules = ("*: delay 5ms p=0.5 seed=21", "RETR: cut after 200 p=0.4 seed=3")
    shapes = []
    for run in range(2):
        out = tmp_path / str(run)
        out.mkdir()
        async with running_proxy(_config(dovecot_clean, out, *rules)) as (host, port):

            def session() -> None:
                import poplib

                c = poplib.POP3(host, port, timeout=5)
                c.user(ALICE)
                c.pass_(PW)
                try:
                    for n in range(1, len(STANDARD_MESSAGES) + 1):
                        c.retr(n)
                    c.quit()
                except (poplib.error_proto, OSError):
                    pass
                c.close()

            await trio.to_thread.run_sync(session)
            [path] = await finished_captures(out)
        shapes.append(_shape_of(path))
    assert shapes[0] == shapes[1]
    meta = shapes[0]["meta"]
    assert isinstance(meta, list)
    assert any(kind == "event" and f.get("kind") == "fault" for kind, f in meta)


async def test_getmail_reports_a_reset_mid_retr(
    dovecot_clean: DovecotServer, tmp_path: Path
) -> None:
    (tmp_path / "caps").mkdir()
    config = _config(dovecot_clean, tmp_path / "caps", "RETR 1: cut after 100 rst")
    async with running_proxy(config) as (host, port):
        with pytest.raises(clients.ClientError, match="getmail failed"):
            await trio.to_thread.run_sync(
                lambda: clients.getmail_fetch(host, port, ALICE, PW, workdir=tmp_path / "gm")
            )
        [path] = await finished_captures(tmp_path / "caps")
    assert read_json(path)["session"]["end"]["how"] == "fault"


async def test_greeting_replaced(dovecot_clean: DovecotServer, tmp_path: Path) -> None:
    import socket

    config = _config(dovecot_clean, tmp_path, "greeting: -ERR [SYS/TEMP] too busy")
    async with running_proxy(config) as (host, port):

        def greeting() -> bytes:
            with socket.create_connection((host, port), timeout=5) as s:
                return s.recv(200)

        got = await trio.to_thread.run_sync(greeting)
        [path] = await finished_captures(tmp_path)
    assert got == b"-ERR [SYS/TEMP] too busy\r\n"
    with CaptureReader(path) as reader:
        records = list(reader.records())
    own = [r.data for r in records if r.kind == "d" and r.fields.get("p")]
    assert own == [b"-ERR [SYS/TEMP] too busy\r\n"]
    withheld = [r.fields for r in records if r.kind == "drop" and r.fields["d"] == "s"]
    assert withheld and withheld[0]["off"] == 0  # the server's greeting never reached the client
