"""Output that is not a terminal is never cut or wrapped; on a terminal, identifiers wrap."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

from rich.console import Console

import popproxy
from popproxy.views.live import ConsoleSink
from popproxy.views.theme import THEME

DEMO = Path(popproxy.__file__).parent / "data" / "demo.popcap"


def _popproxy(*args: str, env: dict[str, str] | None = None) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    environ.update(env or {})
    done = subprocess.run(
        [sys.executable, "-m", "popproxy", *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_show_through_a_pipe_keeps_whole_lines(tmp_path: Path) -> None:
    deep = tmp_path / ("folder-with-a-long-name-" * 6) / "session.popcap"
    deep.parent.mkdir(parents=True)
    shutil.copy(DEMO, deep)
    out = _popproxy("show", str(deep))
    lines = out.splitlines()
    assert any(str(deep) in line for line in lines), out[:500]
    # The greeting's APOP timestamp and the CAPA summary survive whole, on one line each.
    greeting = next(line for line in lines if "Dovecot (Debian) ready." in line)
    assert greeting.rstrip().endswith("@pop.example.net>") or "@pop.example.net>" in greeting
    assert "…" not in out


def test_list_through_a_pipe_keeps_whole_lines(tmp_path: Path) -> None:
    deep = tmp_path / ("folder-with-a-long-name-" * 6)
    deep.mkdir()
    shutil.copy(DEMO, deep / "session.popcap")
    out = _popproxy("list", str(deep))
    assert "…" not in out
    row = next(line for line in out.splitlines() if "demo" in line)
    assert "→" in row and len(row.split()) >= 8


def _sink(width: int) -> tuple[ConsoleSink, io.StringIO]:
    buffer = io.StringIO()
    console = Console(file=buffer, theme=THEME, width=width, force_terminal=True, color_system=None)
    return ConsoleSink(console, "normal"), buffer


def test_terminal_session_lines_wrap_instead_of_being_cut() -> None:
    sink, buffer = _sink(80)
    path = "captures/" + "x" * 120 + ".popcap"
    sink.write([("started", 1, ("127.0.0.1:5000", "pop.example.org:110", path, None))], 0)
    joined = "".join(buffer.getvalue().splitlines())
    assert path in joined
    assert "…" not in buffer.getvalue()
    assert all(len(line) <= 80 for line in buffer.getvalue().splitlines())


def test_terminal_refusal_reason_wraps() -> None:
    sink, buffer = _sink(80)
    reason = "upstream TLS failed: certificate verification failed: unable to get local issuer "
    reason += "certificate (hint: --upstream-ca FILE trusts the server's CA)"
    sink.write([("failed", 2, ("127.0.0.1:5001", reason))], 0)
    joined = " ".join(line.strip() for line in buffer.getvalue().splitlines())
    assert reason in joined
