"""``export --streams``: the bytes each side sent, as two files, written while they stream."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from popproxy import fsutil
from popproxy.capture import format as fmt
from popproxy.capture.format import CaptureError
from popproxy.capture.reader import CaptureReader
from popproxy.core import Direction
from popproxy.inspect import Progress, metered_records


@dataclass(frozen=True)
class Streams:
    """What ``export_streams`` wrote: octets per side, and how many spans are '#' filler."""

    client: int
    server: int
    redacted: int


STREAM_NAMES = {Direction.CLIENT: "client.bin", Direction.SERVER: "server.bin"}


def export_streams(
    reader: CaptureReader,
    out: Path,
    *,
    replace: bool = False,
    progress: Progress | None = None,
) -> Streams:
    """The bytes each side sent, as recorded: popproxy's own bytes are left out.

    Both files are written to private temp files and renamed into place at the end; an
    existing ``client.bin`` or ``server.bin`` raises ``fsutil.Exists`` unless ``replace``.
    """
    try:
        folder = fsutil.Folder(out)
    except OSError as exc:
        raise CaptureError(f"cannot write to {out}: {exc.strerror or exc}") from None
    with folder:
        for name in STREAM_NAMES.values():
            if not replace and folder.taken(name):
                raise fsutil.Exists(out / name)
        temps: dict[Direction, str] = {}
        files: dict[Direction, IO[bytes]] = {}
        try:
            for d, name in STREAM_NAMES.items():
                fd, temps[d] = folder.temp(name)
                files[d] = os.fdopen(fd, "wb", buffering=1 << 20)
            sizes, redacted = _write_streams(reader, files, progress)
            for f in files.values():
                f.close()
            for d, name in STREAM_NAMES.items():
                folder.publish(temps.pop(d), name, replace=replace)
        finally:
            for f in files.values():
                f.close()
            for temp in temps.values():
                folder.discard(temp)
    return Streams(sizes[Direction.CLIENT], sizes[Direction.SERVER], redacted)


def _write_streams(
    reader: CaptureReader, files: dict[Direction, IO[bytes]], progress: Progress | None
) -> tuple[dict[Direction, int], int]:
    sizes = {Direction.CLIENT: 0, Direction.SERVER: 0}
    redacted = 0
    for record in metered_records(reader, progress):
        if record.kind == fmt.DATA and record.data is not None and not record.proxy:
            d = record.direction
            if d is not None:
                files[d].write(record.data)
                sizes[d] += len(record.data)
        elif record.kind == fmt.REDACT and record.fields.get("masked", True):
            redacted += 1
    return sizes, redacted
