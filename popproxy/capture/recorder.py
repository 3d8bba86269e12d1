"""One session's capture file: create, flush, the unwritten-bytes budget, write errors, end."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from popproxy.capture import format as fmt
from popproxy.capture.format import SessionEnd
from popproxy.capture.writer import CaptureWriter, create_capture_file
from popproxy.netutil import describe_error

FLUSH_INTERVAL = 0.05  # relayed bytes reach the file well within ~100 ms (crash safety)
FLUSH_SIZE = 256 << 10  # a pump wakes the flusher early once this much waits
SMALL_WRITE = 64 << 10  # smaller batches are written inline, larger ones in a worker thread
# Save or stop: at most this many relayed bytes may be not yet on disk at any time, so a
# failing disk leaves at most this much relayed but unrecorded (the pumps size their
# reads to the room left, and wait when there is none).
UNRECORDED_BUDGET = 1 << 20
MIN_ROOM = 16 << 10  # below this a pump waits for the flusher rather than read a sliver


class CaptureUnavailable(OSError):
    """A capture file cannot be created; ``reason`` says where and why, ``cause`` why."""

    def __init__(self, folder: Path, exc: OSError) -> None:
        self.cause = write_error(exc)
        self.reason = f"cannot create a capture file in {folder}: {describe_error(exc)}"
        super().__init__(self.reason)


def write_error(exc: OSError) -> str:
    """A write failure in words (ENOSPC, EFBIG, EIO, EROFS...)."""
    if exc.errno == errno.ENOSPC:
        return "disk full"
    return describe_error(exc)


class Recorder:
    """Owns a capture's descriptor and its writer: the only code that writes capture files.

    ``run`` is the flusher (one per session); pumps call ``changed`` after recording and
    ``room``/``wait_for_room`` before reading, which bounds what a failing disk can lose.
    """

    def __init__(self, path: Path, fd: int, writer: CaptureWriter) -> None:
        self.path = path
        self.writer = writer
        self.error: str | None = None  # the first write failure, in words
        self.lost = 0  # record bytes (data included) that never reached the file
        self._fd: int | None = fd
        self._in_flight = 0
        self._dirty = trio.Event()
        self._wake = trio.Event()
        self._space = trio.Event()

    @classmethod
    def create(cls, path: Path, header: dict[str, Any], *, keep_secrets: bool) -> Recorder:
        """Create the file exclusively and write its header at once (a capture from now on).

        Raises ``CaptureUnavailable`` with the reason; nothing is left behind then.
        """
        folder = path.parent
        try:
            fd = create_capture_file(path)
        except OSError as exc:
            raise CaptureUnavailable(folder, exc) from None
        writer = CaptureWriter(header, keep_secrets=keep_secrets)
        try:
            fmt.write_all(fd, writer.take())
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()  # an empty file would only fail to read later
            raise CaptureUnavailable(folder, exc) from None
        return cls(path, fd, writer)

    @property
    def unwritten(self) -> int:
        """Bytes handed to the writer that are not on disk yet (in a write included)."""
        return self.writer.buffered + self._in_flight

    def room(self) -> int:
        """How many more bytes may be read and relayed before the disk must catch up."""
        return UNRECORDED_BUDGET - self.unwritten

    def changed(self) -> None:
        """Records were added: the flusher writes them within FLUSH_INTERVAL."""
        self._dirty.set()
        if self.writer.buffered > FLUSH_SIZE:
            self._wake.set()

    async def wait_for_room(self) -> None:
        """Wait until the flusher has made room (returns at once after a write failure)."""
        while self.room() < MIN_ROOM and self.error is None:
            self._wake.set()
            await self._space.wait()

    async def run(self, failed: Callable[[str], None]) -> None:
        """The flusher: write what the writer released, every FLUSH_INTERVAL or sooner.

        While a batch is being written the pumps read the next one: the flusher goes on
        writing until little is left, so the disk is kept busy and the pumps seldom wait
        for room.  On a write failure it calls ``failed(reason)`` (the session stops
        relaying) and returns: the budget bounds what was relayed and is not on disk.
        """
        writer = self.writer
        while True:
            await self._dirty.wait()  # an idle session costs no wake-ups
            self._dirty = trio.Event()
            if writer.buffered < FLUSH_SIZE:
                with trio.move_on_after(FLUSH_INTERVAL):  # gather records per write...
                    await self._wake.wait()  # ... unless a pump says there is a lot already
            self._wake = trio.Event()
            while True:
                size = writer.buffered
                pieces = writer.take()
                if not pieces:
                    break
                self._in_flight = size
                try:
                    if size <= SMALL_WRITE:
                        # A few KiB into the page cache cost less than a thread hop.
                        self._write(pieces)
                    else:
                        await trio.to_thread.run_sync(self._write, pieces)
                except trio.Cancelled:
                    # Cancelled before the thread started: hand the records back, so the
                    # end-of-session write still puts them on disk.
                    writer.untake(pieces)
                    raise
                except OSError as exc:
                    self.error = f"capture write failed: {write_error(exc)}"
                    self.lost = size
                    self._wake_pumps()
                    failed(self.error)
                    return
                finally:
                    self._in_flight = 0
                self._wake_pumps()
                if writer.buffered < FLUSH_SIZE:
                    break  # the rest is gathered (or written once a pump says so)
            self._wake_pumps()

    def failure(self) -> str | None:
        """The write failure and what it cost, in words (None: every record was written)."""
        if self.error is None:
            return None
        return (
            f"{self.error}; up to {self.lost:,} octets were relayed unrecorded "
            f"(the bound is {UNRECORDED_BUDGET:,})"
        )

    def finish(self, end: SessionEnd) -> str | None:
        """Write everything left and the end record, close the file; the error, if any."""
        writer = self.writer
        # "unrecorded" is only read if this record reaches the disk after all.
        writer.end(end, unrecorded=None if self.error is None else self.lost)
        pieces = writer.take()
        fd, self._fd = self._fd, None
        if fd is None:
            return self.error
        try:
            if self.error is None:
                self._write_fd(fd, pieces)
            else:
                # The disk failed already: try once, the end record may still fit.
                with contextlib.suppress(OSError):
                    self._write_fd(fd, pieces)
        except OSError as exc:
            self.error = f"capture write failed: {write_error(exc)}"
            self.lost += sum(len(p) for p in pieces)
        finally:
            os.close(fd)
        return self.error

    def close(self) -> None:
        """Close without an end record (the session never started)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _write(self, pieces: list[bytes]) -> None:
        assert self._fd is not None
        self._write_fd(self._fd, pieces)

    @staticmethod
    def _write_fd(fd: int, pieces: list[bytes]) -> None:
        fmt.write_all(fd, pieces)

    def _wake_pumps(self) -> None:
        self._space.set()
        self._space = trio.Event()
