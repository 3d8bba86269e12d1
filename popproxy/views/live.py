"""The live view: a bounded queue the relay drops items into, rendered off the relay."""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.text import Text

from popproxy.core.transcript import Item, SessionSummary
from popproxy.views import render, safe
from popproxy.views.theme import fits, make_console, session_style

QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"
REFRESH = 0.1  # at most ~10 screen updates a second
MAX_QUEUE = 2000  # items waiting; past this they are counted as skipped, never buffered

Entry = tuple[str, int, Any]


class Sink(Protocol):
    """Where queued entries go: rendered here (a thread) or in a child process."""

    batch: int  # entries taken per refresh

    def write(self, entries: list[Entry], skipped: int) -> bool: ...

    def close(self, timeout: float) -> None: ...


class LiveView:
    """Implements ``SessionView``.  The relay's calls only append to a deque (thread-safe,
    non-blocking); a daemon thread hands batches to the sink.  A paused or slow terminal
    blocks that thread (or the renderer process) alone: the queue fills, later items are
    dropped and shown as "N lines skipped".
    """

    def __init__(
        self, console: Console | None = None, *, mode: str = NORMAL, sink: Sink | None = None
    ) -> None:
        self.mode = mode
        self.detail = mode != QUIET
        self.sink: Sink = sink or ConsoleSink(console or make_console(), mode)
        self._queue: deque[Entry] = deque()
        self._skipped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="popproxy-live-view", daemon=True)
        self._thread.start()

    @classmethod
    def in_subprocess(cls, mode: str = NORMAL) -> LiveView:
        """A live view whose rendering runs in its own process: rich's per-line cost then
        never competes with the relay for the GIL (the relay only queues small tuples)."""
        return cls(mode=mode, sink=ProcessSink(mode))

    # -------------------------------------------------------------- SessionView (relay side)

    def started(self, number: int, peer: str, upstream: str, path: Path | None) -> None:
        self._put(("started", number, (peer, upstream, path, time.time())))

    def items(self, number: int, items: list[Item]) -> None:
        if self.mode != QUIET:
            for item in items:
                self._put(("item", number, item))

    def ended(
        self, number: int, how: str, error: str | None, duration: float, session: SessionSummary
    ) -> None:
        self._put(("ended", number, (how, error, duration, session)), force=True)

    def failed(self, number: int, peer: str, reason: str) -> None:
        self._put(("failed", number, (peer, reason)), force=True)

    def notice(self, message: str, style: str = "pop.warning") -> None:
        self._put(("notice", 0, (message, style)), force=True)

    def _put(self, entry: Entry, *, force: bool = False) -> None:
        if len(self._queue) >= MAX_QUEUE and not force:
            self._skipped += 1
            return
        self._queue.append(entry)

    # -------------------------------------------------------------- the view's thread

    def close(self, timeout: float = 2.0) -> None:
        """Show what is queued (within ``timeout``) and stop."""
        self._stop.set()
        self._thread.join(timeout)
        self.sink.close(timeout)

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(REFRESH)
            self._drain()
            if stopping and not self._queue:
                return

    def _drain(self) -> None:
        batch = self.sink.batch
        backlog = len(self._queue) - batch
        if backlog > batch:
            # Far behind: drop the oldest display lines (session starts and ends are kept).
            keep = [e for e in list(self._queue)[:backlog] if e[0] != "item"]
            for _ in range(backlog):
                self._queue.popleft()
            self._skipped += backlog - len(keep)
            self._queue.extendleft(reversed(keep))
        entries = [self._queue.popleft() for _ in range(min(batch, len(self._queue)))]
        skipped, self._skipped = self._skipped, 0
        if (entries or skipped) and not self.sink.write(entries, skipped):
            self._skipped += skipped + len(entries)  # the terminal went away: keep counting


class ConsoleSink:
    """Renders in the calling thread; few lines per refresh, to bound the GIL time taken."""

    batch = 20

    def __init__(self, console: Console, mode: str) -> None:
        self.console = console
        self.renderer = LineRenderer(mode)

    def write(self, entries: list[Entry], skipped: int) -> bool:
        # On a terminal a transcript line is cut to one row, but session lines (capture
        # paths, errors) wrap; anywhere else every line is kept whole.
        crop = fits(self.console)
        lines = [
            (line, crop and e[0] == "item")
            for e in entries
            if (line := self.renderer.render(*e)) is not None
        ]
        if skipped:
            note = Text(f"… {skipped} lines skipped (terminal too slow)", style="pop.skipped")
            lines.append((note, False))
        try:
            for line, cut in lines:
                self.console.print(line, overflow="ellipsis" if cut else "fold", no_wrap=cut)
        except (OSError, ValueError):
            return False
        return True

    def close(self, timeout: float) -> None:
        return None


class ProcessSink:
    """Sends batches through a pipe to a child process that renders them on stdout."""

    batch = 1000

    def __init__(self, mode: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        reader, self._conn = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_render_child, args=(reader, mode), name="popproxy-view", daemon=True
        )
        self._proc.start()
        reader.close()

    def write(self, entries: list[Entry], skipped: int) -> bool:
        try:
            self._conn.send((entries, skipped))  # blocks only this thread when it is behind
        except (OSError, ValueError):
            return False
        return True

    def close(self, timeout: float) -> None:
        # The stop message is sent from a helper thread: with a renderer stuck on a stdout
        # nobody reads, the pipe to it is full and a send would block for ever.
        stopper = threading.Thread(target=self._say_stop, name="popproxy-view-stop", daemon=True)
        stopper.start()
        stopper.join(timeout)
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()

    def _say_stop(self) -> None:
        try:
            self._conn.send(None)
            self._conn.close()
        except (OSError, ValueError):
            pass


def _render_child(conn: Connection, mode: str) -> None:
    """The renderer process: draw what the proxy sends until it says stop."""
    # Ctrl-C goes to the whole process group: the proxy decides when drawing ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sink = ConsoleSink(make_console(), mode)
    try:
        while (message := conn.recv()) is not None:
            entries, skipped = message
            sink.write(entries, skipped)
    except (EOFError, OSError, KeyboardInterrupt):
        pass  # the proxy went away, or Ctrl-C reached the whole process group


class LineRenderer:
    """Turns queued entries into rich lines: the same functions as ``popproxy show``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def render(self, kind: str, number: int, payload: Any) -> Text | None:
        tag = Text(f"#{number}", style=session_style(number)) if number else None
        if kind == "started":
            peer, upstream, path, _ = payload
            text = Text()
            text.append_text(tag or Text())
            safe.append(text, f" session from {peer} → {upstream}", "pop.session")
            if path is not None:
                safe.append(text, f"  capture {path}", "pop.muted")
            return text
        if kind == "ended":
            how, error, duration, session = payload
            return render.session_end_line(how, error, duration, session, tag)
        if kind == "failed":
            peer, reason = payload
            return render.note_line(
                f"session from {peer} refused: {reason}", None, "pop.error", tag
            )
        if kind == "notice":
            message, style = payload
            return safe.text(message, style)
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
        if item.what == "identity":
            return render.identity_line(item.detail, item.t, tag)
        if item.what == "state":
            return render.state_line(item.detail, item.t, tag)
        if item.what == "tls":
            if isinstance(item.detail, dict):  # the proxy's TLS record: leg, version, peer
                return render.tls_line(item.detail, item.t, tag)
            side = "client" if item.detail == "c" else "server"
            return render.note_line(f"🔒 TLS from here on ({side} side)", item.t, "pop.tls", tag)
        if item.what == "note":
            return render.note_line(str(item.detail), item.t, "pop.warning", tag)
        if item.what == "closed":
            return render.note_line(
                f"{item.detail} closed the connection", item.t, "pop.muted", tag
            )
        if item.what == "body" and self.mode == VERBOSE:
            return render.body_text(item.detail)
        return None
