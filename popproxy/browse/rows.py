"""The session list's model: one row per capture, from headers and end records only."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from popproxy.capture import format as fmt
from popproxy.capture.format import CaptureError
from popproxy.capture.reader import CaptureReader
from popproxy.core.transcript import Item
from popproxy.inspect.filter import SessionFacts, facts_from_end

MAX_TRIES = 5
SMALL = 65536  # captures below this size are read in one go
CLEAN_ENDINGS = frozenset({"quit", "closed", "client-closed", "server-closed"})

#: (key, column title): the list's columns, in order; the key names a SessionRow attribute.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("start", "start"),
    ("client", "client"),
    ("upstream", "upstream"),
    ("user", "user"),
    ("mechanism", "mech"),
    ("tls", "TLS c/u"),
    ("commands", "cmds"),
    ("client_octets", "C→S"),
    ("server_octets", "S→C"),
    ("duration", "duration"),
    ("how", "ended"),
    ("anomalies", "anom"),
    ("errors", "-ERR"),
)


@dataclass
class SessionRow:
    """What the list shows of one session; ``None`` is unknown (shown as ``?``)."""

    path: Path
    start: str = ""
    client: str | None = None
    upstream: str | None = None
    user: str | None = None
    mechanism: str | None = None
    tls: str = "?"
    commands: int | None = None
    client_octets: int | None = None
    server_octets: int | None = None
    duration: float | None = None
    how: str = "unfinished"
    error: str | None = None
    anomalies: int | None = None
    errors: int | None = None
    size: int = 0
    facts: SessionFacts = field(default_factory=SessionFacts)

    @property
    def key(self) -> str:
        return str(self.path)

    @property
    def finished(self) -> bool:
        return self.how not in ("unfinished", "running")


def tls_legs(header: dict[str, Any], legs: Iterable[str] | None) -> str:
    """``c/u`` flags: ``T`` TLS, ``-`` plaintext, ``?`` unknown (an older end record)."""
    if legs is None:
        if header.get("stls") == "passthrough":
            return "?/?"
        client = "T" if header.get("listen_tls") else "?"
        return f"{client}/{'T' if header.get('upstream_tls') else '?'}"
    found = set(legs)
    client = "T" if found & {"client", "both"} else "-"
    upstream = "T" if found & {"upstream", "both"} else "-"
    return f"{client}/{upstream}"


def row_from_reader(reader: CaptureReader) -> SessionRow:
    header, end = reader.header, reader.end()
    row = SessionRow(reader.path, size=reader.size)
    row.start = str(header.get("start") or "")
    row.client, row.upstream = _opt(header.get("client")), _opt(header.get("upstream"))
    if end is None:
        row.facts = facts_from_end(str(reader.path), header, end)
        row.tls = tls_legs(header, None)
        return row
    apply_end(row, header, end)
    return row


def apply_end(row: SessionRow, header: dict[str, Any], end: dict[str, Any]) -> None:
    octets = end.get("octets") or {}
    legs = end.get("tls")
    row.user, row.mechanism = _opt(end.get("user")), _opt(end.get("mechanism"))
    row.tls = tls_legs(header, legs if isinstance(legs, list) else None)
    row.commands = _num(end.get("commands"))
    row.client_octets, row.server_octets = _num(octets.get("c")), _num(octets.get("s"))
    duration = end.get("t")
    row.duration = float(duration) if isinstance(duration, int | float) else None
    row.how = str(end.get("how") or "?")
    row.error = _opt(end.get("error"))
    row.anomalies, row.errors = _num(end.get("anomalies")), _num(end.get("errors"))
    row.facts = facts_from_end(str(row.path), header, end)


def load_row(path: Path) -> SessionRow | None:
    """A row for ``path``, or ``None`` if it is not (yet) a readable capture."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            head = os.read(fd, SMALL)
        finally:
            os.close(fd)
    except OSError:
        return None
    if len(head) < SMALL:  # the whole file in one read: header and end record from it
        row = _row_from_bytes(path, head)
        if row is not None:
            return row
    try:
        with CaptureReader(path) as reader:
            return row_from_reader(reader)
    except CaptureError:
        return None


def _row_from_bytes(path: Path, data: bytes) -> SessionRow | None:
    """A small capture's row from its bytes, as ``CaptureReader`` would read them."""
    first, nl, _rest = data.partition(b"\n")
    try:
        header = json.loads(first) if nl else None
        if not isinstance(header, dict):
            return None
        fmt.check_header(header)
    except (ValueError, CaptureError):
        return None
    end: dict[str, Any] | None = None
    marker = data.rfind(b'{"r":"end"')
    if marker > 0 and data[marker - 1 : marker] == b"\n" and data.endswith(b"\n"):
        tail = data[marker:-1]
        if b"\n" not in tail:
            try:
                fields = json.loads(tail)
                end = fields if isinstance(fields, dict) else None
            except ValueError:
                end = None
    row = SessionRow(path, size=len(data))
    row.start = str(header.get("start") or "")
    row.client, row.upstream = _opt(header.get("client")), _opt(header.get("upstream"))
    if end is None:
        row.facts = facts_from_end(str(path), header, end)
        row.tls = tls_legs(header, None)
    else:
        apply_end(row, header, end)
    return row


def _opt(value: Any) -> str | None:
    return None if value is None else str(value)


def _num(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Sources:
    """The captures named on the command line; ``poll()`` reports what appeared or changed.

    Folders are re-listed (names only) and unfinished captures re-read at their tail, so a
    poll costs one directory listing plus one small read per capture still being written.
    """

    def __init__(self, targets: Iterable[str | os.PathLike[str]]) -> None:
        self.files: list[Path] = []
        self.folders: list[Path] = []
        for target in targets:
            path = Path(target)
            (self.folders if path.is_dir() else self.files).append(path)
        self.rows: dict[str, SessionRow] = {}
        self._failures: dict[str, int] = {}  # not (yet) readable: a header still being written

    def _candidates(self) -> list[Path]:
        found = list(self.files)
        for folder in self.folders:
            try:
                with os.scandir(folder) as entries:
                    found.extend(Path(e.path) for e in entries if e.name.endswith(fmt.SUFFIX))
            except OSError:
                continue
        return found

    def poll(self) -> list[SessionRow]:
        """Rows that are new or changed since the last poll (all rows, the first time)."""
        changed: list[SessionRow] = []
        for path in self._candidates():
            key = str(path)
            row = self.rows.get(key)
            if row is None:
                if self._failures.get(key, 0) >= MAX_TRIES:
                    continue  # not a capture
                row = load_row(path)
                if row is None:
                    self._failures[key] = self._failures.get(key, 0) + 1
                    continue
                self.rows[key] = row
                changed.append(row)
            elif not row.finished or row.how == "running":
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                if size != row.size:
                    fresh = load_row(path)
                    if fresh is not None:
                        if not fresh.finished and row.commands is not None:
                            _keep_live(fresh, row)
                        self.rows[key] = fresh
                        changed.append(fresh)
        return changed


def _keep_live(fresh: SessionRow, live: SessionRow) -> None:
    """An unfinished capture keeps the counts a live feed gave it."""
    fresh.how = live.how
    fresh.user, fresh.mechanism = live.user, live.mechanism
    fresh.commands, fresh.errors, fresh.anomalies = live.commands, live.errors, live.anomalies
    fresh.duration = live.duration


def update_live(row: SessionRow, items: list[Item]) -> None:
    """Count a running session's progress from the relay's items (record --browse)."""
    row.how = "running"
    for item in items:
        row.duration = max(row.duration or 0.0, item.t)
        ex = item.exchange
        if item.what == "command" and ex is not None:
            row.commands = (row.commands or 0) + 1
            if ex.command in ("USER", "APOP") and ex.args:
                row.user = row.facts.user = ex.args.split(" ")[0]
        elif item.what == "done" and ex is not None and ex.status == "-ERR":
            row.errors = (row.errors or 0) + 1
        elif item.what == "anomaly":
            row.anomalies = (row.anomalies or 0) + 1
