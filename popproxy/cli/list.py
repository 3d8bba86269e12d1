"""``popproxy list``: one row per capture, from end records (data is skipped, not read)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from popproxy.capture.format import CaptureError
from popproxy.capture.reader import CaptureReader, capture_paths
from popproxy.capture.via import describe_via
from popproxy.errors import report
from popproxy.inspect.select import (
    FILTER_HELP,
    add_upstream_option,
    capture_matches,
    combined_filter,
    filter_arg,
)
from popproxy.inspect.summary import row_from_end, row_from_scan
from popproxy.views import safe
from popproxy.views.progress import ScanProgress
from popproxy.views.render import fmt_ms, fmt_size
from popproxy.views.theme import make_console

CLEAN_ENDINGS = frozenset({"quit", "closed", "client-closed", "server-closed"})


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "list",
        help="list captures: who, when, how much, how it ended",
        description="One row per capture in DIR, sorted by start, read from each "
        "capture's end record, found by walking its record lines (data is "
        "skipped, not read). Captures without one "
        "(still being written, or the proxy died) are read in full "
        "and marked 'unfinished'.",
    )
    p.add_argument(
        "folder",
        nargs="?",
        default="captures",
        metavar="DIR",
        help="folder of captures (default: captures/)",
    )
    p.add_argument("--json", action="store_true", help="one JSON array on stdout")
    p.add_argument("--filter", type=filter_arg, metavar="EXPR", help=FILTER_HELP)
    add_upstream_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    args.filter = combined_filter(args)
    folder = Path(args.folder)
    if not folder.exists():
        raise CaptureError(f"{folder}: no such file or folder")
    paths = capture_paths([args.folder])
    rows: list[dict[str, Any]] = []
    status = 0
    unfinished: list[Path] = []
    for path in paths:
        try:
            with CaptureReader(path) as reader:
                end = reader.end()
                if args.filter is not None and not capture_matches(args.filter, reader):
                    continue
                if end is None:
                    unfinished.append(path)
                else:
                    rows.append(row_from_end(reader, end))
        except CaptureError as exc:
            report("list", f"{exc}")
            status = 2
    with ScanProgress("list", unfinished) as progress:
        for path in unfinished:
            try:
                with CaptureReader(path) as reader:
                    rows.append(row_from_scan(reader, progress.capture(path, reader.size)))
            except CaptureError as exc:
                report("list", f"{exc}")
                status = 2
    rows.sort(key=lambda r: (str(r.get("start") or ""), r["path"]))
    if args.json:
        sys.stdout.write(safe.json_dumps(rows, ensure_ascii=True) + "\n")
    else:
        render_list(make_console(), rows, base=folder)
    return status


def render_list(console: Console, rows: list[dict[str, Any]], base: Path | None = None) -> None:
    """The table; capture paths are shown relative to ``base`` (``--json`` has them whole)."""
    table = Table(
        title=f"{len(rows)} capture(s)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False
    )
    table.add_column("start", min_width=10)
    table.add_column("ended", overflow="fold", min_width=6)
    table.add_column("anom.", justify="right", min_width=5)
    table.add_column("user", overflow="fold", min_width=5)
    wide = console.width >= 110  # narrower terminals lose the addresses (--json has them)
    if wide:
        table.add_column("client → upstream", overflow="fold", min_width=12)
    for name in ("cmds", "C→S", "S→C", "duration"):
        table.add_column(name, justify="right", min_width=len(name), no_wrap=True)
    table.add_column("capture", overflow="fold", min_width=8)  # which file: rows can look alike
    for r in rows:
        how = str(r.get("how") or "?")
        ended = Text(
            how,
            style="pop.ok"
            if how in CLEAN_ENDINGS
            else "pop.warning"
            if r["unfinished"]
            else "pop.err",
        )
        if r.get("error"):
            ended.append(f" ({r['error']})", style="pop.muted")
        anomalies = r.get("anomalies") or 0
        start = str(r.get("start") or "?").replace("T", " ").rstrip("Z").partition(".")[0]
        cells: list[str | Text] = [
            start,
            ended,
            Text(str(anomalies), style="pop.warning" if anomalies else ""),
            str(r.get("user") or ""),
        ]
        if wide:
            chosen = describe_via({"via": r.get("via")})
            via = "" if chosen == "fixed" else f" ({chosen})"
            cells.append(safe.text(f"{r.get('client') or '?'} → {r.get('upstream') or '?'}{via}"))
        cells += [
            _count(r.get("commands")),
            _size(r.get("client_octets")),
            _size(r.get("server_octets")),
            fmt_ms(float(r["duration"])) if r.get("duration") is not None else "?",
            Text(_shown_path(str(r["path"]), base), style="pop.muted"),
        ]
        table.add_row(*safe.row(*cells))
    console.print(table)


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _size(value: Any) -> str:
    return fmt_size(value) if isinstance(value, int) else "?"


def _shown_path(path: str, base: Path | None) -> str:
    if base is not None:
        try:
            return str(Path(path).relative_to(base))
        except ValueError:
            pass
    return path
