"""Named styles, defined once; consoles are built with this theme."""

from __future__ import annotations

import os
import sys
from typing import IO

from rich.console import Console, ConsoleOptions, ConsoleRenderable, RenderHook, RenderResult
from rich.measure import Measurement
from rich.text import Text
from rich.theme import Theme

from popproxy.views import safe

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
        "pop.escape": "reverse magenta",  # a control character shown as an escape (views/safe)
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


UNLIMITED = 100_000  # the width of a console that is not a terminal: lines are never cut


def make_console(
    file: IO[str] | None = None,
    *,
    stderr: bool = False,
    width: int | None = None,
    force_terminal: bool | None = None,
) -> Console:
    """A console with the theme; honours NO_COLOR (rich does) and never colours a pipe.

    On a terminal, text wraps at its width. Anywhere else (a pipe, a file) nothing is
    wrapped or cut: one record per line, whole, so ``grep`` and ``cut`` see every field.
    """
    target = file if file is not None else (sys.stderr if stderr else sys.stdout)
    console = Console(
        file=target,
        theme=THEME,
        width=width,
        highlight=False,
        force_terminal=force_terminal,
        markup=False,  # strings never carry markup: peer text must not be interpreted
        emoji=False,
        # https://no-color.org: no escapes at all, bold included
        color_system=None if os.environ.get("NO_COLOR") else "auto",
        soft_wrap=False,
    )
    console.push_render_hook(SanitiseHook())
    if width is None and not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = UNLIMITED
        console.soft_wrap = True
    return console


class SanitiseHook(RenderHook):
    """The edge of every console: whatever is printed passes ``views.safe`` first."""

    def process_renderables(self, renderables: list[ConsoleRenderable]) -> list[ConsoleRenderable]:
        return [safe.sanitise(r) if isinstance(r, Text) else _Sanitised(r) for r in renderables]


class _Sanitised:
    """A renderable (a table, say) whose rendered segments go through ``views.safe``."""

    def __init__(self, inner: ConsoleRenderable) -> None:
        self.inner = inner

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from safe.sanitise_segments(console.render(self.inner, options))

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.inner)


def fits(console: Console) -> bool:
    """Whether lines may be cut to the console's width (only on a terminal)."""
    return console.is_terminal
