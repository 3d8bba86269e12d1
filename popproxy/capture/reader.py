"""Reads capture files record by record, streaming, tolerant of a torn last record."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from popproxy.capture import format as fmt
from popproxy.capture.format import CaptureError, Record
from popproxy.capture.validate import (
    HEADER_SCHEMA,
    Invalid,
    check_fields,
    decode_line,
    parse_record,
)

MAX_META_LINE = 1 << 20  # no metadata record comes near this; a longer line means corruption
SKIP_BY_SEEK = 1 << 12  # end() reads smaller data records rather than seek over them


class CaptureReader:
    """One capture file.  ``records()`` streams; ``end()`` walks record headers only.

    Every record line is checked against the format (docs/capture-format.md, "Reading
    untrusted captures"): strict JSON, typed fields, declared lengths within the file.  A
    torn final record (the proxy was killed mid-write) is reported in ``warnings`` and
    reading stops there; damage before the last record raises ``CaptureError`` naming
    its byte offset.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.warnings: list[str] = []
        try:
            self._file: IO[bytes] = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        except IsADirectoryError:
            raise CaptureError(f"{self.path}: is a folder, not a capture") from None
        except OSError as exc:
            raise CaptureError(f"{self.path}: {exc.strerror or exc}") from None
        try:
            self.header: dict[str, Any] = self._read_header()
            self.size = os.fstat(self._file.fileno()).st_size
        except BaseException:
            self._file.close()
            raise
        self._body_start = self._resume = self._file.tell()  # the header line's length

    def _read_header(self) -> dict[str, Any]:
        try:
            first = self._file.readline(MAX_META_LINE + 1)
        except OSError as exc:
            raise CaptureError(f"{self.path}: {exc.strerror or exc}") from None
        try:
            header = decode_line(first)
        except Invalid:
            raise CaptureError(f"{self.path}: not a popproxy capture") from None
        try:
            fmt.check_header(header)
        except CaptureError as exc:
            raise CaptureError(f"{self.path}: {exc}") from None
        if not first.endswith(b"\n"):
            raise CaptureError(f"{self.path}: the capture header is cut short")
        try:
            check_fields(header, HEADER_SCHEMA)
        except Invalid as exc:
            raise CaptureError(f"{self.path}: corrupt capture header: {exc}") from None
        return header

    @property
    def position(self) -> int:
        """File offset just past the last record read (for progress bars)."""
        return self._resume

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def records(self, *, follow: bool = False, poll: float = 0.2) -> Iterator[Record]:
        """Every record after the header, in file order; unknown kinds are yielded as-is.

        With ``follow`` (a capture still being written) it waits for more records until the
        end record arrives; stop it by closing the generator.
        """
        position = self._body_start
        while True:
            for record in self._records_from(position, follow):
                yield record
                if record.kind == fmt.END:
                    self._after_end()
                    return
            if not follow:
                self._no_end()
                return
            position = self._resume
            time.sleep(poll)
            self.size = os.fstat(self._file.fileno()).st_size

    def end(self) -> dict[str, Any] | None:
        """The end record, or None if the capture has none (yet).

        Found structurally: the walk reads each record's line and seeks over its data by the
        declared length, so bytes inside a data record (a peer's) can never pose as the end
        record.  Corruption raises ``CaptureError``, exactly as ``records()`` would.
        """
        self.size = os.fstat(self._file.fileno()).st_size
        for record in self._records_from(self._body_start, False, skip_data=True):
            if record.kind == fmt.END:
                self._after_end()
                return record.fields
        self._no_end()
        return None

    def _no_end(self) -> None:
        if not self.warnings:
            self.warnings.append(
                f"{self.path}: has no end record: the session was still running, or "
                "popproxy was stopped abruptly; read up to the last complete record"
            )

    def _after_end(self) -> None:
        # popproxy writes the end record last; anything after it is damage, not a tail.
        extra = os.fstat(self._file.fileno()).st_size - self._resume
        if extra > 0:
            raise self._corrupt(self._resume, f"{extra:,} octets after the end record")

    def _records_from(
        self, position: int, follow: bool, *, skip_data: bool = False
    ) -> Iterator[Record]:
        # The offset is counted here, not asked of the file: tell() costs a system call.
        f = self._file
        f.seek(position)
        self._resume = pos = position
        while True:
            start = pos
            line = f.readline(MAX_META_LINE + 1)
            if not line:
                return
            pos += len(line)
            if not line.endswith(b"\n"):
                if len(line) > MAX_META_LINE:
                    why = f"a record line longer than {MAX_META_LINE:,} octets"
                    raise self._corrupt(start, why)
                if follow:
                    f.seek(start)
                    return
                self._torn(start, "an incomplete record line")
                return
            try:
                kind, fields = parse_record(line)
            except Invalid as exc:
                if pos >= self.size:  # the last line: what a torn write can leave
                    self._torn(start, f"an unreadable last record ({exc})")
                    return
                raise self._corrupt(start, str(exc)) from None
            data = None
            if kind == fmt.DATA:
                n: int = fields["n"]
                if pos + n + 1 > self.size:
                    if follow:
                        f.seek(start)
                        return
                    left = max(self.size - pos, 0)
                    self._torn(start, f"a data record cut short ({left:,} of {n:,} octets)")
                    return
                if not skip_data:
                    data = f.read(n)
                    tail = f.read(1)
                elif n > SKIP_BY_SEEK:
                    f.seek(n, os.SEEK_CUR)  # a seek empties the read buffer: only when it pays
                    tail = f.read(1)
                else:
                    tail = f.read(n + 1)[n:]
                pos += n + 1
                if tail != b"\n" or (data is not None and len(data) != n):
                    why = f"the data record of {n:,} octets has no LF after it"
                    raise self._corrupt(start, why)
            self._resume = pos
            yield Record(kind, fields, data)

    def _corrupt(self, offset: int, why: str) -> CaptureError:
        return CaptureError(f"{self.path}: corrupt record at byte {offset:,}: {why}")

    def _torn(self, offset: int, what: str) -> None:
        self._warn(
            f"{self.path}: ends with {what} at byte {offset:,}; read up to the last complete record"
        )

    def _warn(self, warning: str) -> None:
        if warning not in self.warnings:
            self.warnings.append(warning)


def capture_paths(targets: list[str]) -> list[Path]:
    """Expand files and folders (their ``*.popcap`` files, by name) into capture paths."""
    paths: list[Path] = []
    for target in targets:
        path = Path(target)
        if path.is_dir():
            paths.extend(sorted(path.glob(f"*{fmt.SUFFIX}")))
        else:
            paths.append(path)
    return paths


def some_capture_paths(targets: list[str]) -> list[Path]:
    """``capture_paths``, and a ``CaptureError`` when the targets hold no capture at all."""
    paths = capture_paths(targets)
    if not paths:
        raise CaptureError(f"no captures in {' '.join(targets)}")
    return paths
