"""``popproxy browse``: the interactive inspector for captures and folders of captures."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from popproxy.capture.format import CaptureError
from popproxy.errors import UsageError
from popproxy.inspect.select import FILTER_HELP, filter_arg


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "browse",
        help="browse sessions interactively: list, filter, open, export",
        description="An interactive inspector (keys as in mitmproxy; ? lists them): one row "
        "per session, read from end records only; folders are watched for new captures. "
        "Enter opens a session's transcript, and a RETR or TOP its message "
        "(the keys and the filter language: popproxy docs browse).",
    )
    p.add_argument(
        "targets",
        nargs="*",
        default=["captures"],
        metavar="CAPTURE|DIR",
        help="captures and folders of captures (default captures/)",
    )
    p.add_argument("--filter", type=filter_arg, metavar="EXPR", help=FILTER_HELP)
    p.add_argument(
        "--poll",
        type=float,
        default=1.0,
        metavar="S",
        help="look for new and growing captures every S seconds (default 1)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not math.isfinite(args.poll) or args.poll <= 0:
        raise UsageError("--poll must be a positive number of seconds")
    for target in args.targets:
        if not Path(target).exists():
            raise CaptureError(f"{target}: no such file or folder")
    from popproxy.browse.app import BrowseApp  # Textual loads only for this command

    BrowseApp(args.targets, filter_expr=args.filter, poll=max(args.poll, 0.05)).run()
    return 0
