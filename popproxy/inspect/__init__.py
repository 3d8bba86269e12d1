"""Offline work on captures: the exporters (.eml, text, HTML, pcap) and their shared helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from popproxy.capture.events import replay_events
from popproxy.capture.format import Record
from popproxy.capture.reader import CaptureReader
from popproxy.core import Event

#: Called now and then with the number of capture-file bytes read so far.
Progress = Callable[[int], None]

_REPORT_EVERY = 1 << 20  # call the progress callback about once per MiB


def record_size(record: Record) -> int:
    """About how many file bytes ``record`` took: its JSON line, its data and the LF."""
    size = 24 + 12 * len(record.fields)  # a metadata line, give or take; exactness is moot
    if record.data is not None:
        size += len(record.data) + 1
    return size


class Meter:
    """Counts bytes read and calls ``progress`` once per MiB (and at the end)."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.done = 0
        self._reported = 0

    def add(self, record: Record | None) -> None:
        if self.progress is None or record is None:
            return
        self.done += record_size(record)
        if self.done - self._reported >= _REPORT_EVERY:
            self._reported = self.done
            self.progress(self.done)

    def finish(self, total: int) -> None:
        if self.progress is not None:
            self.progress(total)


def metered_records(reader: CaptureReader, progress: Progress | None) -> Iterator[Record]:
    """``reader.records()`` with progress reports."""
    meter = Meter(progress)
    for record in reader.records():
        meter.add(record)
        yield record
    meter.finish(reader.size)


def metered_events(
    reader: CaptureReader, progress: Progress | None
) -> Iterator[tuple[Record | None, float, list[Event]]]:
    """``replay_events(reader)`` with progress reports."""
    meter = Meter(progress)
    for record, t, events in replay_events(reader):
        meter.add(record)
        yield record, t, events
    meter.finish(reader.size)
