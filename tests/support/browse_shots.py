"""The browser's layout at fixed points, for snapshot tests and the documentation's images."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from popproxy.browse.app import BrowseApp
from popproxy.browse.screens import Lines, MessageScreen, SessionScreen
from popproxy.browse.table import SessionTable

SIZE = (160, 32)


async def _wait(pilot: Any, condition: Callable[[], object]) -> None:
    for _ in range(400):
        if condition():
            await pilot.pause()
            return
        await pilot.pause(0.02)
    raise AssertionError("the browser did not get there")


async def _list(pilot: Any, app: BrowseApp) -> None:
    await pilot.pause()


async def _session(pilot: Any, app: BrowseApp) -> None:
    await pilot.press("G", "enter")  # the last session: poplib, every message retrieved
    await _wait(pilot, lambda: isinstance(app.screen, SessionScreen) and app.screen.transcript)
    for _ in range(16):
        await pilot.press("j")


async def _message(pilot: Any, app: BrowseApp) -> None:
    await _session(pilot, app)
    screen = app.screen
    assert isinstance(screen, SessionScreen) and screen.transcript is not None
    listing = screen.query_one(Lines)
    listing.highlighted = next(
        i for i, line in enumerate(screen.transcript.lines) if "RETR 3" in line.text.plain
    )
    await pilot.press("enter")
    await _wait(pilot, lambda: isinstance(app.screen, MessageScreen))


async def _filtered(pilot: Any, app: BrowseApp) -> None:
    await pilot.press("f", *[{" ": "space"}.get(c, c) for c in "~c AUTH | ~c APOP"], "enter")
    await _wait(pilot, lambda: app.query_one(SessionTable).row_count < 7)


SHOTS: dict[str, Callable[[Any, BrowseApp], Awaitable[None]]] = {
    "list": _list,
    "session": _session,
    "message": _message,
    "filtered": _filtered,
}


async def take(folder: Path, name: str) -> tuple[BrowseApp, str]:
    """Drive a browser over ``folder`` to shot ``name``; return the app and its SVG."""
    app = BrowseApp([folder])
    async with app.run_test(size=SIZE) as pilot:
        await SHOTS[name](pilot, app)
        svg = app.export_screenshot(title=f"popproxy browse ({name})")
        from tests.support.screens import screen_lines_from_svg

        app.snapshot_lines = screen_lines_from_svg(svg)  # type: ignore[attr-defined]
    return app, svg
