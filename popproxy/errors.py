"""The errors every command reports in one line, and the exit codes they map to."""

from __future__ import annotations

import contextlib
import enum
import sys


class ExitCode(enum.IntEnum):
    """What a ``popproxy`` command's exit status means (README, "Exit codes")."""

    OK = 0
    DIFFERENT = 1  # diff/replay found differences, lint found findings
    ERROR = 2  # a usage error, an unreadable capture, an unreachable server
    INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class PopproxyError(Exception):
    """A failure a command reports in one line and exits 2 for (never a traceback)."""


class UsageError(PopproxyError):
    """A bad command-line value: reported in one line, exit code 2."""


def report(command: str | None, message: str, *, level: str = "error") -> None:
    """The one way an error or warning leaves a command: ``popproxy CMD: LEVEL: MESSAGE``."""
    where = f"popproxy {command}" if command else "popproxy"
    prefix = f"{level}: " if level else ""
    from popproxy.escapes import escape  # messages quote file and peer text

    message = escape(message)
    with contextlib.suppress(BrokenPipeError, ValueError):  # stderr gone: the exit code says it
        print(f"{where}: {prefix}{message}", file=sys.stderr, flush=True)
