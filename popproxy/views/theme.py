"""Named styles, defined once; consoles are built with this theme."""

from __future__ import annotations

import os
import sys
from typing import IO

from rich.console import Console
from rich.theme import Theme

THEME = Theme(
    {
        "pop.client": "bold cyan",
        "pop.server": "bold magenta",
        "pop.ok": "green",
        "pop.err": "bold red",
        "pop.cont": "yellow",
        "pop.code": "bold yellow",
        "pop.args": "white",
        "pop.text": "default",
        "pop.muted": "dim",
        "pop.time": "dim cyan",
        "pop.latency": "dim",
        "pop.body": "blue",
        "pop.secret": "reverse red",
        "pop.state": "bold blue",
        "pop.tls": "bold green",
        "pop.anomaly": "bold yellow on dark_red",
        "pop.warning": "bold yellow",
        "pop.error": "bold red",
        "pop.session": "bold",
        "pop.skipped": "italic yellow",
    }
)

SESSION_COLOURS = (
    "cyan",
    "magenta",
    "green",
    "yellow",
    "blue",
    "bright_red",
    "bright_cyan",
    "bright_magenta",
    "bright_green",
    "bright_blue",
)


def session_style(number: int) -> str:
    return f"bold {SESSION_COLOURS[(number - 1) % len(SESSION_COLOURS)]}"


def make_console(
    file: IO[str] | None = None, *, stderr: bool = False, width: int | None = None
) -> Console:
    """A console with the theme; honours NO_COLOR (rich does) and never colours a pipe."""
    target = file if file is not None else (sys.stderr if stderr else sys.stdout)
    if os.environ.get("NO_COLOR"):  # https://no-color.org: no escapes at all, bold included
        return Console(
            file=target,
            theme=THEME,
            width=width,
            highlight=False,
            color_system=None,
            soft_wrap=False,
        )
    return Console(file=target, theme=THEME, width=width, highlight=False, soft_wrap=False)
