"""Reads capture files record by record, streaming, tolerant of a torn last record."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from popproxy.capture import format as fmt
from popproxy.capture.format import CaptureError, Record

MAX_META_LINE = 1 << 20  # no metadata record comes near this; a longer line means corruption


class CaptureReader:
    """One capture file.  ``records()`` streams; ``end()`` reads only the file's tail.

    A torn final record (the proxy was killed mid-write) is reported in ``warnings`` and
    reading stops there; damage before the last record raises ``CaptureError``.
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
        first = self._file.readline(MAX_META_LINE)
        try:
            header = json.loads(first)
        except ValueError:
            self._file.close()
            raise CaptureError(f"{self.path}: not a popproxy capture") from None
        if not isinstance(header, dict):
            self._file.close()
            raise CaptureError(f"{self.path}: not a popproxy capture")
        try:
            fmt.check_header(header)
        except CaptureError as exc:
            self._file.close()
            raise CaptureError(f"{self.path}: {exc}") from None
        self.header: dict[str, Any] = header
        self._body_start = self._resume = self._file.tell()
        self.size = os.fstat(self._file.fileno()).st_size

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
                    return
            if not follow:
                if not self.warnings:
                    self.warnings.append(
                        f"{self.path}: has no end record: the session was still running, or "
                        "popproxy was stopped abruptly; read up to the last complete record"
                    )
                return
            position = self._resume
            time.sleep(poll)
            self.size = os.fstat(self._file.fileno()).st_size

    def _records_from(self, position: int, follow: bool) -> Iterator[Record]:
        f = self._file
        f.seek(position)
        self._resume = position
        while True:
            start = f.tell()
            line = f.readline(MAX_META_LINE)
            if not line:
                return
            if not line.endswith(b"\n"):
                if follow:
                    f.seek(start)
                    return
                self._torn(start, "an incomplete record line")
                return
            try:
                fields = json.loads(line)
                kind = fields["r"]
            except (ValueError, KeyError, TypeError):
                if self._at_tail(f):
                    self._torn(start, "an unreadable last record")
                    return
                raise CaptureError(f"{self.path}: corrupt record at byte {start}") from None
            data = None
            if kind == fmt.DATA:
                n = fields.get("n")
                if not isinstance(n, int) or n < 0:
                    raise CaptureError(f"{self.path}: bad data length at byte {start}")
                data = f.read(n)
                nl = f.read(1)
                if len(data) < n or nl != b"\n":
                    if follow:
                        f.seek(start)
                        return
                    if len(data) < n or not nl:
                        self._torn(start, f"a data record cut short ({len(data)} of {n} octets)")
                        return
                    raise CaptureError(f"{self.path}: data record at byte {start} is malformed")
            self._resume = f.tell()
            yield Record(kind, fields, data)

    def end(self) -> dict[str, Any] | None:
        """The end record, read from the file's last bytes only (fast for huge captures)."""
        f = self._file
        tail = min(self.size - self._body_start, 65536)
        if tail <= 0:
            return None
        f.seek(self.size - tail)
        chunk = f.read(tail)
        marker = chunk.rfind(b'{"r":"end"')
        if marker < 0 or (marker > 0 and chunk[marker - 1 : marker] != b"\n"):
            return None
        rest = chunk[marker:]
        if rest.count(b"\n") != 1 or not rest.endswith(b"\n"):
            return None  # the end record must be the file's last line
        line = rest[:-1]
        try:
            fields = json.loads(line)
        except ValueError:
            return None
        return fields if isinstance(fields, dict) else None

    def _at_tail(self, f: IO[bytes]) -> bool:
        return f.tell() >= self.size

    def _torn(self, offset: int, what: str) -> None:
        self.warnings.append(
            f"{self.path}: ends with {what} at byte {offset}; read up to the last complete record"
        )


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
