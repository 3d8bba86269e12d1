"""Command line of the benchmark suite: ``python -m bench [suite] [--quick] [--runs N]``."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from bench import procs
from bench.pop3server import raise_nofile
from bench.report import Table, append_markdown, filesystem, machine, show
from bench.suites import SUITES, Lab, make_capture_root

TROUBLE = ("failed in run", "exited with", "did not start")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="popproxy benchmarks on 127.0.0.1: variants interleaved, medians, ratios.",
    )
    parser.add_argument("suite", nargs="?", default="all", choices=[*SUITES, "all"])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and counts")
    parser.add_argument("--runs", type=int, help="interleaved runs (default 3 quick, 5 full)")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="append tables to FILE")
    parser.add_argument(
        "--capture-dir", metavar="DIR", help="parent folder for popproxy captures (default: TMPDIR)"
    )
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # A shell's background job inherits SIGINT ignored; so would every subprocess started here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise_nofile()
    console = Console()
    if not console.is_terminal:  # piped: keep tables readable instead of 80 columns
        console = Console(width=140)
    runs = args.runs or (3 if args.quick else 5)
    capture_root = make_capture_root(args.capture_dir)
    logdir = Path(tempfile.mkdtemp(prefix="popproxy-bench-logs-"))
    header = [
        f"machine: {machine()}",
        f"mode: {'quick' if args.quick else 'full'}, {runs} runs per variant",
        f"captures written to {capture_root}: {filesystem(capture_root)}",
    ]
    for line in header:
        console.print(line, highlight=False, soft_wrap=True)
    lab = Lab(console, logdir, capture_root, runs, args.quick)
    names = list(SUITES) if args.suite == "all" else [args.suite]
    tables: list[Table] = []
    failed = False
    try:
        for name in names:
            try:
                table = SUITES[name](lab)
            except procs.Unavailable as exc:
                table = Table(name, ["result"], [[f"could not run: {exc}"]])
                failed = True
            tables.append(table)
            show(console, table)
            failed |= any(word in note for note in table.notes for word in TROUBLE)
    except KeyboardInterrupt:
        console.print("interrupted", style="bold red")
        shutil.rmtree(logdir, ignore_errors=True)
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(capture_root, ignore_errors=True)
    if failed:
        console.print(f"subprocess logs kept in {logdir}", highlight=False)
    else:
        shutil.rmtree(logdir, ignore_errors=True)
    if args.markdown and tables:
        append_markdown(args.markdown, header, tables)
        console.print(f"appended markdown to {args.markdown}", highlight=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
