"""A progress bar over capture bytes, on stderr and only on a terminal, for long commands."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from popproxy.views import safe
from popproxy.views.theme import make_console

PROGRESS_MIN = 8 << 20  # smaller jobs finish before a bar would be worth drawing


class ScanProgress:
    """One rich progress bar on stderr over all captures' bytes, only on a terminal."""

    def __init__(self, label: str, paths: list[Path]) -> None:
        self.label = label
        sizes = []
        for path in paths:
            try:
                sizes.append(os.stat(path).st_size)
            except OSError:
                sizes.append(0)
        total = sum(sizes)
        self._bar: Progress | None = None
        self._task = None
        self._done: dict[int, int] = {}
        if sys.stderr.isatty() and total >= PROGRESS_MIN:
            self._bar = Progress(
                TextColumn("{task.description}", style="progress.description", markup=False),
                BarColumn(),
                DownloadColumn(),
                TimeRemainingColumn(),
                console=make_console(stderr=True),
                transient=True,
            )
            self._task = self._bar.add_task(label, total=total)

    def __enter__(self) -> ScanProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    def capture(self, path: Path, size: int) -> Callable[[int], None] | None:
        """A callback for one capture's bytes read so far (``popproxy.inspect.Progress``)."""
        bar, task = self._bar, self._task
        if bar is None or task is None:
            return None
        key = len(self._done)
        self._done[key] = 0
        description = safe.escape(f"{self.label} {path.name}")
        done_by_capture = self._done

        def update(done: int) -> None:
            done_by_capture[key] = min(done, size)
            bar.update(task, completed=sum(done_by_capture.values()), description=description)

        return update
