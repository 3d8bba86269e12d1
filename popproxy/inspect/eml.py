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
    exporter = _Exporter(folder, out, capture_identity(reader), include_top, replace)
    try:
        for _record, _t, events in metered_events(reader, progress):
            for event in events:
                exporter.event(event)
        exporter.close_open_bodies()
    finally:
        exporter.discard_open_bodies()  # an error stopped the export: leave no temp files
        folder.close()
    return exporter.result


class _Exporter:
    """Follows one capture's events: UIDs from UIDL listings, message bodies to temp files."""

    def __init__(
        self, folder: fsutil.Folder, out: Path, prefix: str, include_top: bool, replace: bool
    ) -> None:
        self.folder, self.out, self.prefix, self.replace = folder, out, prefix, replace
        self.verbs = ("RETR", "TOP") if include_top else ("RETR",)
        self.result = EmlResult()
        self.uids: dict[int, str] = {}
        self.commands: dict[int, tuple[str, int | None]] = {}
        self.uidl_bodies: set[int] = set()
        self.bodies: dict[int, _Body] = {}
        self.count = 0

    def event(self, event: object) -> None:
        if isinstance(event, Command):
            self.commands[event.seq] = (event.verb, message_number(event.args))
        elif isinstance(event, Reply):
            self._reply(event)
        elif isinstance(event, BodyChunk):
            body = self.bodies.get(event.seq)
            if body is not None:
                body.file.write(event.data)
                body.octets += len(event.data)
        elif isinstance(event, BodyEnd):
            if event.seq in self.uidl_bodies:
                self.uidl_bodies.discard(event.seq)
                for entry in event.listing or ():
                    if len(entry) >= 2 and entry[0].isdigit():
                        self.uids[int(entry[0])] = entry[1]
            body = self.bodies.pop(event.seq, None)
            if body is not None:
                self._finish(body, event.truncated)

    def _reply(self, event: Reply) -> None:
        verb, number = self.commands.pop(event.seq, (event.verb, None))
        if event.status != "+OK":
            return
        if verb == "UIDL" and event.value is not None and len(event.value) >= 2:
            # RFC 1939 §7: "UIDL msg" answers "+OK msg unique-id".
            n, uid = event.value[0], event.value[1]
            if isinstance(n, int):
                self.uids[n] = str(uid)
        elif verb == "UIDL" and event.multiline:
            self.uidl_bodies.add(event.seq)
        elif verb in self.verbs and event.multiline:
            try:
                fd, tmp = self.folder.temp(f"popproxy-{event.seq}.eml")
            except OSError as exc:
                raise CaptureError(f"cannot write to {self.out}: {exc.strerror or exc}") from None
            self.bodies[event.seq] = _Body(verb, number, tmp, os.fdopen(fd, "wb"))

    def _name(self, body: _Body, truncated: bool) -> str:
        if body.number is None:
            ident = "msg-unknown"
        else:
            ident = safe_part(self.uids.get(body.number, "")) or f"msg-{body.number}"
        name = f"{self.prefix}-{self.count:04d}-{body.verb}-{ident}"
        if body.verb == "TOP":
            name += "-top"
        if truncated:
            name += ".partial"
        return f"{name}.eml"

    def _finish(self, body: _Body, truncated: bool) -> None:
        body.file.close()
        self.count += 1
        final = self.out / self._name(body, truncated)
        try:
            self.folder.publish(body.tmp, final.name, replace=self.replace)
        except OSError as exc:
            self.folder.discard(body.tmp)
            if isinstance(exc, fsutil.Exists):
                raise
            raise CaptureError(f"cannot write {final}: {exc.strerror or exc}") from None
        self.result.written.append(final)
        if truncated:
            self.result.partial.append(final)
            self.result.warnings.append(
                f"{body.verb} {body.number if body.number is not None else '?'} was cut off "
                f"after {body.octets:,} octets; kept as {final.name}"
            )

    def close_open_bodies(self) -> None:
        """Bodies the capture never finished: kept as ``.partial`` files."""
        for _seq, body in sorted(self.bodies.items()):
            self._finish(body, True)
        self.bodies.clear()

    def discard_open_bodies(self) -> None:
        for body in self.bodies.values():
            body.file.close()
            self.folder.discard(body.tmp)
        self.bodies.clear()
