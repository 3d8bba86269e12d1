"""The pytest plugin's recordings: whether one is usable, and replacing a capture only then."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from popproxy import fsutil
from popproxy.capture import format as fmt
from popproxy.capture.format import SUFFIX, CaptureError
from popproxy.capture.reader import CaptureReader
from popproxy.core import Direction

#: How a session may end and still be a recording worth keeping (docs/capture-format.md).
CLEAN_ENDS = frozenset({"quit", "closed", "client-closed", "server-closed"})
PREVIOUS = ".previous"  # mode ``all`` keeps what it replaced here (never played)


def problem(path: Path) -> str | None:
    """Why a new capture is not usable (None: it is): it must have reached the server and
    ended cleanly."""
    try:
        with CaptureReader(path) as reader:
            end = reader.end()
            if end is None:
                return f"{path.name}: the session did not end (no end record)"
            how = str(end.get("how") or "")
            if how not in CLEAN_ENDS:
                detail = end.get("error") or how
                if how == "proxy-shutdown":
                    detail = "the test left the POP3 session open"
                return f"{path.name}: the session ended with {how}: {detail}"
            connected = served = False
            for record in reader.records():
                if record.kind == fmt.EVENT and record.fields.get("kind") == "upstream-connected":
                    connected = True
                elif record.kind == fmt.DATA and record.direction is Direction.SERVER:
                    served = served or not record.proxy
            if not connected or not served:
                return f"{path.name}: the session never reached the POP3 server"
    except CaptureError as exc:
        return str(exc)
    return None


def _copy(src: Path, dst: Path) -> None:
    with fsutil.output_file(dst, replace=True) as out, src.open("rb") as f:
        while chunk := f.read(1 << 20):
            out.write(chunk)


def commit(new: list[Path], target: Path, *, keep_previous: bool, append: bool = False) -> None:
    """Put usable new captures at ``target`` (a ``.popcap`` file or a folder).

    A file is replaced in one rename.  A folder gets the new captures; unless ``append``,
    its old ``*.popcap`` files go (into ``.previous/`` with ``keep_previous``) once the
    new ones are in place.
    """
    if target.suffix == SUFFIX:
        if len(new) != 1:
            raise ValueError("a capture file holds one session")
        target.parent.mkdir(parents=True, exist_ok=True)
        if keep_previous and target.is_file():
            _copy(target, target.with_name(target.name + PREVIOUS))
        fsutil.move_file(new[0], target)
        return
    target.mkdir(parents=True, exist_ok=True)
    old = [] if append else sorted(target.glob(f"*{SUFFIX}"))
    placed: set[Path] = set()
    for capture in new:
        destination = target / capture.name
        fsutil.move_file(capture, destination)
        placed.add(destination)
    stale = [p for p in old if p not in placed]
    if keep_previous and stale:
        previous = target / PREVIOUS
        shutil.rmtree(previous, ignore_errors=True)
        previous.mkdir()
        for path in stale:
            os.replace(path, previous / path.name)
    else:
        for path in stale:
            path.unlink()
