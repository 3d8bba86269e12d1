"""The live view: a bounded queue the relay drops items into, rendered by its own thread."""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from popproxy.core.transcript import Item, SessionSummary
from popproxy.views import render
from popproxy.views.theme import session_style

QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"
REFRESH = 0.1  # at most ~10 screen updates a second
MAX_QUEUE = 2000  # items waiting; past this they are counted as skipped, never buffered
MAX_BATCH = 60  # lines rendered per refresh: bounds the GIL time rendering takes from the relay


class LiveView:
    """Implements ``SessionView``.  The relay's calls only append to a deque (thread-safe,
    non-blocking); a daemon thread renders.  A paused or slow terminal blocks that thread
    alone: the queue fills, later items are dropped and shown as "N lines skipped".
    """

    def __init__(self, console: Console, *, mode: str = NORMAL) -> None:
        self.console = console
        self.mode = mode
        self._queue: deque[tuple[str, int, Any]] = deque()
        self._skipped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="popproxy-live-view", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- SessionView (relay side)

    def started(self, number: int, peer: str, upstream: str, path: Path | None) -> None:
        self._put(("started", number, (peer, upstream, path, time.time())))

    def items(self, number: int, items: list[Item]) -> None:
        if self.mode != QUIET:
            for item in items:
                self._put(("item", number, item))

    def ended(self, number: int, how: str, error: str | None, duration: float,
              session: SessionSummary) -> None:
        self._put(("ended", number, (how, error, duration, session)), force=True)

    def failed(self, number: int, peer: str, reason: str) -> None:
        self._put(("failed", number, (peer, reason)), force=True)

    def notice(self, message: str, style: str = "pop.warning") -> None:
        self._put(("notice", 0, (message, style)), force=True)

    def _put(self, entry: tuple[str, int, Any], *, force: bool = False) -> None:
        if len(self._queue) >= MAX_QUEUE and not force:
            self._skipped += 1
            return
        self._queue.append(entry)

    # -------------------------------------------------------------- renderer thread

    def close(self, timeout: float = 2.0) -> None:
        """Render what is queued (within ``timeout``) and stop the thread."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(REFRESH)
            self._drain()
            if stopping and not self._queue:
                return

    def _drain(self) -> None:
        lines: list[Text] = []
        backlog = len(self._queue) - MAX_BATCH
        if backlog > MAX_BATCH:
            # Far behind: drop the oldest display lines (session starts and ends are kept).
            keep = [e for e in list(self._queue)[:backlog] if e[0] != "item"]
            for _ in range(backlog):
                self._queue.popleft()
            self._skipped += backlog - len(keep)
            self._queue.extendleft(reversed(keep))
        while self._queue and len(lines) < MAX_BATCH:
            kind, number, payload = self._queue.popleft()
            line = self._render(kind, number, payload)
            if line is not None:
                lines.append(line)
        skipped, self._skipped = self._skipped, 0
        if skipped:
            lines.append(Text(f"… {skipped} lines skipped (terminal too slow)",
                              style="pop.skipped"))
        if lines:
            try:
                for line in lines:
                    self.console.print(line, overflow="ellipsis", no_wrap=True)
            except (OSError, ValueError):
                self._skipped += len(lines)  # the terminal went away: keep counting

    def _render(self, kind: str, number: int, payload: Any) -> Text | None:
        tag = Text(f"#{number}", style=session_style(number)) if number else None
        if kind == "started":
            peer, upstream, path, _ = payload
            text = Text()
            text.append_text(tag or Text())
            text.append(f" session from {peer} → {upstream}", style="pop.session")
            if path is not None:
                text.append(f"  capture {path}", style="pop.muted")
            return text
        if kind == "ended":
            how, error, duration, session = payload
            return render.session_end_line(how, error, duration, session, tag)
        if kind == "failed":
            peer, reason = payload
            return render.note_line(f"session from {peer} refused: {reason}", None,
                                    "pop.error", tag)
        if kind == "notice":
            message, style = payload
            return Text(message, style=style)
        return self._render_item(payload, tag)

    def _render_item(self, item: Item, tag: Text | None) -> Text | None:
        ex = item.exchange
        if item.what == "command" and ex is not None:
            return render.command_line(ex, tag)
        if item.what == "done" and ex is not None:
            if ex.kind == "command" and ex.command is None:
                return None
            line = render.reply_line(ex, tag, folded=True)
            return line
        if item.what == "sasl":
            return render.sasl_line(item.detail, item.t, tag)
        if item.what == "anomaly":
            return render.anomaly_line(item.detail, item.t, tag)
        if item.what == "state":
            return render.state_line(item.detail, item.t, tag)
        if item.what == "tls":
            side = "client" if item.detail == "c" else "server"
            return render.note_line(f"🔒 TLS from here on ({side} side)", item.t, "pop.tls", tag)
        if item.what == "closed":
            return render.note_line(f"{item.detail} closed the connection", item.t, "pop.muted",
                                    tag)
        if item.what == "body" and self.mode == VERBOSE:
            return Text(item.detail.decode("utf-8", "backslashreplace"), style="pop.body")
        return None
