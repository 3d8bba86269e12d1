"""Helpers shared by the subcommands that listen (record, serve)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from popproxy.proxy.config import UsageError


def run_listening(main: Callable[..., Awaitable[Any]], *args: Any, listen: str) -> None:
    """``trio.run(main, *args)``; a failure to bind ``listen`` becomes one clear line.

    The bind happens inside a nursery, so its OSError arrives in an exception group.
    """
    failed: OSError | None = None
    try:
        trio.run(main, *args)
    except* OSError as group:
        failed = next(e for e in group.exceptions if isinstance(e, OSError))
    if failed is not None:
        raise UsageError(f"cannot listen on {listen}: {failed.strerror or failed}")
