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

    Flushing (``start``): small batches are written by one task shared by every session
    of the trio run (``_Ticker``), FLUSH_INTERVAL after they were recorded; a session
    whose batches grow large gets a writer task of its own, started in its nursery when
    first needed, that writes in a worker thread.  Pumps call ``changed`` after
    recording and ``room``/``wait_for_room`` before reading, which bounds what a failing
    disk can lose.
    """

    def __init__(self, path: Path, fd: int, writer: CaptureWriter) -> None:
        self.path = path
        self.writer = writer
        self.error: str | None = None  # the first write failure, in words
        self.lost = 0  # record bytes (data included) that never reached the file
        self._fd: int | None = fd
        self._in_flight = 0  # bytes being written by the writer task (0: none)
        self._nursery: trio.Nursery | None = None
        self._failed: Callable[[str], None] = _ignore
        self._writing = False  # the writer task has been started
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

    def start(self, nursery: trio.Nursery, failed: Callable[[str], None]) -> None:
        """Flush from now on; a write failure calls ``failed(reason)`` (the session stops
        relaying): the budget bounds what was relayed and is not on disk."""
        self._nursery, self._failed = nursery, failed
        if self.writer.buffered:
            self.changed()

    async def run(self, failed: Callable[[str], None]) -> None:
        """``start`` for a caller with no nursery at hand: flushes until cancelled."""
        async with trio.open_nursery() as nursery:
            self.start(nursery, failed)
            await trio.sleep_forever()

    def changed(self) -> None:
        """Records were added: they reach the file within FLUSH_INTERVAL, large ones sooner."""
        if self.error is not None or self._nursery is None:
            return
        if self.writer.buffered >= FLUSH_SIZE:
            self._wake_writer()
        else:
            _ticker().add(self)

    async def wait_for_room(self) -> None:
        """Wait until a write has made room (returns at once after a write failure)."""
        while self.room() < MIN_ROOM and self.error is None:
            self._wake_writer()
            await self._space.wait()

    def _wake_writer(self) -> None:
        if not self._writing and self._nursery is not None:
            self._writing = True
            self._nursery.start_soon(self._write_large)
        self._wake.set()

    def _tick(self) -> None:
        """The shared ticker's turn: write a small batch here, or leave it to the writer."""
        if self.error is not None or self._fd is None or self._in_flight:
            return  # finished, failed, or the writer task is on it (and looks again)
        size = self.writer.buffered
        if size > SMALL_WRITE:
            self._wake_writer()
        elif size:
            # A few KiB into the page cache cost less than a thread hop.
            pieces = self.writer.take()
            try:
                self._write(pieces)
            except OSError as exc:
                self._fail(exc, size)
            self._wake_pumps()

    async def _write_large(self) -> None:
        """This session's writer: goes on writing while batches are large (the pumps
        fill the next one meanwhile), so the disk is kept busy and the pumps seldom wait."""
        writer = self.writer
        while self.error is None:
            await self._wake.wait()
            self._wake = trio.Event()
            while writer.buffered:
                size = writer.buffered
                pieces = writer.take()
                self._in_flight = size
                try:
                    if size <= SMALL_WRITE:
                        self._write(pieces)
                    else:
                        await trio.to_thread.run_sync(self._write, pieces)
                except trio.Cancelled:
                    # Cancelled before the thread started: hand the records back, so the
                    # end-of-session write still puts them on disk.
                    writer.untake(pieces)
                    raise
                except OSError as exc:
                    self._fail(exc, size)
                    return
                finally:
                    self._in_flight = 0
                self._wake_pumps()
                if writer.buffered < FLUSH_SIZE:
                    break  # the rest is small: the shared ticker writes it
            if writer.buffered:
                _ticker().add(self)

    def _fail(self, exc: OSError, size: int) -> None:
        self.error = f"capture write failed: {write_error(exc)}"
        self.lost = size
        self._wake_pumps()
        self._failed(self.error)

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
        self._let_go()
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
        self._let_go()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _let_go(self) -> None:
        """The session is over: drop what refers back to it (its nursery, its ``failed``),
        so it is freed as soon as it ends, not by a later garbage collection."""
        self._nursery, self._failed = None, _ignore

    def _write(self, pieces: list[bytes]) -> None:
        assert self._fd is not None
        self._write_fd(self._fd, pieces)

    @staticmethod
    def _write_fd(fd: int, pieces: list[bytes]) -> None:
        fmt.write_all(fd, pieces)

    def _wake_pumps(self) -> None:
        self._space.set()
        self._space = trio.Event()


def _ignore(reason: str) -> None:
    """``failed`` before ``start``: nothing relays yet."""


class _Ticker:
    """One task per trio run writes the small batches of every session, FLUSH_INTERVAL
    after the first was recorded: a session costs no task and no timer of its own."""

    def __init__(self) -> None:
        self._dirty: dict[Recorder, None] = {}
        self._due = trio.Event()

    def add(self, recorder: Recorder) -> None:
        if recorder not in self._dirty:
            self._dirty[recorder] = None
            self._due.set()

    async def run(self) -> None:
        while True:
            await self._due.wait()  # idle sessions cost no wake-ups
            self._due = trio.Event()
            await trio.sleep(FLUSH_INTERVAL)  # gather records per write
            dirty, self._dirty = self._dirty, {}
            for recorder in dirty:
                try:
                    recorder._tick()
                except Exception as exc:  # a bug here must not stop the other sessions
                    recorder._fail(OSError(errno.EIO, f"{type(exc).__name__}: {exc}"), 0)


_TICKER: trio.lowlevel.RunVar[_Ticker] = trio.lowlevel.RunVar("popproxy_capture_ticker")


def _ticker() -> _Ticker:
    """The run's shared ticker, started (as a system task) on first use."""
    try:
        return _TICKER.get()
    except LookupError:
        ticker = _Ticker()
        _TICKER.set(ticker)
        trio.lowlevel.spawn_system_task(ticker.run, name="popproxy capture flusher")
        return ticker
