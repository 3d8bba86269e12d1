"""``record --browse``: the proxy in a trio thread, feeding the browser through a queue."""

from __future__ import annotations

import contextlib
import queue
import threading
from functools import partial
from pathlib import Path
from typing import Any

import trio

from popproxy.core.transcript import Item, SessionSummary
from popproxy.errors import UsageError
from popproxy.proxy.config import ProxyConfig
from popproxy.proxy.server import serve_record


class QueueView:
    """A ``SessionView`` that only enqueues: the relay never waits for the screen."""

    detail = True

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()

    def started(self, number: int, peer: str, upstream: str, path: Path | None) -> None:
        self.queue.put(("started", number, path, peer, upstream))

    def items(self, number: int, items: list[Item]) -> None:
        self.queue.put(("items", number, items))

    def ended(
        self, number: int, how: str, error: str | None, duration: float, session: SessionSummary
    ) -> None:
        self.queue.put(("ended", number, how))

    def failed(self, number: int, peer: str, reason: str) -> None:
        self.queue.put(("failed", number, peer, reason))


class ProxyThread:
    """``serve_record`` in its own thread and trio loop; ``stop()`` finishes open captures."""

    def __init__(self, config: ProxyConfig, view: QueueView) -> None:
        self.config, self.view = config, view
        self.addresses: list[tuple[str, int]] = []
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._run, name="popproxy-relay", daemon=True)

    def start(self) -> list[tuple[str, int]]:
        self._thread.start()
        self._ready.wait()
        if self.error is not None:
            reason = getattr(self.error, "strerror", None) or self.error
            host, port = self.config.listen[:2]
            raise UsageError(f"cannot listen on {host}:{port}: {reason}")
        return self.addresses

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by start(), or lost at exit: never raised here
            self.error = _first(exc)
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            serve = partial(serve_record, announce=False)
            self.addresses = await nursery.start(serve, self.config, self.view)
            self._ready.set()

    def stop(self, timeout: float = 10.0) -> None:
        if self._token is not None and self._cancel is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(timeout)


def _first(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def record_browse(config: ProxyConfig) -> int:
    """Run the recording proxy with the browser as its live view, until the browser quits."""
    from popproxy.browse.app import BrowseApp  # Textual loads only here

    view = QueueView()
    proxy = ProxyThread(config, view)
    addresses = proxy.start()
    listening = ", ".join(f"{host}:{port}" for host, port in addresses)
    upstream = config.upstream_text if config.serve_fixed else "per route / SOCKS5 target"
    banner = f"recording: {listening} → {upstream}"
    if config.insecure:
        banner += "  WARNING: --insecure: the upstream certificate is NOT verified"
    try:
        BrowseApp([config.out_dir], live=view.queue, banner=banner, poll=0.5).run()
    finally:
        proxy.stop()
    return 0
