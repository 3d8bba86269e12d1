"""Hostile peers: no byte a server or client sends reaches a terminal as a control.

A scripted server and client put terminal controls (CSI, OSC 8 links, OSC 52 clipboard
writes, DCS, C1, bidi overrides, invisible format characters) and rich markup into every
field popproxy shows; the session is recorded through the real proxy with a live view on
a forced terminal, then every command that shows it runs on a real pty.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pty
import re
import subprocess
import sys
import unicodedata
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy.proxy.config import ProxyConfig
from popproxy.proxy.server import serve_record
from popproxy.replay.fake import FakeServer, ServeConfig, serve_replay
from popproxy.replay.script import load_session
from popproxy.views import safe
from popproxy.views.live import LiveView
from popproxy.views.theme import make_console
from tests.support.scripted import ScriptedServer, dot_stuff

# Each payload goes into every field below; all of them are things a terminal acts on.
PAYLOADS = [
    "\x1b[2J\x1b[H",  # clear the screen
    "\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\",  # OSC 8 hyperlink
    "\x1b]52;c;aGFja2Vk\x07",  # OSC 52: write the clipboard
    "\x1bP+q544e\x1b\\",  # DCS request
    "\x9b31m\x9d0;title\x9c",  # C1 CSI, OSC, ST
    "\u202egnp.exe",  # right-to-left override
    "\u2066isolate\u2069",  # bidi isolates
    "zero\u200bwidth\ufeff",  # invisible format characters
    "bell\x07back\x08\x7fdel\x00nul",
    "line\u2028separator",
]
MARKUP = "[bold red]MARKUP[/] [link=https://evil.example]x[/link] :skull:"
ALL = "".join(PAYLOADS) + MARKUP
HOSTILE = ALL.encode("utf-8")
ENCODED_WORD = b"=?utf-8?b?" + base64.b64encode(HOSTILE) + b"?="  # RFC 2047
MESSAGE = (
    b"From: " + ENCODED_WORD + b" <evil@example.org>\r\n"
    b"Subject: " + HOSTILE + b" " + ENCODED_WORD + b"\r\n"
    b"Content-Type: text/plain\r\n\r\n" + HOSTILE + b"\r\n"
)
FIELDS = [
    "greeting",
    "reply text",
    "response code",
    "UIDL listing",
    "CAPA listing",
    "Subject (raw and RFC 2047)",
    "From",
    "message body",
    "USER name",
    "unknown command",
    "unsolicited line",
]
SGR = re.compile(rb"\x1b\[[0-9;]*m")  # the only escape sequence popproxy itself emits


def hostile_answer(line: bytes) -> bytes | None:
    verb = line.strip().split(b" ")[0].upper()
    if verb == b"QUIT":
        return None
    if verb == b"CAPA":
        return b"+OK caps\r\nUSER\r\nX-" + HOSTILE + b"\r\n.\r\n"
    if verb == b"UIDL":
        return b"+OK\r\n1 uid-" + HOSTILE + b"\r\n.\r\n"
    if verb == b"LIST":
        return b"+OK\r\n1 %d\r\n.\r\n" % len(MESSAGE)
    if verb == b"RETR":
        return b"+OK " + HOSTILE + b"\r\n" + dot_stuff(MESSAGE)
    if verb in (b"USER", b"PASS"):
        return b"+OK hello " + HOSTILE + b"\r\n"
    return b"-ERR [" + HOSTILE.replace(b" ", b"_") + b"] " + HOSTILE + b"\r\n"


CLIENT_LINES = [
    b"CAPA\r\n",
    b"USER " + HOSTILE + b"\r\n",
    b"PASS hunter22\r\n",
    b"X" + HOSTILE + b"\r\n",
    b"LIST\r\n",
    b"UIDL\r\n",
    b"RETR 1\r\n",
    b"QUIT\r\n",
]


def acts_on_terminal(ch: str) -> bool:
    """Controls, format characters (bidi among them), separators, surrogates, unassigned."""
    return unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp", "Cn")


def assert_terminal_safe(name: str, data: bytes) -> None:
    """Nothing but popproxy's own SGR styling may act on the terminal."""
    rest = SGR.sub(b"", data).decode("utf-8", "replace")
    bad = sorted({f"U+{ord(ch):04X}" for ch in rest if ch not in "\r\n" and acts_on_terminal(ch)})
    assert not bad, f"{name}: {bad} reached the terminal\n{rest[:2000]}"


def plain(data: bytes) -> str:
    """What a person reads: the output without popproxy's styling, lines unwrapped."""
    return SGR.sub(b"", data).decode("utf-8", "replace").replace("\r\n", "\n")


def run_on_pty(argv: list[str], cwd: Path, timeout: float = 60) -> bytes:
    """Run ``popproxy ARGV`` with stdout and stderr on a real pseudo-terminal."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "LINES": "50", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "popproxy", *argv],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        cwd=cwd,
        env=env,
    )
    os.close(slave)
    out = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout)
    os.close(master)
    return bytes(out)


async def hostile_client(port: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(10):
        await stream.receive_some(65536)
        for line in CLIENT_LINES:
            await stream.send_all(line)
            got = await stream.receive_some(65536)
            if line.startswith((b"CAPA", b"UIDL", b"LIST", b"RETR")):
                while not got.endswith(b"\r\n.\r\n"):
                    got += await stream.receive_some(65536)
        await stream.send_all(b"")
    await stream.aclose()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The hostile session through the proxy: (capture, live view output on a terminal)."""
    out_dir = tmp_path_factory.mktemp("hostile")
    screen = io.StringIO()

    async def main() -> None:
        server = ScriptedServer(greeting=b"+OK " + HOSTILE + b"\r\n", answer=hostile_answer)
        view = LiveView(make_console(screen, force_terminal=True, width=160), mode="verbose")
        config = ProxyConfig(
            upstream=("127.0.0.1", 0), listen=("127.0.0.1", 0), out_dir=out_dir, linger=0.1
        )
        async with trio.open_nursery() as nursery:
            config.upstream = ("127.0.0.1", await nursery.start(server.serve))
            addrs = await nursery.start(partial(serve_record, announce=False), config, view)
            await hostile_client(addrs[0][1])
            with trio.fail_after(10):
                while not any(b'"r":"end"' in p.read_bytes() for p in out_dir.glob("*.popcap")):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        view.close()

    trio.run(main)
    (path,) = out_dir.glob("*.popcap")
    return path, screen.getvalue()


def test_the_capture_holds_the_hostile_bytes(recorded: tuple[Path, str]) -> None:
    """Raw bytes are the record: the controls are in the file, so the checks below bite."""
    path, _ = recorded
    data = path.read_bytes()
    assert data.count(HOSTILE) >= 6
    assert b"\x1b]52;" in data and "\u202e".encode() in data


def test_live_view_escapes_every_control(recorded: tuple[Path, str]) -> None:
    _, screen = recorded
    shown = plain(screen.encode())
    assert "\\x1b[2J" in shown and "\\u202e" in shown and "\\x9b" in shown
    assert MARKUP in shown  # shown as typed, never interpreted
    assert_terminal_safe("live view", screen.encode())


COMMANDS = [
    ["show"],
    ["show", "--raw"],
    ["show", "--bodies"],
    ["show", "--errors"],
    ["list"],
    ["stats"],
    ["lint"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_commands_on_a_pty_escape_every_control(
    argv: list[str], recorded: tuple[Path, str]
) -> None:
    path, _ = recorded
    out = run_on_pty([*argv, str(path)], path.parent)
    assert b"Traceback" not in out
    assert SGR.search(out), "a pty gets colours: the terminal was detected"
    assert_terminal_safe(" ".join(argv), out)
    if argv in (["show"], ["show", "--bodies"]):
        text = plain(out)
        assert "\\x1b]52;" in text and "\\u202e" in text
        assert MARKUP.replace(" :skull:", "") in text.replace("\r\n", "")


def test_diff_on_a_pty(recorded: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = recorded
    other = tmp_path / "other.popcap"
    other.write_bytes(path.read_bytes().replace(b"uid-", b"UID-"))
    out = run_on_pty(["diff", str(path), str(other)], tmp_path)
    assert b"uid" in out.lower() and b"Traceback" not in out
    assert_terminal_safe("diff", out)


@pytest.mark.parametrize(
    "argv", [["show", "--json"], ["list", "--json"], ["stats", "--json"], ["lint", "--json"]]
)
def test_json_escapes_controls_and_stays_valid(argv: list[str], recorded: tuple[Path, str]) -> None:
    path, _ = recorded
    out = run_on_pty([*argv, str(path)], path.parent)
    assert_terminal_safe(" ".join(argv), out)
    doc = json.loads(out.decode().replace("\r\n", "\n"))
    if argv[0] == "show":
        assert ALL in doc["session"]["greeting"]  # escaped, not lost


def test_export_text_holds_no_raw_control(recorded: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = recorded
    target = tmp_path / "t.txt"
    out = run_on_pty(["export", str(path), "--text", str(target)], tmp_path)
    assert_terminal_safe("export output", out)
    text = target.read_bytes()
    assert "\\x1b]52;" in plain(text)
    assert_terminal_safe("export --text file", text)


def test_replay_on_a_pty_escapes_the_live_server(recorded: tuple[Path, str]) -> None:
    path, _ = recorded

    async def main() -> bytes:
        server = ScriptedServer(greeting=b"+OK " + HOSTILE[::-1] + b"\r\n", answer=hostile_answer)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            argv = ["replay", str(path), "--server", f"127.0.0.1:{port}", "--password", "pw"]
            out = await trio.to_thread.run_sync(run_on_pty, argv, path.parent)
            nursery.cancel_scope.cancel()
        return out

    out = trio.run(main)
    assert b"greeting" in out and b"Traceback" not in out
    assert_terminal_safe("replay", out)


async def test_serve_log_escapes_the_hostile_client(recorded: tuple[Path, str]) -> None:
    path, _ = recorded
    log = io.StringIO()
    config = ServeConfig([load_session(path)], listen=("127.0.0.1", 0))
    server = FakeServer(config, make_console(log, force_terminal=True, width=160).print)
    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[Any]) -> None:
            await serve_replay(config, None, announce=False, server=server, task_status=task_status)

        port = (await nursery.start(serve))[0][1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(10):
            await stream.receive_some(65536)
            for line in [b"USER " + HOSTILE[::-1] + b"\r\n", b"X" + HOSTILE + b"\r\n"]:
                await stream.send_all(line)
                await stream.receive_some(65536)
        await stream.aclose()
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    shown = log.getvalue()
    assert "near miss" in shown and "\\x1b]52;" in plain(shown.encode())
    assert_terminal_safe("serve log", shown.encode())


def test_safe_escapes_each_payload_and_keeps_markup_literal() -> None:
    for payload in PAYLOADS:
        escaped = safe.escape(payload)
        assert not any(acts_on_terminal(ch) for ch in escaped), payload
        assert escaped != payload
    assert safe.escape(MARKUP) == MARKUP
    assert safe.escape("naïve café 日本 ok\u00a0") == "naïve café 日本 ok\u00a0"
    assert safe.escape("a\tb\nc", safe.MULTI_LINE) == "a\tb\nc"
    assert safe.escape("a\tb\nc") == "a\\x09b\\x0ac"
    assert json.loads(safe.json_dumps({"k": ALL})) == {"k": ALL}
    assert not any(acts_on_terminal(ch) for ch in safe.json_dumps({"k": ALL}))


def test_inputs_counted() -> None:
    """The closing figures: how many hostile inputs these tests try."""
    assert len(PAYLOADS) == 10 and len(FIELDS) == 11


def test_progress_bar_escapes_a_hostile_file_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The progress bar's description is a file name: it is escaped, never markup."""
    from popproxy.views import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setattr(progress, "PROGRESS_MIN", 0)
    name = "\x1b]52;c;aGFja2Vk\x07\u202e[blink]x[red]y.popcap"
    path = tmp_path / name
    path.write_bytes(b"x" * 1000)
    with progress.ScanProgress("reading", [path]) as bar:
        update = bar.capture(path, 1000)
        assert update is not None
        update(500)
    shown = screen.getvalue()
    assert "\\x1b]52;" in shown and "\\u202e" in shown and "[blink]x[red]y" in shown
    assert "\x1b]52" not in shown and "\u202e" not in shown and "\x07" not in shown
