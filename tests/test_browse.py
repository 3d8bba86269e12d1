"""popproxy browse driven by real key presses (Textual's Pilot) over real Dovecot sessions."""

from __future__ import annotations

import asyncio
import functools
import os
import poplib
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.browse.app import BrowseApp
from popproxy.browse.live import ProxyThread, QueueView
from popproxy.browse.rows import COLUMNS
from popproxy.browse.screens import HelpScreen, Lines, MessageScreen, RawScreen, SessionScreen
from popproxy.browse.session import mime_tree
from popproxy.browse.table import SessionTable
from popproxy.proxy.config import ProxyConfig
from tests.support import clients
from tests.support.dovecot import MSG_MULTIPART, USERS, DovecotServer
from tests.support.samples import record_samples
from tests.support.screens import screen_text

SIZE = (170, 40)


def on_asyncio(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Textual runs on asyncio; the suite's async tests run on trio: run this one apart."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


@pytest.fixture(scope="module")
def samples(dovecot: DovecotServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    for user in dovecot.users:
        dovecot.reset_mailbox(user)
    return record_samples(dovecot, tmp_path_factory.mktemp("browse"))


def _rows(app: BrowseApp) -> list[list[str]]:
    table = app.query_one(SessionTable)
    return [[cell.plain for cell in table.row_cells(i)] for i in range(table.row_count)]


def _column(name: str) -> int:
    return [title for _key, title in COLUMNS].index(name)


async def _type(pilot: Any, text: str) -> None:
    await pilot.press(*[{" ": "space"}.get(ch, ch) for ch in text])


async def _until(pilot: Any, condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the browser"
        await pilot.pause(0.05)


@pytest.mark.dovecot
@on_asyncio
async def test_list_shows_every_session_with_its_columns(samples: dict[str, Path]) -> None:
    app = BrowseApp([samples["alice"].parent])
    async with app.run_test(size=SIZE):
        rows = _rows(app)
        assert len(rows) == 3
        header = screen_text(app).splitlines()[0].split()
        assert header == [w for _k, t in COLUMNS for w in t.split()]
        by_user = {(r[_column("user")], r[_column("-ERR")]): r for r in rows}
        alice = by_user[("alice", "0")]
        assert alice[_column("cmds")] == "12"  # CAPA USER PASS STAT LIST UIDL TOP RETR×4 QUIT
        assert alice[_column("ended")] == "quit"
        assert alice[_column("TLS c/u")] == "-/-"
        assert alice[_column("S→C")].endswith("KiB")
        refused = by_user[("bob", "1")]
        assert refused[_column("cmds")] == "3"
        assert ("bob", "0") in by_user
        for row in rows:
            assert row[_column("upstream")].startswith("127.0.0.1:")


@pytest.mark.dovecot
@on_asyncio
async def test_browse_dir_shows_captures_as_they_appear(
    samples: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    folder = tmp_path / "watched"
    folder.mkdir()
    app = BrowseApp([folder], poll=0.1)
    async with app.run_test(size=SIZE) as pilot:
        assert _rows(app) == []
        shutil.copy(samples["bob"], folder / samples["bob"].name)
        await _until(pilot, lambda: len(_rows(app)) == 1)
        (folder / "not-yet.popcap").write_bytes(b"")  # a capture being created: skipped
        shutil.copy(samples["alice"], folder / samples["alice"].name)
        await _until(pilot, lambda: len(_rows(app)) == 2)
        assert sorted(r[_column("user")] for r in _rows(app)) == ["alice", "bob"]


@pytest.mark.dovecot
@on_asyncio
async def test_filter_key_selects_sessions(samples: dict[str, Path]) -> None:
    app = BrowseApp([samples["alice"].parent])
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f")
        await _type(pilot, "~u bob & !~e")
        await pilot.press("enter")
        await pilot.pause()
        assert [r[_column("cmds")] for r in _rows(app)] == ["8"]
        await pilot.press("f", "ctrl+u")
        await _type(pilot, "{~c PASS & ~e}")  # undecidable from the end record: scanned
        await pilot.press("enter")
        await _until(pilot, lambda: len(_rows(app)) == 1)
        assert _rows(app)[0][_column("-ERR")] == "1"
        await pilot.press("f", "ctrl+u")
        await _type(pilot, "~c RETR &")
        await pilot.press("enter")
        await pilot.pause()
        assert len(_rows(app)) == 1  # a bad filter changes nothing
        await pilot.press("f", "ctrl+u", "enter")  # empty: every session again
        await pilot.pause()
        assert len(_rows(app)) == 3


@pytest.mark.dovecot
@on_asyncio
async def test_command_line_filter(samples: dict[str, Path]) -> None:
    from popproxy.inspect.filter import parse

    app = BrowseApp([samples["alice"].parent], filter_expr=parse("~c RETR"))
    async with app.run_test(size=SIZE):
        assert [r[_column("user")] for r in _rows(app)] == ["alice"]


async def _open_alice(pilot: Any, app: BrowseApp, samples: dict[str, Path]) -> SessionScreen:
    table = app.query_one(SessionTable)
    index = table.index_of(str(samples["alice"]))
    assert index is not None
    table.move_cursor(index)
    await pilot.press("enter")
    await _until(pilot, lambda: isinstance(app.screen, SessionScreen) and app.screen.transcript)
    await pilot.pause()
    screen = app.screen
    assert isinstance(screen, SessionScreen)
    return screen


@pytest.mark.dovecot
@on_asyncio
async def test_opening_a_retr_shows_headers_and_attachments(
    samples: dict[str, Path], tmp_path: Path
) -> None:
    app = BrowseApp([samples["alice"].parent])
    async with app.run_test(size=SIZE) as pilot:
        screen = await _open_alice(pilot, app, samples)
        text = screen_text(app)
        assert "C: USER alice" in text and "C: PASS •••" in text  # the password stays masked
        assert "S: +OK Logged in." in text and "ms)" in text  # latencies shown
        await pilot.press("slash")
        await _type(pilot, "RETR 3")
        await pilot.press("enter")
        await pilot.pause()
        line = screen.current()
        assert line is not None and "RETR 3" in line.text.plain
        await pilot.press("enter")
        await _until(pilot, lambda: isinstance(app.screen, MessageScreen))
        message_screen = app.screen
        assert isinstance(message_screen, MessageScreen)
        headers = dict(message_screen.message.headers)
        assert headers["Subject"] == "Monthly report (with attachment)"
        assert [p.filename for p in message_screen.message.attachments] == ["report.pdf"]
        text = screen_text(app)
        assert "Monthly report (with attachment)" in text
        assert "report.pdf" in text and "multipart/mixed" in text and "application/pdf" in text
        os.chdir(tmp_path)
        await pilot.press("e")
        await pilot.press("enter")  # the proposed name
        await pilot.pause()
        written = list(tmp_path.glob("*.eml"))
        assert len(written) == 1
        assert written[0].read_bytes() == MSG_MULTIPART
        assert (written[0].stat().st_mode & 0o777) == 0o600
        await pilot.press("q")
        assert isinstance(app.screen, SessionScreen)


@pytest.mark.dovecot
@on_asyncio
async def test_session_keys_raw_view_exports_and_help(
    samples: dict[str, Path], tmp_path: Path
) -> None:
    app = BrowseApp([samples["alice"].parent])
    async with app.run_test(size=SIZE) as pilot:
        screen = await _open_alice(pilot, app, samples)
        listing = screen.query_one(Lines)
        await pilot.press("j", "j")
        assert listing.highlighted == 2
        await pilot.press("k")
        assert listing.highlighted == 1
        await pilot.press("G")
        assert listing.highlighted == len(screen.transcript.lines) - 1  # type: ignore[union-attr]
        await pilot.press("a")  # no anomalies in a clean Dovecot session: a notice, no move
        await pilot.press("b")
        await pilot.pause()
        raw = app.screen
        assert isinstance(raw, RawScreen)
        assert "CAPA\\r\\n" in screen_text(app)
        await pilot.press("m")
        await pilot.pause()
        assert "43 41 50 41 0d 0a" in screen_text(app)  # CAPA CR LF in hex
        await pilot.press("q")
        target = tmp_path / "alice.html"
        await pilot.press("w", "ctrl+u")
        await _type(pilot, str(target))
        await pilot.press("enter")
        await _until(pilot, target.exists)
        assert "RETR" in target.read_text()
        await pilot.press("y")
        await pilot.pause()
        assert any("popproxy show" in str(n.message) for n in app._notifications)
        await pilot.press("r")  # no terminal to hand over under the test driver: the command
        await pilot.pause()
        assert any(
            "popproxy replay" in str(n.message) and "--server 127.0.0.1:" in str(n.message)
            for n in app._notifications
        )
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        assert "filter sessions" in screen_text(app)
        await pilot.press("escape")
        await pilot.press("q")
        await pilot.pause()
        assert not isinstance(app.screen, SessionScreen)


@pytest.mark.dovecot
@on_asyncio
async def test_sorting_by_key_and_by_header_click(samples: dict[str, Path]) -> None:
    app = BrowseApp([samples["alice"].parent])
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(_column("cmds")):
            await pilot.press("o")
        assert [r[_column("cmds")] for r in _rows(app)] == ["3", "8", "12"]
        await pilot.press("O")
        assert [r[_column("cmds")] for r in _rows(app)] == ["12", "8", "3"]
        await pilot.click("#sessions", offset=(2, 0))  # the "start" header
        await pilot.pause()
        assert app.sort_column == 0


@pytest.mark.dovecot
@on_asyncio
async def test_live_mode_adds_a_session_while_poplib_runs(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    dovecot.reset_mailbox("alice")
    out = tmp_path / "live"
    out.mkdir()
    config = ProxyConfig(
        upstream=("127.0.0.1", dovecot.port), listen=("127.0.0.1", 0), out_dir=out, linger=0.2
    )
    view = QueueView()
    proxy = ProxyThread(config, view)
    host, port = proxy.start()[0]
    try:
        app = BrowseApp([out], live=view.queue, poll=0.1, banner="recording")
        async with app.run_test(size=SIZE) as pilot:
            assert _rows(app) == []
            client = poplib.POP3(host, port, timeout=10)
            try:
                client.user("alice")
                client.pass_(USERS["alice"])
                await _until(pilot, lambda: len(_rows(app)) == 1)
                await _until(pilot, lambda: _rows(app)[0][_column("ended")] == "running")
                client.stat()
                await _until(pilot, lambda: _rows(app)[0][_column("cmds")] == "3")
                assert _rows(app)[0][_column("user")] == "alice"
                client.quit()
            finally:
                client.close()
            await _until(pilot, lambda: _rows(app)[0][_column("ended")] == "quit")
            assert _rows(app)[0][_column("cmds")] == "4"
            clients.poplib_session(host, port, "alice", USERS["alice"], retrieve=False)
            await _until(pilot, lambda: len(_rows(app)) == 2)
    finally:
        proxy.stop()


def test_peer_text_is_escaped_in_every_view(tmp_path: Path) -> None:
    """A hostile server's status line and headers reach the screen as visible escapes."""
    from popproxy.browse.session import load_transcript
    from popproxy.escapes import is_unsafe
    from tests.support.fixture_captures import write_steps

    hostile = b"+OK \x1b]52;c;AAAA\x07 \x1b[2J\xc2\x9b31m\xe2\x80\xaetxt\r\n"
    path = write_steps(
        tmp_path / "hostile.popcap",
        [
            ("s", 0.0, b"+OK ready\r\n"),
            ("c", 0.01, b"USER \x1b[31malice\r\n"),
            ("s", 0.02, hostile),
        ],
    )
    lines = load_transcript(path).lines
    shown = "".join(line.text.plain for line in lines)
    assert "\\x1b]52;c;AAAA\\x07" in shown and "\\u202e" in shown
    assert not any(is_unsafe(ch) for ch in shown)


def test_mime_tree_streams_nested_parts(tmp_path: Path) -> None:
    body = (
        b"Content-Type: multipart/mixed; boundary=outer\r\n\r\npreamble\r\n--outer\r\n"
        b"Content-Type: multipart/alternative; boundary=inner\r\n\r\n--inner\r\n"
        b"Content-Type: text/plain\r\n\r\nhi\r\n--inner\r\nContent-Type: text/html\r\n\r\n"
        b"<p>hi</p>\r\n--inner--\r\n--outer\r\nContent-Type: image/png\r\n"
        b'Content-Disposition: attachment; filename="a.png"\r\n\r\nAAAA\r\n--outer--\r\n'
    )
    path = tmp_path / "m.eml"
    path.write_bytes(body)
    with path.open("rb") as f:
        parts = mime_tree(f)
    assert [(p.depth, p.content_type, p.filename) for p in parts] == [
        (0, "multipart/mixed", None),
        (1, "multipart/alternative", None),
        (2, "text/plain", None),
        (2, "text/html", None),
        (1, "image/png", "a.png"),
    ]


def test_other_commands_do_not_load_textual(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from popproxy.cli.main import main; "
        f"main(['list', '--json', {str(tmp_path)!r}]); "
        "print('textual' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["browse", "no/such/folder"], "no/such/folder: no such file or folder"),
        (["browse", "--poll", "0", "."], "--poll must be a positive number"),
        (["browse", "--filter", "~q", "."], "unknown operator ~q"),
    ],
)
def test_browse_usage_errors_are_one_line(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from popproxy.cli.main import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    assert code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_no_color_turns_colour_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    assert BrowseApp([tmp_path]).no_color
    monkeypatch.delenv("NO_COLOR")
    assert not BrowseApp([tmp_path]).no_color


@pytest.mark.dovecot
def test_record_browse_from_the_command_line(
    dovecot: DovecotServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``popproxy record --browse``: the relay runs beside the browser and feeds it."""
    from popproxy.cli.main import main

    dovecot.reset_mailbox("alice")
    out = tmp_path / "captures"
    seen: list[list[list[str]]] = []

    async def drive(app: BrowseApp) -> None:
        async with app.run_test(size=SIZE) as pilot:
            host, port = app.banner.split(" ")[1].rsplit(":", 1)
            await asyncio.to_thread(
                clients.poplib_session, host, int(port), "alice", USERS["alice"], retrieve=False
            )
            await _until(pilot, lambda: len(_rows(app)) == 1 and _rows(app)[0][10] == "quit")
            seen.append(_rows(app))

    monkeypatch.setattr(BrowseApp, "run", lambda self: asyncio.run(drive(self)))
    argv = ["record", "--upstream", f"127.0.0.1:{dovecot.port}", "--listen", "127.0.0.1:0"]
    assert main([*argv, "--out", str(out), "--browse"]) == 0
    assert seen and seen[0][0][_column("user")] == "alice"
    assert len(list(out.glob("*.popcap"))) == 1


def _reference_tree(data: bytes) -> list[tuple[int, str, str | None, int]]:
    """The MIME skeleton by plain line iteration: what the fast scanner must agree with."""
    import io

    from popproxy.browse import session

    f = io.BytesIO(data)
    root, boundary = session._describe(session._header_block(f), 0)
    parts, current = [root], root
    stack = [(boundary.encode("latin-1", "replace"), 0)] if boundary else []
    while line := f.readline(session.LINE_LIMIT):
        stripped = line.rstrip(b"\r\n")
        hit = next(
            (
                (i, stripped != b"--" + b)
                for i, (b, _d) in reversed(list(enumerate(stack)))
                if stripped in (b"--" + b, b"--" + b + b"--")
            ),
            None,
        )
        if hit is None:
            current.octets += len(line)
            continue
        index, closing = hit
        del stack[index + 1 :]
        if closing:
            stack.pop()
            current = parts[0]
            continue
        current, inner = session._describe(session._header_block(f), stack[index][1] + 1)
        parts.append(current)
        if inner:
            stack.append((inner.encode("latin-1", "replace"), stack[index][1] + 1))
    return [(p.depth, p.content_type, p.filename, p.octets) for p in parts]


_PIECES = [
    b"--b\r\n",
    b"--b--\r\n",
    b"--c\r\n",
    b"--c--\r\n",
    b"Content-Type: multipart/mixed; boundary=c\r\n",
    b'Content-Disposition: attachment; filename="x.bin"\r\n',
    b"\r\n",
    b"text line\r\n",
    b"-- not a boundary\r\n",
    b"--",
    b"x" * 70000,
    b"\n",
]


@settings(max_examples=60, deadline=None)
@given(
    body=st.lists(st.sampled_from(_PIECES), max_size=30),
    block=st.integers(min_value=16, max_value=4096),
)
def test_mime_scanner_agrees_with_line_iteration(body: list[bytes], block: int) -> None:
    import io

    from popproxy.browse import session

    data = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"".join(body)
    session._Lines.BLOCK = block
    try:
        fast = [
            (p.depth, p.content_type, p.filename, p.octets) for p in mime_tree(io.BytesIO(data))
        ]
    finally:
        session._Lines.BLOCK = 1 << 20
    assert fast == _reference_tree(data)


@pytest.fixture(scope="module")
def fixture_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.fixture_captures import build_folder

    folder = tmp_path_factory.mktemp("fixture-captures")
    build_folder(folder)
    return folder


@on_asyncio
async def test_sasl_is_decoded_and_masked_and_rows_answer_the_mouse(fixture_folder: Path) -> None:
    app = BrowseApp([fixture_folder])
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(SessionTable)
        plain = next(i for i, r in enumerate(_rows(app)) if r[_column("mech")] == "PLAIN")
        await pilot.click("#sessions", offset=(3, plain + 1))
        assert table.cursor == plain
        await pilot.click("#sessions", offset=(3, plain + 1))  # a second click opens
        await _until(pilot, lambda: isinstance(app.screen, SessionScreen) and app.screen.transcript)
        await pilot.pause()
        text = screen_text(app)
        assert "C: AUTH PLAIN" in text
        assert "[SASL response" in text or "•••" in text  # the credentials stay masked
        assert "alice-secret" not in text


def test_session_exports_by_suffix(fixture_folder: Path, tmp_path: Path) -> None:
    from popproxy.browse.actions import export_session
    from popproxy.fsutil import Exists

    capture = sorted(fixture_folder.glob("*.popcap"))[-1]
    assert "lines" in export_session(capture, tmp_path / "s.txt")
    assert "RETR 1" in (tmp_path / "s.txt").read_text()
    assert "packets" in export_session(capture, tmp_path / "s.pcap")
    assert (tmp_path / "s.pcap").read_bytes()[:4] in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4")
    with pytest.raises(ValueError, match=r"\.txt, \.html or \.pcap"):
        export_session(capture, tmp_path / "s.doc")
    with pytest.raises(Exists):
        export_session(capture, tmp_path / "s.txt")  # never over an existing file
