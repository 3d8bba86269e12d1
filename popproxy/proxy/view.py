"""What a session tells the person watching: the interface the live view implements."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from popproxy.core.transcript import Item, SessionSummary


class SessionView(Protocol):
    """Called from the relay's thread; implementations must return at once (never block)."""

    detail: bool  # whether it shows exchanges (``items``), or only session starts and ends

    def started(self, number: int, peer: str, upstream: str, path: Path | None) -> None: ...

    def items(self, number: int, items: list[Item]) -> None: ...

    def ended(
        self, number: int, how: str, error: str | None, duration: float, session: SessionSummary
    ) -> None: ...

    def failed(self, number: int, peer: str, reason: str) -> None: ...
