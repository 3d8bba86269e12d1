"""``popproxy lint``: RFC conformance findings for both directions of each capture."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from popproxy.capture.format import CaptureError
from popproxy.capture.reader import CaptureReader, some_capture_paths
from popproxy.errors import report
from popproxy.inspect import metered_events
from popproxy.inspect.lint_rules import RANK, SEVERITIES, Finding, Linter, Severity
from popproxy.views import safe
from popproxy.views.progress import ScanProgress
from popproxy.views.theme import make_console

SEVERITY_STYLE = {"error": "pop.error", "warning": "pop.warning", "advice": "pop.muted"}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lint",
        help="check captures for POP3 conformance problems",
        description="Conformance findings for client and server: framing (bare "
        "LF, dot-stuffing, terminators), line limits, listings, "
        "sizes, states, pipelining, STLS injection, status tokens. "
        "Each names the exchange, the RFC section and a severity. "
        "Exit 0 when clean (advice allowed), 1 with warnings or "
        "errors.",
    )
    p.add_argument(
        "captures", nargs="+", metavar="CAPTURE|DIR", help="capture files, or folders of them"
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument(
        "--min-severity",
        choices=SEVERITIES,
        default="advice",
        help="show only findings at least this severe (default: advice)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    paths = some_capture_paths(args.captures)
    threshold = RANK[Severity(args.min_severity)]
    results: list[dict[str, Any]] = []
    failed = found = False
    console = None if args.json else make_console()
    with ScanProgress("lint", paths) as progress:
        for path in paths:
            try:
                with CaptureReader(path) as reader:
                    findings = lint_capture(reader, progress.capture(path, reader.size))
                    for warning in reader.warnings:
                        report("lint", f"{warning}", level="warning")
            except CaptureError as exc:
                report("lint", f"{exc}")
                failed = True
                continue
            found = found or any(RANK[f.severity] >= RANK[Severity.WARNING] for f in findings)
            shown = [f for f in findings if RANK[f.severity] >= threshold]
            if console is not None:
                render_findings(console, str(path), shown)
            else:
                counts = Counter(f.severity for f in findings)
                results.append(
                    {
                        "path": str(path),
                        "counts": {s: counts[s] for s in SEVERITIES},
                        "findings": [f.to_json() for f in shown],
                    }
                )
    if args.json:
        sys.stdout.write(safe.json_dumps({"captures": results}, ensure_ascii=True) + "\n")
    if failed:
        return 2
    return 1 if found else 0


def lint_capture(reader: CaptureReader, progress: Any = None) -> list[Finding]:
    """Stream one capture through the linter."""
    linter = Linter()
    for record, t, events in metered_events(reader, progress):
        linter.feed(record, t, events)
    return linter.finish()


def render_findings(console: Console, path: str, findings: list[Finding]) -> None:
    if not findings:
        console.print(Text(f"{path}: clean", style="pop.ok"))
        return
    counts = Counter(f.severity for f in findings)
    summary = ", ".join(f"{counts[s]} {s}" for s in SEVERITIES if counts[s])
    table = Table(
        title=f"{path}: {summary}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False
    )
    for name in ("seq", "command", "dir", "severity", "RFC", "finding"):
        table.add_column(name, justify="right" if name == "seq" else "left", overflow="fold")
    for f in findings:
        table.add_row(
            *safe.row(
                "" if f.seq is None else str(f.seq),
                f.command or "",
                f.direction or "",
                Text(f.severity, style=SEVERITY_STYLE[f.severity]),
                f.rfc,
                f.message,
            )
        )
    console.print(table)
