"""The ``popproxy`` command line, run as a subprocess: exit codes, one-line errors, outputs."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from popproxy import __version__
from popproxy.capture import format as fmt
from popproxy.capture.reader import CaptureReader
from popproxy.core import Direction
from tests.support import captures

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "show.schema.json").read_text())
TIMEOUT = 20
ANSI = re.compile(r"\x1b\[")
C, S = Direction.CLIENT, Direction.SERVER


def popproxy(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "popproxy", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=full_env,
        cwd=cwd or ROOT,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "error" in lines[0]


# --------------------------------------------------------------------------- capture fixtures

SESSION = [
    (S, b"+OK POP3 ready <1896.697170952@dbc.mtview.ca.us>\r\n"),
    (C, b"CAPA\r\n"),
    (S, b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n"),
    (C, b"AUTH PLAIN\r\n"),
    (S, b"+ \r\n"),
    (C, b"AGFsaWNlAGFsaWNlLXNlY3JldA==\r\n"),
    (S, b"+OK Logged in.\r\n"),
    (C, b"RETR 1\r\n"),
    (
        S,
        b"+OK 96 octets\r\nFrom: Carol <carol@example.org>\r\nSubject: Hi there\r\n\r\n"
        b"..dotted line\r\nbody\r\n.\r\n",
    ),
    (C, b"DELE 9\r\n"),
    (S, b"-ERR [SYS/PERM] no such message\r\n"),
    (C, b"QUIT\r\n"),
    (S, b"+OK bye\r\n"),
]


def make_capture(
    path: Path,
    session: list[tuple[Direction, bytes]],
    *,
    keep_secrets: bool = False,
    end: bool = True,
) -> Path:
    header = {"session": 1, "client": "127.0.0.1:5", "upstream": "x:110"}
    return captures.make_capture(
        path, captures.timed(session), header, keep_secrets=keep_secrets, end=end
    )


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    return make_capture(tmp_path / "s.popcap", SESSION)


# --------------------------------------------------------------------------- basics


def test_version() -> None:
    proc = popproxy("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"popproxy {__version__}"


@pytest.mark.parametrize(
    "upstream", ["nohost", "host:99999", "[::1", "::1:110", "host:abc", ":110", "host:0"]
)
def test_record_bad_upstream(tmp_path: Path, upstream: str) -> None:
    proc = popproxy("record", "--upstream", upstream, "--out", str(tmp_path))
    assert_one_line_error(proc)
    assert "popproxy record: error:" in proc.stderr


def test_record_unusable_out(tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_text("not a folder")
    proc = popproxy(
        "record",
        "--upstream",
        "127.0.0.1:110",
        "--out",
        str(regular / "sub"),
        "--listen",
        "127.0.0.1:0",
    )
    assert_one_line_error(proc)
    assert "cannot write captures" in proc.stderr


def test_record_port_in_use(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = popproxy(
            "record",
            "--upstream",
            "127.0.0.1:110",
            "--out",
            str(tmp_path),
            "--listen",
            f"127.0.0.1:{port}",
            "--quiet",
        )
    assert_one_line_error(proc)


class _TinyServer:
    """Greets and answers +OK to each line, in threads: the upstream for subprocess tests."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        # A peer may reset instead of closing (popproxy stopped by SIGINT mid-session).
        with conn, contextlib.suppress(OSError):
            conn.sendall(b"+OK tiny\r\n")
            buf = b""
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    _, _, buf = buf.partition(b"\n")
                    conn.sendall(b"+OK\r\n")


@pytest.fixture
def tiny_server() -> Iterator[_TinyServer]:
    server = _TinyServer()
    yield server
    server.sock.close()


def _readline(stream: object, timeout: float) -> str:
    fd = stream.fileno()  # type: ignore[attr-defined]
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "popproxy record printed nothing in time"
    return stream.readline()  # type: ignore[attr-defined,no-any-return]


def test_record_announces_and_stops_on_sigint(tmp_path: Path, tiny_server: _TinyServer) -> None:
    out = tmp_path / "caps"
    env = {k: v for k, v in os.environ.items() if k != "FORCE_COLOR"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "popproxy",
            "record",
            "--upstream",
            f"127.0.0.1:{tiny_server.port}",
            "--listen",
            "127.0.0.1:0",
            "--out",
            str(out),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        line = _readline(proc.stdout, TIMEOUT)
        match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", line)
        assert match, line
        port = int(match.group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
            assert client.recv(100) == b"+OK tiny\r\n"
            client.sendall(b"NOOP\r\n")
            assert client.recv(100) == b"+OK\r\n"
            time.sleep(0.2)  # the session is open while popproxy is told to stop
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
            client.settimeout(5)
            assert client.recv(100) == b""  # the session was closed, not left hanging
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    all_stdout = line + stdout
    assert len(re.findall(r"^listening on ", all_stdout, re.M)) == 1
    (path,) = out.glob("*.popcap")
    with CaptureReader(path) as reader:
        end = reader.end()
        assert reader.warnings == []
    assert end is not None and end["how"] == "proxy-shutdown"
    assert end["commands"] == 1


# --------------------------------------------------------------------------- show


def test_show_missing_file(tmp_path: Path) -> None:
    proc = popproxy("show", str(tmp_path / "nope.popcap"))
    assert_one_line_error(proc)


def test_show_not_a_capture(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello\nworld\n")
    proc = popproxy("show", str(path))
    assert_one_line_error(proc)
    assert "not a popproxy capture" in proc.stderr


def test_show_newer_version(tmp_path: Path) -> None:
    path = tmp_path / "v2.popcap"
    path.write_bytes(fmt.encode_meta({"r": fmt.FORMAT_NAME, "v": "2.0"}))
    proc = popproxy("show", str(path))
    assert_one_line_error(proc)
    assert "newer" in proc.stderr and "2.0" in proc.stderr


def test_show_text(capture: Path) -> None:
    proc = popproxy("show", str(capture))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "C: CAPA" in out and "C: RETR 1" in out and "C: QUIT" in out
    assert "-ERR [SYS/PERM] no such message" in out
    assert "AGFsaWNl" not in out and "alice-secret" not in out
    assert "Subject: Hi there" in out
    assert not ANSI.search(out)


def _validate(doc: dict[str, object]) -> None:
    jsonschema.validate(doc, SCHEMA, cls=jsonschema.Draft202012Validator)


def test_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_show_json_validates(capture: Path, tmp_path: Path) -> None:
    rng = random.Random(7)
    garbage = [
        (S, bytes(rng.randrange(256) for _ in range(3000))),
        (C, b"CAPA\r\nLIST\r\n"),
        (S, bytes(rng.randrange(256) for _ in range(3000))),
    ]
    paths = [
        capture,
        make_capture(tmp_path / "garbage.popcap", garbage),
        make_capture(tmp_path / "open.popcap", SESSION[:9], end=False),  # crashed mid-session
        make_capture(tmp_path / "kept.popcap", SESSION, keep_secrets=True),
    ]
    proc = popproxy("show", "--json", *map(str, paths))
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(docs) == len(paths)
    for doc in docs:
        _validate(doc)
    main = docs[0]
    assert [(ex["command"], ex["status"]) for ex in main["exchanges"]] == [
        (None, "+OK"),
        ("CAPA", "+OK"),
        ("AUTH", "+OK"),
        ("RETR", "+OK"),
        ("DELE", "-ERR"),
        ("QUIT", "+OK"),
    ]
    assert main["session"]["user"] == "alice" and main["session"]["mechanism"] == "PLAIN"
    (dele,) = [ex for ex in main["exchanges"] if ex["command"] == "DELE"]
    assert dele["code"] == "SYS/PERM"
    assert "AGFsaWNl" not in proc.stdout
    assert docs[1]["anomalies"]
    assert docs[2]["session"]["end"] is None
    retr = [ex for ex in docs[2]["exchanges"] if ex["command"] == "RETR"]
    assert retr and retr[0]["body_octets"] is not None


def test_show_json_mixed_good_and_bad(capture: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.popcap"
    bad.write_text("nope\n")
    proc = popproxy("show", "--json", str(capture), str(bad))
    assert proc.returncode == 2
    assert len(proc.stdout.splitlines()) == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- export


def test_export_streams(tmp_path: Path) -> None:
    capture = make_capture(tmp_path / "k.popcap", SESSION, keep_secrets=True)
    out = tmp_path / "streams"
    proc = popproxy("export", str(capture), "--streams", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "client.bin").read_bytes() == b"".join(d for w, d in SESSION if w is C)
    assert (out / "server.bin").read_bytes() == b"".join(d for w, d in SESSION if w is S)


def test_export_streams_redacted_warns(capture: Path, tmp_path: Path) -> None:
    out = tmp_path / "streams"
    proc = popproxy("export", str(capture), "--streams", str(out))
    assert proc.returncode == 0, proc.stderr
    client = (out / "client.bin").read_bytes()
    truth = b"".join(d for w, d in SESSION if w is C)
    assert len(client) == len(truth) and b"AGFsaWNl" not in client
    assert "redacted" in proc.stderr


def test_export_needs_a_what(capture: Path) -> None:
    assert_one_line_error(popproxy("export", str(capture)))


# --------------------------------------------------------------------------- colour


def _run_in_pty(args: list[str], env: dict[str, str]) -> str:
    """Run popproxy with stdout on a terminal (where rich would colour); return its output."""
    master, slave = pty.openpty()
    full_env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    full_env.update(env, TERM="xterm-256color", COLUMNS="100")
    proc = subprocess.Popen(
        [sys.executable, "-m", "popproxy", *args],
        stdout=slave,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=full_env,
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_terminal_output_is_coloured(capture: Path) -> None:
    out = _run_in_pty(["show", str(capture)], {})
    assert ANSI.search(out), "no colour on a terminal: the NO_COLOR test below proves nothing"


def test_no_color_means_no_escapes(capture: Path) -> None:
    out = _run_in_pty(["show", str(capture)], {"NO_COLOR": "1"})
    assert "CAPA" in out
    assert not ANSI.search(out), repr(out[:300])


def test_no_color_pipe(capture: Path) -> None:
    proc = popproxy("show", str(capture), env={"NO_COLOR": "1"})
    assert proc.returncode == 0 and not ANSI.search(proc.stdout + proc.stderr)


@pytest.mark.parametrize("flag", ["--idle-timeout", "--connect-timeout"])
def test_record_refuses_a_timeout_that_is_not_a_number(flag: str, tmp_path: Path) -> None:
    result = popproxy(
        "record",
        "--upstream",
        "127.0.0.1:110",
        "--listen",
        "127.0.0.1:0",
        "--out",
        str(tmp_path),
        flag,
        "nan",
    )
    assert result.returncode == 2
    assert "must be a positive number" in result.stderr and "Traceback" not in result.stderr


def test_show_names_itself_in_errors_even_with_command_filter(tmp_path: Path) -> None:
    result = popproxy("show", "--command", "RETR", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("popproxy show: error: no captures in")
