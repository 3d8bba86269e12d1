"""Applies a filter expression (inspect/filter.py) to capture files: end record first."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from popproxy.capture.reader import CaptureReader

if TYPE_CHECKING:  # the filter language is imported only when a filter is given
    from popproxy.inspect.filter import Expr, SessionFacts

FILTER_HELP = (
    "only sessions matching EXPR, e.g. '~c RETR & ~e', '~u alice | ~h example.net' "
    "(the language: popproxy docs browse)"
)


def filter_arg(text: str) -> Expr:
    """``argparse`` type for ``--filter``: a parse error is one line and exit status 2."""
    from popproxy.inspect.filter import FilterError, parse

    try:
        return parse(text)
    except FilterError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


UPSTREAM_HELP = (
    "only sessions whose upstream host:port, route, SOCKS5 target or SOCKS5 user matches "
    "PATTERN (a regular expression; short for --filter '~h PATTERN | ~via PATTERN')"
)


def add_upstream_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--upstream",
        type=upstream_arg,
        dest="upstream_filter",
        metavar="PATTERN",
        help=UPSTREAM_HELP,
    )


def upstream_arg(pattern: str) -> Expr:
    """``--upstream PATTERN`` as the filter ``~h PATTERN | ~via PATTERN``."""
    from popproxy.inspect.filter import quote

    return filter_arg(f"~h {quote(pattern)} | ~via {quote(pattern)}")


def combined_filter(args: argparse.Namespace) -> Expr | None:
    """``--filter`` and ``--upstream`` together (both must hold), or whichever was given."""
    parts = [e for e in (args.filter, getattr(args, "upstream_filter", None)) if e is not None]
    if len(parts) == 2:
        from popproxy.inspect.filter import And

        return And(parts[0], parts[1])
    return parts[0] if parts else None


def reader_facts(reader: CaptureReader) -> SessionFacts:
    """The cheap facts of a capture: its header and end record (the file's last bytes)."""
    from popproxy.inspect.filter import facts_from_end

    return facts_from_end(str(reader.path), reader.header, reader.end())


def capture_matches(expr: Expr, reader: CaptureReader, facts: SessionFacts | None = None) -> bool:
    """Decide from the end record when it can; otherwise read the capture, streaming."""
    from popproxy.capture.events import replay_events
    from popproxy.inspect.filter import Scan
    from popproxy.inspect.filter import quick as quick_verdict

    facts = facts if facts is not None else reader_facts(reader)
    verdict = quick_verdict(expr, facts)
    if verdict is not None:
        return verdict
    scan = Scan(expr, facts)
    for record, t, events in replay_events(reader):
        scan.feed(record, t, events)
    return scan.result()
