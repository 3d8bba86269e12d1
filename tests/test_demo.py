"""``popproxy demo``: offline, in seconds, leaves a capture and a hint; the packaged capture."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from popproxy.cli.demo import DEMO_PASSWORD
from popproxy.replay.script import load_session


def test_demo_runs_offline_and_writes_a_capture(tmp_path: Path) -> None:
    out = tmp_path / "caps"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "popproxy", "demo", "--out", str(out)],
        capture_output=True,
        timeout=20,
        cwd=tmp_path,
        env=dict(os.environ, NO_COLOR="1"),
    )
    elapsed = time.monotonic() - started
    text = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert elapsed < 20
    [capture] = list(out.glob("*.popcap"))
    assert "RETR 3" in text and "DELE 1" in text and "session ended: quit" in text
    assert "What next" in text and f"popproxy show {capture}" in text
    assert "popproxy serve" in text and "popproxy record --upstream" in text
    recorded = load_session(capture)
    assert [s.verb for s in recorded.steps] == [
        "CAPA",
        "USER",
        "PASS",
        "STAT",
        "LIST",
        "UIDL",
        "TOP",
        "RETR",
        "RETR",
        "RETR",
        "DELE",
        "QUIT",
    ]


def test_packaged_capture_is_scrubbed_and_redacted() -> None:
    ref = resources.files("popproxy").joinpath("data/demo.popcap")
    with resources.as_file(ref) as path:
        data = path.read_bytes()
        session = load_session(path)
    assert b"PASS ####\r\n" in data and b"PASS " + DEMO_PASSWORD.encode() not in data
    assert session.header["upstream"] == "pop.example.net:110"
    assert session.header["start"].startswith("2024-01-01")
    assert session.greeting is not None and b"@pop.example.net>" in session.greeting
    import socket

    assert socket.gethostname().encode() + b">" not in data
