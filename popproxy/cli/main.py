"""``popproxy`` entry point: parses the command line and dispatches to a subcommand."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from popproxy import __version__
from popproxy.capture.format import CaptureError
from popproxy.proxy.config import UsageError
from popproxy.tls.ca import CAError

EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2

Runner = Callable[[argparse.Namespace], int]
COMMANDS = (
    "record",
    "show",
    "list",
    "stats",
    "diff",
    "lint",
    "export",
    "replay",
    "serve",
    "demo",
    "ca",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="popproxy",
        description="See, record and replay POP3: a byte-exact man-in-the-middle proxy.",
        epilog="Exit codes: 0 success, 1 differences or findings, 2 usage or runtime error.",
    )
    parser.add_argument("--version", action="version", version=f"popproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"popproxy.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runner: Runner | None = getattr(args, "run", None)
    if runner is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    try:
        return runner(args)
    except (UsageError, CaptureError, CAError) as exc:
        print(f"popproxy {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"popproxy {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK  # `popproxy show | head` is fine
