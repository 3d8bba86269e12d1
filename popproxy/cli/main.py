"""``popproxy`` entry point: parses the command line and dispatches to a subcommand."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Mapping, Sequence

from popproxy import __version__
from popproxy.cli import examples
from popproxy.errors import ExitCode, PopproxyError, report

Runner = Callable[[argparse.Namespace], int]

# Each subcommand lives in ``popproxy.cli.NAME``; only the one being run is imported, so
# ``popproxy --help`` and the inspection commands start without loading the others. The
# summaries repeat each module's ``help=`` (tests/test_cli.py keeps them equal).
COMMANDS = {
    "record": "relay a mail client to a POP3 server and record it",
    "show": "show the transcript of captures",
    "list": "list captures: who, when, how much, how it ended",
    "browse": "browse sessions interactively: list, filter, open, export",
    "stats": "per-command counts, latencies, octets and error rates",
    "diff": "compare two captures exchange by exchange",
    "lint": "check captures for POP3 conformance problems",
    "export": "export a capture (raw streams, messages, text, ...)",
    "replay": "replay a capture's client side against a live server and compare",
    "serve": "a fake POP3 server playing recorded sessions",
    "demo": "see popproxy record a POP3 session, offline, in seconds",
    "ca": "show popproxy's CA and how to trust it",
    "docs": "the documentation installed with popproxy",
}


class Parser(argparse.ArgumentParser):
    """The top-level parser, which knows its subcommands' parsers by name."""

    commands: Mapping[str, argparse.ArgumentParser]


def build_parser(only: str | None = None, *, full: bool = False) -> Parser:
    """The parser; subcommands other than ``only`` are name-and-summary stubs unless ``full``."""
    parser = Parser(
        prog="popproxy",
        description="See, record and replay POP3: a byte-exact man-in-the-middle proxy.",
        epilog="Exit codes: 0 success, 1 differences or findings, 2 usage or runtime error. "
        "Run `popproxy COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"popproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in COMMANDS.items():
        if full or name == only:
            importlib.import_module(f"popproxy.cli.{name}").add_parser(sub)
            command = sub.choices[name]
            command.epilog = examples.epilog(name, command.epilog)
            command.formatter_class = examples.HelpFormatter
        else:
            sub.add_parser(name, help=summary, add_help=False)
    parser.commands = sub.choices
    return parser


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line: the first word that is not an option."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_chosen(argv))
    args, extra = parser.parse_known_args(argv)
    if extra:
        # A subcommand's mistake gets that subcommand's usage, not the top-level one.
        chosen = parser.commands.get(getattr(args, "command", None) or "", parser)
        chosen.error(f"unrecognized arguments: {' '.join(extra)}")
    runner: Runner | None = getattr(args, "run", None)
    if runner is None:
        parser.print_help(sys.stderr)
        return ExitCode.ERROR
    try:
        return runner(args)
    except PopproxyError as exc:  # UsageError, CaptureError, CAError, ...
        report(args.command, str(exc))
        return ExitCode.ERROR
    except KeyboardInterrupt:
        report(args.command, "interrupted", level="")
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        return ExitCode.OK  # `popproxy show | head` is fine
