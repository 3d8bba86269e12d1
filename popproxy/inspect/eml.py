"""``export --eml``: every retrieved message as an .eml file, written while it streams past."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from popproxy import fsutil
from popproxy.capture.format import CaptureError
from popproxy.capture.reader import CaptureReader
from popproxy.core import BodyChunk, BodyEnd, Command, Reply
from popproxy.inspect import Progress, metered_events

_UNSAFE = re.compile(r"[^A-Za-z0-9._@+=-]+")
MAX_NAME_PART = 80


@dataclass
class EmlResult:
    """What ``export_eml`` wrote: final paths (partial ones too) and warnings to show."""

    written: list[Path] = field(default_factory=list)
    partial: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Body:
    verb: str
    number: int | None
    tmp: str  # a temp file's name in the output folder
    file: IO[bytes]
    octets: int = 0


def safe_part(text: str) -> str:
    """``text`` reduced to characters safe in a file name on every system."""
    # RFC 1939 §7: a unique-id is 1-70 characters 0x21-0x7E, so "/" and ":" can occur.
    cleaned = _UNSAFE.sub("_", text).strip("._")
    return cleaned[:MAX_NAME_PART]


def message_number(args: str | None) -> int | None:
    """The msg argument of ``RETR msg`` / ``TOP msg n`` (RFC 1939 §7), if it is a number."""
    words = (args or "").split()
    if not words or not words[0].isdigit() or len(words[0]) > 9:
        return None
    return int(words[0])


def capture_identity(reader: CaptureReader) -> str:
    """What names this capture's exports: its file name's stem, made safe for file names.

    popproxy names captures by start time to the microsecond and session number, so two
    captures never share one; a capture renamed by hand keeps the name it was given.
    """
    return safe_part(reader.path.stem) or "capture"


def export_eml(
    reader: CaptureReader,
    out: Path,
    *,
    include_top: bool = False,
    replace: bool = False,
    progress: Progress | None = None,
) -> EmlResult:
    """Write each RETR body (and TOP body with ``include_top``) to ``out`` as an .eml file.

    The file holds the body as the client received it after un-stuffing (RFC 1939 §3):
    every octet between the status line and the terminating ``.`` line, leading dots
    removed.  Names are ``<capture>-<nnnn>-<VERB>-<uid>.eml``, ``<capture>`` being the
    capture file's stem and the uid taken from the session's UIDL listings, else
    ``msg-<n>``; a body cut off by a close gets ``.partial``.  Each body is written to a
    private temp file and renamed into place when complete; an existing name raises
    ``fsutil.Exists`` unless ``replace``.
    """
    try:
        folder = fsutil.Folder(out)
    except OSError as exc:
        raise CaptureError(f"cannot write to {out}: {exc.strerror or exc}") from None
    verbs = ("RETR", "TOP") if include_top else ("RETR",)
    ident_prefix = capture_identity(reader)
    result = EmlResult()
    uids: dict[int, str] = {}
    commands: dict[int, tuple[str, int | None]] = {}
    uidl_bodies: set[int] = set()
    bodies: dict[int, _Body] = {}
    count = 0

    def finish(seq: int, body: _Body, truncated: bool) -> None:
        nonlocal count
        body.file.close()
        count += 1
        if body.number is None:
            ident = "msg-unknown"
        else:
            ident = safe_part(uids.get(body.number, "")) or f"msg-{body.number}"
        name = f"{ident_prefix}-{count:04d}-{body.verb}-{ident}"
        if body.verb == "TOP":
            name += "-top"
        if truncated:
            name += ".partial"
        final = out / f"{name}.eml"
        try:
            folder.publish(body.tmp, final.name, replace=replace)
        except OSError as exc:
            folder.discard(body.tmp)
            if isinstance(exc, fsutil.Exists):
                raise
            raise CaptureError(f"cannot write {final}: {exc.strerror or exc}") from None
        result.written.append(final)
        if truncated:
            result.partial.append(final)
            result.warnings.append(
                f"{body.verb} {body.number if body.number is not None else '?'} was cut off "
                f"after {body.octets:,} octets; kept as {final.name}"
            )

    try:
        for _record, _t, events in metered_events(reader, progress):
            for event in events:
                if isinstance(event, Command):
                    commands[event.seq] = (event.verb, message_number(event.args))
                elif isinstance(event, Reply):
                    verb, number = commands.pop(event.seq, (event.verb, None))
                    if event.status != "+OK":
                        continue
                    if verb == "UIDL" and event.value is not None and len(event.value) >= 2:
                        # RFC 1939 §7: "UIDL msg" answers "+OK msg unique-id".
                        n, uid = event.value[0], event.value[1]
                        if isinstance(n, int):
                            uids[n] = str(uid)
                    elif verb == "UIDL" and event.multiline:
                        uidl_bodies.add(event.seq)
                    elif verb in verbs and event.multiline:
                        try:
                            fd, tmp = folder.temp(f"popproxy-{event.seq}.eml")
                        except OSError as exc:
                            raise CaptureError(
                                f"cannot write to {out}: {exc.strerror or exc}"
                            ) from None
                        handle = os.fdopen(fd, "wb")
                        bodies[event.seq] = _Body(verb, number, tmp, handle)
                elif isinstance(event, BodyChunk):
                    body = bodies.get(event.seq)
                    if body is not None:
                        body.file.write(event.data)
                        body.octets += len(event.data)
                elif isinstance(event, BodyEnd):
                    if event.seq in uidl_bodies:
                        uidl_bodies.discard(event.seq)
                        for entry in event.listing or ():
                            if len(entry) >= 2 and entry[0].isdigit():
                                uids[int(entry[0])] = entry[1]
                    body = bodies.pop(event.seq, None)
                    if body is not None:
                        finish(event.seq, body, event.truncated)
        for seq, body in sorted(bodies.items()):
            finish(seq, body, True)
        bodies.clear()
    finally:
        for body in bodies.values():  # an error stopped the export: leave no temp files
            body.file.close()
            folder.discard(body.tmp)
        folder.close()
    return result
