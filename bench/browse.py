"""``python -m bench.browse``: how fast the browser lists captures, how much a 1 GiB message costs.

Two numbers against a baseline from the same run:

- **list**: a folder of 10,000 small captures (quick: 2,000). Baseline: ``popproxy list
  --json`` on that folder (end records only). Measured: from starting ``BrowseApp``
  headless until its table holds every row.
- **open**: a capture holding one 1 GiB RETR body (quick: 128 MiB). In a fresh process:
  open the session (its transcript), then the message (headers, MIME tree); peak RSS and
  time. Baseline: the same process opening a small capture.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINE = b"x" * 76 + b"\r\n"
CHUNK = LINE * (65536 // len(LINE))


def small_folder(folder: Path, count: int) -> None:
    """``count`` copies of a small recorded Dovecot session (APOP, STAT ... TOP: about 2 KiB)."""
    sys.path.insert(0, str(ROOT))
    from tests.support.fixture_captures import build_capture

    folder.mkdir(parents=True, exist_ok=True)
    seed = build_capture(folder / "seed.popcap", "poplib_apop", 1)
    data = seed.read_bytes()
    seed.unlink()
    for i in range(count):
        (folder / f"20261126T180000.{i:06d}Z-{i:05d}.popcap").write_bytes(data)


def big_capture(path: Path, octets: int) -> None:
    """A capture with one RETR of ``octets`` body octets, written record by record."""
    from popproxy.capture import format as fmt
    from popproxy.core import Direction

    def meta(fields: dict[str, object]) -> bytes:
        return fmt.encode_meta(fields)

    def data(d: str, t: float, payload: bytes) -> bytes:
        return b"".join(fmt.encode_data(Direction(d), t, payload))

    body_octets = (octets // len(CHUNK)) * len(CHUNK)
    with path.open("wb") as f:
        f.write(
            meta(
                {
                    "r": fmt.HEADER,
                    "v": fmt.VERSION,
                    "start": "2026-11-26T18:00:00Z",
                    "client": "127.0.0.1:50000",
                    "upstream": "127.0.0.1:110",
                }
            )
        )
        f.write(data("s", 0.0, b"+OK ready\r\n"))
        f.write(data("c", 0.01, b"USER alice\r\n"))
        f.write(data("s", 0.01, b"+OK\r\n"))
        f.write(data("c", 0.02, b"PASS ####\r\n"))
        f.write(data("s", 0.02, b"+OK Logged in.\r\n"))
        f.write(data("c", 0.03, b"RETR 1\r\n"))
        head = (
            b"+OK %d octets\r\nFrom: Bulk <bulk@example.org>\r\nSubject: one GiB\r\n"
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment; "
            b'filename="big.bin"\r\n\r\n' % body_octets
        )
        f.write(data("s", 0.03, head))
        for _ in range(body_octets // len(CHUNK)):
            f.write(data("s", 0.04, CHUNK))
        f.write(data("s", 0.05, b"--b--\r\n.\r\n"))
        f.write(data("c", 0.06, b"QUIT\r\n"))
        f.write(data("s", 0.06, b"+OK bye\r\n"))
        f.write(
            meta(
                {
                    "r": fmt.END,
                    "t": 0.07,
                    "how": "quit",
                    "error": None,
                    "octets": {"c": 40, "s": body_octets},
                    "commands": 4,
                    "user": "alice",
                    "mechanism": None,
                    "anomalies": 0,
                    "errors": 0,
                    "verbs": {"USER": 1, "PASS": 1, "RETR": 1, "QUIT": 1},
                    "anomaly_kinds": {},
                    "tls": [],
                    "redactions": 1,
                    "observer_error": None,
                }
            )
        )


async def _list_time(folder: Path, count: int) -> float:
    from popproxy.browse.app import BrowseApp
    from popproxy.browse.table import SessionTable

    start = time.perf_counter()
    app = BrowseApp([folder])
    async with app.run_test(size=(160, 40)) as pilot:
        while app.query_one(SessionTable).row_count < count:
            await pilot.pause(0.01)
        elapsed = time.perf_counter() - start
    return elapsed


async def _open(path: Path) -> dict[str, float]:
    from popproxy.browse.app import BrowseApp
    from popproxy.browse.screens import Lines, MessageScreen, SessionScreen

    start = time.perf_counter()
    app = BrowseApp([path])
    async with app.run_test(size=(160, 40)) as pilot:
        await pilot.press("enter")
        while not (isinstance(app.screen, SessionScreen) and app.screen.transcript):
            await pilot.pause(0.05)
        screen = app.screen
        transcript = time.perf_counter() - start
        lines = screen.transcript.lines  # type: ignore[union-attr]
        screen.query_one(Lines).highlighted = next(i for i, x in enumerate(lines) if x.message)
        await pilot.press("enter")
        while not isinstance(app.screen, MessageScreen):
            await pilot.pause(0.05)
        attachments = len(app.screen.message.attachments)
        total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"transcript_s": transcript, "total_s": total, "peak_mib": peak, "parts": attachments}


def child(argv: list[str]) -> int:
    """``python -m bench.browse --child open PATH``: one measurement in a fresh process."""
    print(json.dumps(asyncio.run(_open(Path(argv[1])))))
    return 0


def measure_open(path: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.browse", "--child", "open", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--child"]:
        return child(args[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.browse")
    parser.add_argument("--quick", action="store_true", help="2,000 captures, 128 MiB message")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="append the table to FILE")
    opts = parser.parse_args(args)
    count = 2000 if opts.quick else 10_000
    octets = (128 if opts.quick else 1024) << 20
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="popproxy-bench-") as tmp:
        folder = Path(tmp) / "many"
        small_folder(folder, count)
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "popproxy", "list", "--json", str(folder)],
            stdout=subprocess.DEVNULL,
            check=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
        baseline = time.perf_counter() - t0
        shown = asyncio.run(_list_time(folder, count))
        rows.append(
            (
                f"browse: list of {count:,} small captures",
                "≤ 2 s",
                f"{shown:.2f} s ({shown / baseline:.2f}× `popproxy list --json`: {baseline:.2f} s)",
                "yes" if shown <= 2.0 else "**no**",
            )
        )
        shutil.rmtree(folder)
        small = Path(tmp) / "small.popcap"
        small_folder(Path(tmp) / "one", 1)
        next((Path(tmp) / "one").iterdir()).rename(small)
        big = Path(tmp) / "big.popcap"
        big_capture(big, octets)
        base = measure_open(small)
        opened = measure_open(big)
        assert opened["parts"] == 1, opened  # big.bin found past the whole body
        rows.append(
            (
                f"browse: open a session with a {octets >> 20:,} MiB message, then the message",
                "≤ 100 MB peak RSS",
                f"{opened['peak_mib']:.0f} MiB peak (small capture: {base['peak_mib']:.0f} MiB); "
                f"transcript {opened['transcript_s']:.1f} s, message {opened['total_s']:.1f} s",
                "yes" if opened["peak_mib"] * 1.048576 <= 100 else "**no**",
            )
        )
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    table = [
        f"Browser benchmarks, {stamp} (`python -m bench.browse{' --quick' if opts.quick else ''}`)",
        "",
        "| benchmark | target | measured | met? |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
        "",
    ]
    print("\n".join(table))
    if opts.markdown:
        with opts.markdown.open("a", encoding="utf-8") as f:
            f.write("\n" + "\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
