"""``popproxy diff``: compare two captures exchange by exchange; exit 1 when they differ."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from popproxy.errors import report
from popproxy.replay.compare import Difference
from popproxy.replay.diff import SCHEMA_VERSION, diff_captures
from popproxy.views import safe
from popproxy.views.progress import ScanProgress
from popproxy.views.theme import make_console


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "diff",
        help="compare two captures exchange by exchange",
        description="Structural comparison of capture A (expected) and B "
        "(actual): commands, statuses, response codes, drop/scan/"
        "unique-id listings, bodies (SHA-256, octets, first differing "
        "offset), and who made each part: a reply popproxy answered or "
        "withheld, bytes it did not forward, a close it made. Free text, "
        "greeting banners and SASL challenges are ignored unless --strict. "
        "Exit 0 equal, 1 different.",
    )
    p.add_argument("expected", metavar="A", help="the reference capture")
    p.add_argument("actual", metavar="B", help="the capture compared with it")
    p.add_argument(
        "--strict",
        action="store_true",
        help="also compare free text after the status and SASL challenges",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object on stdout (schema: popproxy docs diff.schema.json)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    expected, actual = Path(args.expected), Path(args.actual)
    with ScanProgress("diff", [expected, actual]) as progress:
        differences, warnings = diff_captures(
            expected, actual, strict=args.strict, progress=progress.capture
        )
    for warning in warnings:
        report("diff", warning, level="warning")
    if args.json:
        doc = {
            "schema": SCHEMA_VERSION,
            "expected": args.expected,
            "actual": args.actual,
            "strict": args.strict,
            "equal": not differences,
            "differences": [d.to_json() for d in differences],
        }
        sys.stdout.write(safe.json_dumps(doc, ensure_ascii=True) + "\n")
    else:
        render_diff(make_console(), args.expected, args.actual, differences)
    return 1 if differences else 0


ACTOR_FIELDS = {"reply_by": "answered", "command_by": "sent the command", "truncated_by": "cut"}


def _shown(value: Any, field: str = "") -> str:
    """A difference's value for a person (docs/diff.md); peer text is made safe later."""
    if value is None:
        return "—"
    if field.rpartition(".")[2] in ACTOR_FIELDS and isinstance(value, str):
        return f"{value} {ACTOR_FIELDS[field.rpartition('.')[2]]}"  # three actors
    if isinstance(value, dict) and "sha256" in value:
        sha = value.get("sha256") or ""
        return f"{value.get('octets')} octets, sha256 {sha[:12]}"
    if isinstance(value, dict) and "by" in value:  # who closed first
        return f"{value['by']} closed" + (f" ({value['why']})" if value.get("why") else "")
    if isinstance(value, dict) and "status" in value:  # a reply popproxy withheld
        words = [value.get("status") or "?", f"[{value['code']}]" if value.get("code") else ""]
        line = " ".join(w for w in [*words, value.get("text") or ""] if w)
        return f"withheld {line} ({value.get('why')})"
    if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        return "; ".join(  # bytes popproxy did not forward
            f"{x.get('octets')} octets from the {x.get('from')}: {x.get('why')}" for x in value
        )
    if isinstance(value, list):
        return " ".join(str(x) for x in value) or "(none)"
    return str(value)


def render_diff(
    console: Console, expected: str, actual: str, differences: list[Difference]
) -> None:
    if not differences:
        console.print(Text(f"{expected} and {actual}: no structural differences", style="pop.ok"))
        return
    table = Table(
        title=f"{len(differences)} difference(s): A = {expected}, B = {actual}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for name in ("seq", "field", "A (expected)", "B (actual)", "note"):
        table.add_column(name, justify="right" if name == "seq" else "left", overflow="fold")
    for d in differences:
        table.add_row(
            *safe.row(
                "" if d.seq is None else str(d.seq),
                Text(d.field, style="pop.code"),
                Text(_shown(d.expected, d.field), style="pop.ok"),
                Text(_shown(d.actual, d.field), style="pop.err"),
                Text(d.note, style="pop.muted"),
            )
        )
    console.print(table)
