"""Beside the relay: feeds the observer, the capture writer and the live view, never raising."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from popproxy.capture.writer import CaptureWriter
from popproxy.core import (
    Direction,
    Event,
    Observer,
    PopproxyClosed,
    PopproxySent,
    Secret,
    SecretKind,
)
from popproxy.core.transcript import Item, ItemKind, TranscriptBuilder

ViewSink = Callable[[list[Item]], None]
LIVE_LISTINGS = frozenset({"CAPA", "AUTH"})


class Tap:
    """One session's parse-and-record side.  Synchronous and bounded per chunk.

    A bug in the observer can only spoil the transcript: the tap catches it, records it,
    treats the rest of the session as opaque, and from then on redacts every client byte
    (it can no longer tell where credentials are).
    """

    def __init__(
        self,
        writer: CaptureWriter,
        view: ViewSink | None,
        *,
        body_items: int = 0,
        summaries: bool = True,
    ) -> None:
        self.writer = writer
        self.view = view
        # Live, only what a person may be shown is worked out: listings of CAPA and AUTH,
        # message summaries when a view shows them; `popproxy show` re-reads the rest.
        self.observer = Observer(listings=LIVE_LISTINGS, count_lines=view is not None)
        self.builder = TranscriptBuilder(
            hash_bodies=False,
            body_items=body_items,
            scan_attachments=summaries and view is not None,  # names only: a cheap find
            summarise_messages=summaries and view is not None,
        )
        self.offsets = {Direction.CLIENT: 0, Direction.SERVER: 0}
        self.broken: str | None = None

    def data(
        self,
        direction: Direction,
        t: float,
        data: bytes,
        *,
        proxy: bool = False,
        why: str | None = None,
    ) -> list[Event]:
        """Account for a chunk ``direction`` sent (``proxy``: popproxy made it, ``why``);
        b"" is EOF."""
        start = self.offsets[direction]
        self.offsets[direction] += len(data)
        mark: list[Event] = []
        if data:
            self.writer.data(direction, t, data, proxy=proxy, why=why)
            if proxy:
                mark = [PopproxySent(direction, start, len(data), why or "sent by popproxy")]
        else:
            if proxy:  # popproxy ended this direction itself (shutdown, error)
                why = why or "popproxy closed"
                mark = [PopproxyClosed(direction, why)]
            self.writer.eof(direction, t, proxy=proxy, why=why)
        events = self._guard(
            lambda: self.observer.receive_data(direction, data), direction, len(data)
        )
        if mark:
            events = mark + events
        self._settle(t, events)
        return events

    def start_tls(
        self, direction: Direction, t: float, info: dict[str, Any], *, decrypted: bool = True
    ) -> list[Event]:
        fields = self.writer.tls(direction, t, info, decrypted=decrypted)
        events = self._guard(
            lambda: self.observer.start_tls(direction, decrypted=decrypted), direction, 0
        )
        self._settle(t, events, tls=fields)
        return events

    def note(self, t: float, text: str) -> None:
        """Show one of popproxy's own actions (a drop, a strip, a note) in the live view."""
        if self.view is not None:
            self.view([Item(ItemKind.NOTE, t, None, text)])

    def drop(self, direction: Direction, offset: int, length: int, why: str) -> None:
        """Bytes of ``direction``'s stream that popproxy received but did not forward."""
        self.writer.drop(direction, offset, length, why)

    def event(self, t: float, kind: str, **fields: str | int | None) -> None:
        self.writer.event(t, kind, **fields)

    def _guard(
        self, call: Callable[[], list[Event]], direction: Direction, length: int
    ) -> list[Event]:
        if self.broken is None:
            try:
                return call()
            except Exception as exc:  # a parser bug must never reach the relay
                self.broken = "".join(traceback.format_exception_only(exc)).strip()
                self.writer.event(None, "observer-error", detail=self.broken)
                # Every client byte not yet on disk may hold a credential the observer was
                # still deciding about (held SASL lines): redact all of it.
                length = self.offsets[Direction.CLIENT] - self.writer.written(Direction.CLIENT)
                direction = Direction.CLIENT
        if direction is Direction.CLIENT and length and not self.writer.keep_secrets:
            start = self.offsets[direction] - length
            return [Secret(direction, start, length, SecretKind.SASL)]
        return []

    def _settle(self, t: float, events: list[Event], tls: dict[str, Any] | None = None) -> None:
        writer = self.writer
        writer.observe(events)
        if self.broken is None:
            writer.advance(
                self.observer.settled(Direction.CLIENT), self.observer.settled(Direction.SERVER)
            )
        else:
            writer.advance(self.offsets[Direction.CLIENT], self.offsets[Direction.SERVER])
        if events:
            items = self.builder.feed(t, events)
            if tls is not None:  # the live view shows what the capture's TLS record says
                items = [
                    Item(i.what, i.t, i.exchange, tls) if i.what == "tls" else i for i in items
                ]
            if items and self.view is not None:
                self.view(items)
