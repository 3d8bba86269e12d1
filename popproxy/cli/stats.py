"""``popproxy stats``: per-command counts, latency percentiles, octets and error rates."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from popproxy.capture.format import CaptureError
from popproxy.capture.reader import CaptureReader, some_capture_paths
from popproxy.errors import report
from popproxy.inspect.select import (
    FILTER_HELP,
    add_upstream_option,
    capture_matches,
    combined_filter,
    filter_arg,
)
from popproxy.inspect.stats import StatsCollector, collect
from popproxy.views import safe
from popproxy.views.progress import ScanProgress
from popproxy.views.render import fmt_ms, fmt_size
from popproxy.views.theme import make_console

LATENCY_HELP = (
    "Latency of a command runs from max(time it was sent, end of the previous reply) to the "
    "end of its own reply (after the body's terminating '.'), so a pipelined command is not "
    "charged for the time it waited behind earlier replies. Percentiles are nearest-rank, "
    "exact up to 100,000 replies per command (a uniform sample beyond that); max is exact."
)
BAR_WIDTH = 12


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "stats",
        help="per-command counts, latencies, octets and error rates",
        description="Statistics over captures, per command: count, -ERR rate, "
        "latency p50/p90/p99/max, octets each way. " + LATENCY_HELP,
    )
    p.add_argument(
        "captures", nargs="+", metavar="CAPTURE|DIR", help="capture files, or folders of them"
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--filter", type=filter_arg, metavar="EXPR", help=FILTER_HELP)
    add_upstream_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    args.filter = combined_filter(args)
    paths = some_capture_paths(args.captures)
    stats = StatsCollector()
    status, read = 0, []
    with ScanProgress("stats", paths) as progress:
        for path in paths:
            try:
                with CaptureReader(path) as reader:
                    if args.filter is not None and not capture_matches(args.filter, reader):
                        continue
                    collect(reader, stats, progress.capture(path, reader.size))
                    for warning in reader.warnings:
                        report("stats", f"{warning}", level="warning")
                read.append(str(path))
            except CaptureError as exc:
                report("stats", f"{exc}")
                status = 2
    if status and not read:
        return status  # nothing was readable: the errors above say why, no empty table
    if args.json:
        sys.stdout.write(
            safe.json_dumps({"captures": read, **stats.to_json()}, ensure_ascii=True) + "\n"
        )
    else:
        render_stats(make_console(), stats)
    return status


def bar(value: float, largest: float, width: int = BAR_WIDTH) -> Text:
    """A small horizontal bar, in eighths of a cell."""
    if largest <= 0 or value <= 0:
        return Text("")
    eighths = max(1, round(value / largest * width * 8))
    full, part = divmod(eighths, 8)
    return Text("█" * full + (" ▏▎▍▌▋▊▉"[part] if part else ""), style="pop.body")


def _ms(value: Any) -> str:
    return "-" if value is None else fmt_ms(float(value))


def render_stats(console: Console, stats: StatsCollector) -> None:
    """Two tables: counts and octets with a count bar; latencies with a p90 bar."""
    rows = stats.ordered()
    total = stats.total()
    most = max((s.count for s in rows), default=0)
    counts = Table(
        title=f"Commands ({stats.sessions} session(s))",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for name in ("command", "count", "", "-ERR", "err %", "no reply", "C→S", "S→C"):
        counts.add_column(
            name,
            justify="left" if name in ("command", "") else "right",
            no_wrap=True,
            min_width=BAR_WIDTH if name == "" else None,
        )
    for s in [*rows, total]:
        counts.add_row(
            *safe.row(
                Text(s.verb, style="pop.session" if s is total else "pop.client"),
                f"{s.count:,}",
                bar(s.count, most) if s is not total else Text(""),
                f"{s.errors:,}",
                f"{s.error_rate:.1%}",
                f"{s.no_reply:,}",
                fmt_size(s.client_octets),
                fmt_size(s.server_octets),
            )
        )
    console.print(counts)
    latencies = {s.verb: s.latency() for s in rows}
    slowest = max((float(v["p90"] or 0.0) for v in latencies.values()), default=0.0)
    table = Table(
        title="Latency (reply end − max(sent, previous reply end))",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for name in ("command", "p50", "p90", "p99", "max", "p90 bar"):
        table.add_column(
            name, justify="left" if name in ("command", "p90 bar") else "right", no_wrap=True
        )
    for s in rows:
        lat = latencies[s.verb]
        table.add_row(
            *safe.row(
                Text(s.verb, style="pop.client"),
                _ms(lat["p50"]),
                _ms(lat["p90"]),
                _ms(lat["p99"]),
                _ms(lat["max"]),
                bar(float(lat["p90"] or 0.0), slowest),
            )
        )
    console.print(table)
