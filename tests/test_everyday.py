"""Everyday friction, each point as a user met it: serve's options and errors, list, stats."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import popproxy
from popproxy.capture import format as fmt
from popproxy.cli.main import main
from popproxy.core import Direction

DEMO = Path(popproxy.__file__).parent / "data" / "demo.popcap"


def test_serve_offers_no_client_side_tls_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--insecure" not in out and re.search(r"--ca\b(?!-)", out) is None
    assert "--ca-dir" in out and "--tls" in out


def test_serve_refuses_a_capture_with_nothing_to_play(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / f"empty{fmt.SUFFIX}"
    empty.write_bytes(fmt.encode_meta({"r": fmt.HEADER, "v": fmt.VERSION, "client": "test"}))
    assert main(["serve", str(empty), "--listen", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert "nothing to play" in err and str(empty) in err


def test_serve_tls_names_why_a_plaintext_client_failed(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "popproxy",
            "serve",
            str(DEMO),
            "--tls",
            "--timeout",
            "1",
            "--ca-dir",
            str(tmp_path / "ca"),
            "--listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        port = int(line.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.settimeout(10)
            assert sock.recv(100) == b""  # a plaintext client waits; popproxy gives up
        seen = ""
        while "ended" not in seen:
            seen += proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "TLS handshake failed: timed out" in seen
    assert "drop --tls" in seen


def test_list_names_each_capture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("a", "b"):
        shutil.copy(DEMO, tmp_path / f"{name}{fmt.SUFFIX}")
    assert main(["list", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"a{fmt.SUFFIX}" in out and f"b{fmt.SUFFIX}" in out


def test_stats_of_a_missing_folder_prints_no_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stats", str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "No such file" in captured.err or "no captures" in captured.err


def test_an_observer_bug_surfaces_instead_of_passing_for_a_damaged_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from popproxy.capture.events import replay_events
    from popproxy.capture.reader import CaptureReader
    from popproxy.core import Observer

    def broken(self: Observer, direction: object, data: bytes) -> list[object]:
        raise RuntimeError("observer bug")

    monkeypatch.setattr(Observer, "receive_data", broken)
    with CaptureReader(DEMO) as reader, pytest.raises(RuntimeError, match="observer bug"):
        list(replay_events(reader))


def test_a_record_with_an_unknown_direction_is_skipped(tmp_path: Path) -> None:
    from popproxy.capture.events import replay_events
    from popproxy.capture.reader import CaptureReader

    path = tmp_path / f"x{fmt.SUFFIX}"
    pieces = [fmt.encode_meta({"r": fmt.HEADER, "v": fmt.VERSION, "client": "test"})]
    pieces += fmt.encode_data(Direction.SERVER, 0.0, b"+OK hi\r\n")
    pieces.append(fmt.encode_meta({"r": fmt.EOF, "d": "x", "t": 0.1}))
    path.write_bytes(b"".join(pieces))
    with CaptureReader(path) as reader:
        events = [e for _r, _t, evs in replay_events(reader) for e in evs]
    assert events  # the greeting was read; the damaged EOF record was skipped


def _show(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "popproxy", "show", *args, str(DEMO)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_show_bodies_puts_each_status_line_before_its_body() -> None:
    lines = _show("--bodies")
    status = next(i for i, line in enumerate(lines) if "S: +OK 446 octets" in line)
    body = lines.index("Subject: Lines that need dot-stuffing")
    command = next(i for i, line in enumerate(lines) if line.endswith("C: RETR 2"))
    assert command < status < body
    assert "⤷ 17 lines" in lines[body + 15]  # the summary follows the body


def test_show_grep_brings_the_command_and_status_along() -> None:
    lines = _show("--bodies", "--grep", "single dot")
    assert [line.split("s ", 1)[-1] for line in lines[1:3]] == [
        "C: RETR 2",
        "S: +OK 446 octets  (0.2 ms)",
    ]
    assert lines[3:] == [".single dot at the start"]
    folded = _show("--grep", "Dot Tester")
    assert folded[1].endswith("C: RETR 2") and "⤷ 17 lines" in folded[2]
