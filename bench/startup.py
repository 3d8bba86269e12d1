"""Start-up cost of popproxy commands against a bare ``python -c pass``, interleaved."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.report import Table, fmt, median, ratio

DEMO = Path(__file__).resolve().parent.parent / "popproxy" / "data" / "demo.popcap"
TARGETS = {"popproxy --version": 4.0, "popproxy --help": 4.0, "popproxy show SMALL": 6.0}


def _commands() -> dict[str, list[str]]:
    py = sys.executable
    return {
        "python -c pass": [py, "-c", "pass"],
        "popproxy --version": [py, "-m", "popproxy", "--version"],
        "popproxy --help": [py, "-m", "popproxy", "--help"],
        "popproxy show SMALL": [py, "-m", "popproxy", "show", str(DEMO)],
    }


def _once(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def run(runs: int) -> Table:
    """Median wall time of each command over ``runs`` interleaved rounds (at least 10)."""
    commands = _commands()
    times: dict[str, list[float]] = {name: [] for name in commands}
    for argv in commands.values():
        _once(argv)  # warm the page cache and .pyc files
    for _ in range(max(runs, 10)):
        for name, argv in commands.items():
            times[name].append(_once(argv))
    base = median(times["python -c pass"])
    table = Table(
        "Start-up (median wall time, interleaved rounds)",
        ["command", "median ms", "× python -c pass", "target"],
    )
    for name, values in times.items():
        target = TARGETS.get(name)
        table.rows.append(
            [
                name,
                fmt(median(values) * 1e3),
                ratio(median(values), base),
                f"≤ {target:g}×" if target else "",
            ]
        )
    table.notes.append(f"{max(runs, 10)} rounds; SMALL is the packaged demo capture")
    return table
