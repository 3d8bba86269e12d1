"""The capture of one session the fake server played (``serve --out``, the pytest plugin)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from popproxy.capture.format import SUFFIX, SessionEnd
from popproxy.capture.recorder import Recorder
from popproxy.capture.via import SERVE
from popproxy.core.events import Direction
from popproxy.faults.matcher import Injection
from popproxy.netutil import stream_address
from popproxy.proxy.legs import tls_info
from popproxy.proxy.tap import Tap

if TYPE_CHECKING:
    from popproxy.replay.fake import ConnectionReport, ServeConfig

C, S = Direction.CLIENT, Direction.SERVER
PIECE = 64 << 10  # served bytes are recorded (and sent) in pieces of at most this size


def capture_name(number: int, started: datetime) -> str:
    """docs/capture-format.md: ``YYYYmmddTHHMMSS.ffffffZ-NNNNN.popcap``."""
    return f"{started:%Y%m%dT%H%M%S}.{started:%f}Z-{number:05d}{SUFFIX}"


def served_header(
    config: ServeConfig, number: int, stream: trio.abc.Stream, played: Path | None
) -> tuple[str, dict[str, Any]]:
    """The capture's file name and header: popproxy is the server, at its listening address."""
    from popproxy import __version__

    started = datetime.now(UTC)
    listen = stream_address(stream, peer=False)
    mode = "mailbox" if config.mailbox is not None else config.match
    header: dict[str, Any] = {
        "popproxy": __version__,
        "start": started.isoformat().replace("+00:00", "Z"),
        "t0": started.timestamp(),
        "session": number,
        "client": stream_address(stream, peer=True),
        "listen": listen,
        "upstream": listen,
        "keep_secrets": False,
        "listen_tls": config.tls,
        "via": {"how": SERVE, "mode": mode, "played": str(played) if played else None},
    }
    faults = config.faults
    if faults:
        header["faults"] = [rule.text for rule in faults.rules]
        header["fault_seed"] = faults.seed
    return capture_name(number, started), header


@dataclass(frozen=True, slots=True)
class Ending:
    """How a served session ended, in the end record's words."""

    how: str
    error: str | None
    by_server: bool  # the served session closed its side itself (not popproxy's doing)


def ending(report: ConnectionReport, quit_acked: bool, cancelled: bool) -> Ending:
    """The end record's ``how`` for a connection report's ``ended`` (docs/capture-format.md)."""
    ended = report.ended
    if report.fault_ended or ended == "QUIT answered by a fault":
        return Ending("fault", ended, False)
    if ended.startswith("capture write failed"):
        return Ending("capture-error", ended, False)
    if ended.startswith("TLS handshake failed"):
        return Ending("client-tls-error", ended, False)
    if ended.startswith("idle for"):
        return Ending("idle-timeout", f"the client was {ended}", False)
    if ended == "connection lost":
        return Ending("client-reset", ended, False)
    if ended == "open":
        return Ending("proxy-shutdown" if cancelled else "closed", None, False)
    how = "client-closed" if ended == "client closed" else "server-closed"
    error = ended if ended.startswith("mismatch") else None
    return Ending("quit" if quit_acked else how, error, True)


class ServedCapture:
    """What one served connection carried, as a capture (docs/capture-format.md).

    The client's bytes are client data; the served bytes (recorded or the mailbox's) are
    server data; a fault's own bytes are popproxy's (``p: 1``), what it held back is server
    data under a ``drop`` record, and each fault is an ``event``, as ``record`` writes them.
    The tap beside the relay does the observing and the redaction, here as there.
    """

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.path = recorder.path
        self.tap = Tap(recorder.writer, None)
        self._t0 = trio.current_time()
        self._closed = {C: False, S: False}
        self._line = (0, 0)  # the client stream's span of the last line read

    @classmethod
    def create(
        cls,
        config: ServeConfig,
        folder: Path,
        number: int,
        stream: trio.abc.Stream,
        played: Path | None,
    ) -> ServedCapture:
        """Create the file (0600, exclusive) with its header; ``CaptureUnavailable``."""
        name, header = served_header(config, number, stream, played)
        return cls(Recorder.create(folder / name, header, keep_secrets=False))

    def now(self) -> float:
        return trio.current_time() - self._t0

    async def room(self) -> None:
        """Wait until the disk has caught up (save or stop: capture/recorder.py)."""
        await self.recorder.wait_for_room()

    async def run(self, failed: Callable[[str], None]) -> None:
        await self.recorder.run(failed)

    # ----------------------------------------------------------------- the two streams

    def received(self, data: bytes) -> None:
        """A chunk the client sent; b"" when it closed."""
        if self._closed[C]:
            return
        self._closed[C] = not data
        self._data(C, data)

    def line_read(self, pending: int, length: int) -> None:
        """A client line was taken off a buffer of ``pending`` unread bytes."""
        self._line = (self.tap.offsets[C] - pending, length)

    def discarded(self, length: int, why: str) -> None:
        """The last ``length`` client bytes were thrown away unread (after STLS)."""
        self.tap.drop(C, self.tap.offsets[C] - length, length, why)
        self.recorder.changed()

    def sent(self, data: bytes, why: str | None = None) -> None:
        """Bytes about to go to the client: the server's, or (``why``) popproxy's own."""
        self._data(S, data, why)

    def started_tls(self, stream: trio.SSLStream[Any]) -> None:
        """TLS with the client: both directions are decrypted from here on."""
        mode = "stls" if self.tap.offsets[C] else "implicit"
        info = tls_info(stream, "client", mode)
        t = self.now()
        self.tap.start_tls(C, t, info)
        self.tap.start_tls(S, t, info)
        self.recorder.changed()

    # ----------------------------------------------------------------- faults (Ledger)

    def fault(self, injection: Injection, detail: str) -> None:
        fields = {"rule": injection.rule.text, "index": injection.index, "verb": injection.verb}
        self._event("fault", detail=detail, **fields)

    def withheld(self, data: bytes, why: str) -> None:
        start = self.tap.offsets[S]
        self._data(S, data)
        self.tap.drop(S, start, len(data), why)

    def answered(self, why: str) -> None:
        """The command just read never reached the served session: popproxy answered it."""
        self.tap.drop(C, *self._line, why)

    def cut(self, how: str, why: str) -> None:
        self._event("fault-cut", detail=why, how=how, offset=self.tap.offsets[S])

    def stalled(self, why: str) -> None:
        self._event("fault-stall", detail=why, offset=self.tap.offsets[S])

    def closed(self, why: str) -> None:
        self._event("fault-close", detail=why)

    # ----------------------------------------------------------------- the end

    def finish(self, report: ConnectionReport, *, cancelled: bool) -> str | None:
        """Close both directions and write the end record; the write error, if any."""
        tap, t = self.tap, self.now()
        end = ending(report, tap.builder.session.quit, cancelled)
        if not self._closed[S]:
            # The served session's own close is the server's; any other is popproxy's.
            tap.data(S, t, b"", proxy=not end.by_server, why=end.how)
        if not self._closed[C]:
            tap.data(C, t, b"", proxy=True, why=end.how)
        self._closed = {C: True, S: True}
        recorder = self.recorder
        error = recorder.failure() or end.error
        summary = SessionEnd.of(t, end.how, error, tap.builder.session, observer_error=tap.broken)
        return recorder.finish(summary)

    # ----------------------------------------------------------------- records

    def _data(self, direction: Direction, data: bytes, why: str | None = None) -> None:
        t, tap = self.now(), self.tap
        if not data:
            tap.data(direction, t, b"")
        for start in range(0, len(data), PIECE):
            tap.data(direction, t, data[start : start + PIECE], proxy=why is not None, why=why)
        self.recorder.changed()

    def _event(self, kind: str, **fields: Any) -> None:
        self.tap.event(self.now(), kind, **fields)
        self.recorder.changed()
