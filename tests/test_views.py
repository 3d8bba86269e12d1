"""Render functions and the live view, rendered into ``Console(file=io.StringIO(), width=100)``."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
from rich.text import Text

from popproxy.core import Direction, Observer
from popproxy.core.transcript import (
    Exchange,
    Item,
    MessageSummary,
    SessionSummary,
    TranscriptBuilder,
)
from popproxy.views import live, render
from popproxy.views.live import NORMAL, QUIET, VERBOSE, LiveView
from popproxy.views.theme import make_console

C, S = Direction.CLIENT, Direction.SERVER
SECRET = "hunter2-very-secret"

SESSION = [
    (S, b"+OK POP3 ready <1.2@host>\r\n"),
    (C, b"USER alice\r\n"),
    (S, b"+OK\r\n"),
    (C, f"PASS {SECRET}\r\n".encode()),
    (S, b"+OK Logged in.\r\n"),
    (C, b"RETR 1\r\n"),
    (
        S,
        b"+OK\r\nFrom: Carol Sender <carol@example.org>\r\nSubject: Quarterly numbers\r\n"
        b'Content-Type: application/pdf; name="q3.pdf"\r\n\r\n..stuffed\r\nsecond line\r\n.\r\n',
    ),
    (C, b"DELE 7\r\n"),
    (S, b"-ERR [SYS/PERM] no such message\r\n"),
    (C, b"AUTH PLAIN\r\n"),
    (S, b"+ \r\n"),
    (C, b"AGFsaWNlAGh1bnRlcjI=\r\n"),
    (S, b"-ERR [AUTH] already authenticated\r\n"),
    (S, b"\x00\x01garbage\r\n"),
    (C, b"QUIT\r\n"),
    (S, b"+OK bye\r\n"),
]


def items_of(session: list[tuple[Direction, bytes]], *, body_items: int = 0) -> list[Item]:
    obs = Observer()
    builder = TranscriptBuilder(body_items=body_items)
    items: list[Item] = []
    for i, (direction, data) in enumerate(session):
        items += builder.feed(i / 100, obs.receive_data(direction, data))
    return items


def console() -> tuple[io.StringIO, object]:
    buf = io.StringIO()
    return buf, make_console(file=buf, width=100)


def plain(text: Text) -> str:
    return text.plain


# --------------------------------------------------------------------------- render functions


def test_command_and_reply_lines() -> None:
    ex = Exchange(
        "command", 3, "RETR", "1", status="+OK", text="120 octets", t_sent=1.0, t_reply=1.0126
    )
    assert plain(render.command_line(ex)) == "    1.000s C: RETR 1"
    line = plain(render.reply_line(ex))
    assert line.startswith("    1.013s S: +OK 120 octets")
    assert "(12.6 ms)" in line
    err = Exchange(
        "command",
        4,
        "DELE",
        "9",
        status="-ERR",
        code="SYS/PERM",
        text="gone",
        t_sent=2.0,
        t_reply=2.5,
    )
    assert "S: -ERR [SYS/PERM] gone  (500.0 ms)" in plain(render.reply_line(err))
    none = Exchange("command", 5, "STAT", None, t_sent=3.0)
    assert "(no reply)" in plain(render.reply_line(none))
    greeting = Exchange("greeting", None, status="+OK", text="hello", t_reply=0.0, t_end=0.0)
    assert plain(render.reply_line(greeting)).endswith("+OK hello  greeting")


def test_tag_prefixes_the_line() -> None:
    ex = Exchange("command", 1, "NOOP", None, t_sent=0.5)
    assert plain(render.command_line(ex, Text("#12"))) == "#12     0.500s C: NOOP"


def test_masked_secret_is_shown_as_dots() -> None:
    items = items_of(SESSION)
    commands = [i.exchange for i in items if i.what == "command" and i.exchange is not None]
    pass_ex = next(ex for ex in commands if ex.command == "PASS")
    assert pass_ex.args == "#" * len(SECRET)
    line = render.command_line(pass_ex)
    assert plain(line).endswith("C: PASS " + "•" * len(SECRET))
    assert SECRET not in plain(line) and "#" not in plain(line)
    buf, con = console()
    con.print(line)  # type: ignore[attr-defined]
    assert SECRET not in buf.getvalue()


def test_sasl_lines_never_show_the_response() -> None:
    items = items_of(SESSION)
    sasl = [i for i in items if i.what == "sasl"]
    assert [i.detail["from"] for i in sasl] == ["server", "client"]
    client = plain(render.sasl_line(sasl[1].detail, sasl[1].t))
    assert "AGFsaWNl" not in client and "[SASL response, 20 octets]" in client
    cancel = plain(render.sasl_line({"from": "client", "line": "*", "cancel": True}, 0.0))
    assert "* (cancel)" in cancel


def test_folded_body_summary() -> None:
    items = items_of(SESSION)
    retr = next(
        i.exchange
        for i in items
        if i.what == "done" and i.exchange is not None and i.exchange.command == "RETR"
    )
    line = plain(render.reply_line(retr, folded=True))
    assert "⤷ 6 lines, 139 octets" in line
    assert "From: Carol Sender <carol@example.org>" in line
    assert "Subject: Quarterly numbers" in line
    assert "q3.pdf" in line
    assert "TRUNCATED" not in line
    assert "⤷" not in plain(render.reply_line(retr, folded=False))
    cut = Exchange(
        "command",
        1,
        "RETR",
        "1",
        status="+OK",
        multiline=True,
        body_lines=3,
        body_octets=1234,
        truncated=True,
        message=MessageSummary(subject="x"),
    )
    assert "3 lines, 1,234 octets TRUNCATED · Subject: x" in plain(render.body_summary(cut))


def test_anomaly_line() -> None:
    items = items_of(SESSION)
    anomalies = [i for i in items if i.what == "anomaly"]
    assert anomalies, "the garbage server line made no anomaly"
    line = plain(render.anomaly_line(anomalies[0].detail, anomalies[0].t))
    assert "⚠ " in line and "(server" in line
    record = {"kind": "command-too-long", "dir": "c", "seq": 4, "detail": "300 octets"}
    assert (
        plain(render.anomaly_line(record, 1.0))
        == "    1.000s ⚠ command-too-long (client, command #4) 300 octets"
    )


def test_session_end_line() -> None:
    summary = SessionSummary(
        user="alice", commands=7, anomalies=[{"kind": "x", "dir": "s", "seq": None}]
    )
    line = plain(render.session_end_line("quit", None, 1.5, summary, Text("#3")))
    assert line == "#3 session ended: quit after 1.50 s, 7 commands, user alice, 1 anomalies"
    err = plain(render.session_end_line("upstream-error", "refused", 0.01, SessionSummary()))
    assert "session ended: upstream-error" in err and "— refused" in err


def test_unsolicited_line_without_status_shows_its_text() -> None:
    ex = Exchange("unsolicited", None, status=None, text="\x00\x01garbage", t_reply=1.0, t_end=1.0)
    line = plain(render.reply_line(ex))
    assert "garbage" in line and "(no reply)" not in line


def test_tls_and_note_lines() -> None:
    line = plain(
        render.tls_line(
            {"leg": "client", "mode": "stls", "version": "TLSv1.3", "decrypted": False}, 2.0
        )
    )
    assert "TLS client ⇄ popproxy mode=stls version=TLSv1.3" in line and "passthrough" in line
    line = plain(
        render.tls_line(
            {"leg": "upstream", "mode": "implicit", "peer_issuer": "CN=Test CA", "verified": True},
            2.0,
        )
    )
    assert "TLS popproxy ⇄ server mode=implicit issuer=CN=Test CA verified" in line


# --------------------------------------------------------------------------- live view


def _live(mode: str) -> tuple[io.StringIO, LiveView]:
    buf = io.StringIO()
    return buf, LiveView(make_console(file=buf, width=100), mode=mode)


def _play(view: LiveView, items: list[Item], number: int = 1) -> None:
    view.started(number, "127.0.0.1:5000", "mail.example:110", Path("captures/x.popcap"))
    view.items(number, items)
    view.ended(number, "quit", None, 0.25, SessionSummary(user="alice", commands=5))


def test_live_view_normal() -> None:
    buf, view = _live(NORMAL)
    _play(view, items_of(SESSION))
    view.close(timeout=5)
    out = buf.getvalue()
    assert "#1 session from 127.0.0.1:5000 → mail.example:110" in out
    assert "C: USER alice" in out
    assert "C: PASS " + "•" * len(SECRET) in out
    assert SECRET not in out and "AGFsaWNl" not in out
    assert "S: -ERR [SYS/PERM] no such message" in out
    assert "⤷ 6 lines, 139 octets · From: Carol Sender <carol@example.org>" in out
    assert all(len(line) <= 100 for line in out.splitlines())  # long lines end in "…"
    assert "⚠" in out
    assert "..stuffed" not in out  # bodies are folded in normal mode
    assert "#1 session ended: quit" in out
    assert "\x1b[" not in out  # not a terminal: no escapes


def test_live_view_verbose_shows_bodies() -> None:
    buf, view = _live(VERBOSE)
    _play(view, items_of(SESSION, body_items=65536))
    view.close(timeout=5)
    out = buf.getvalue()
    assert ".stuffed" in out and "..stuffed" not in out  # unstuffed body text
    assert SECRET not in out


def test_live_view_quiet_shows_only_start_and_end() -> None:
    buf, view = _live(QUIET)
    _play(view, items_of(SESSION))
    view.failed(2, "127.0.0.1:6000", "cannot create a capture file")
    view.close(timeout=5)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert "session from" in lines[0] and "session ended: quit" in lines[1]
    assert "refused: cannot create a capture file" in lines[2]


class _Gate(io.StringIO):
    """A paused terminal: writes block until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.blocked = threading.Event()

    def write(self, s: str) -> int:
        self.blocked.set()
        self.gate.wait()
        return super().write(s)


def test_flooded_queue_drops_with_a_skipped_note() -> None:
    out = _Gate()
    view = LiveView(make_console(file=out, width=100))
    ex = Exchange("command", 1, "NOOP", None, t_sent=0.0)
    view.started(1, "p", "u", None)
    assert out.blocked.wait(5), "the renderer never printed"
    flood = live.MAX_QUEUE * 3
    t0 = time.monotonic()
    for _ in range(flood):
        view.items(1, [Item("command", 0.0, ex)])
    elapsed = time.monotonic() - t0
    view.ended(1, "quit", None, 1.0, SessionSummary())  # forced: never dropped
    assert elapsed < 2.0, "putting items blocked behind a paused terminal"
    out.gate.set()
    view.close(timeout=10)
    text = out.getvalue()
    assert "lines skipped" in text
    shown = text.count("C: NOOP")
    assert shown <= live.MAX_QUEUE + live.ConsoleSink.batch
    skipped = sum(
        int(word)
        for line in text.splitlines()
        if "lines skipped" in line
        for word in line.split()
        if word.isdigit()
    )
    assert shown + skipped == flood
    assert "session ended: quit" in text.splitlines()[-1] or "session ended: quit" in text


def test_renderer_process_draws_on_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    """``record`` renders in a child process (no GIL shared with the relay)."""
    view = LiveView.in_subprocess()
    ex = Exchange("command", 1, "PASS", "#########", t_sent=0.5)
    view.started(7, "127.0.0.1:5000", "pop.example:110", None)
    view.items(7, [Item("command", 0.5, ex)])
    view.ended(7, "quit", None, 1.0, SessionSummary(commands=1))
    view.close(timeout=20)
    out = capfd.readouterr().out
    assert "#7 session from 127.0.0.1:5000" in out
    assert "C: PASS" in out and "#########" not in out  # the secret shows as dots
    assert "session ended: quit" in out
