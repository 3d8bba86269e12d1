"""A connection that is not POP3: relayed byte for byte and recorded, never interpreted."""

from __future__ import annotations

import contextlib
import os
from datetime import UTC, datetime

import trio

from popproxy.capture import format as fmt
from popproxy.capture.format import SessionEnd
from popproxy.capture.writer import CaptureWriter, create_capture_file
from popproxy.core import Direction, Secret, SecretKind
from popproxy.core.transcript import SessionSummary
from popproxy.netutil import describe_error, stream_address
from popproxy.proxy.config import ProxyConfig
from popproxy.proxy.view import SessionView

C, S = Direction.CLIENT, Direction.SERVER
CHUNK = 65536
SMALL_WRITE = 64 << 10  # larger batches go to a worker thread
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_EVERYTHING = 1 << 62


class OpaqueRelay:
    """Relays ``client`` and ``upstream`` until both close; each chunk is on disk before the
    next one is read (never relayed unrecorded, memory bounded by one chunk).

    Without ``--keep-secrets`` the client's bytes are masked whole (``#``, lengths kept):
    popproxy cannot tell where credentials are in a protocol it does not read.
    """

    def __init__(
        self,
        config: ProxyConfig,
        client: trio.abc.Stream,
        upstream: trio.abc.Stream,
        view: SessionView | None,
        *,
        number: int,
        reason: str,
        label: str,
    ) -> None:
        self.config = config
        self.client, self.upstream = client, upstream
        self.view = view
        self.number = number
        self.reason = reason
        self.label = label
        self.peer = stream_address(client, peer=True)
        self.how: str | None = None
        self.error: str | None = None
        self.octets = {C: 0, S: 0}
        self._t0 = trio.current_time()
        self._last = self._t0
        self._eof = {C: False, S: False}
        self._first_eof: str | None = None
        self._fd = -1
        self._writer: CaptureWriter | None = None
        self._disk = trio.StrictFIFOLock()  # one writer at a time keeps records in order

    def now(self) -> float:
        return trio.current_time() - self._t0

    async def run(self) -> None:
        cfg = self.config
        started = datetime.now(UTC)
        local = stream_address(self.client, peer=False)
        name, header = cfg.capture_header(self.number, self.peer, local, started)
        header.update(listen_tls=False, upstream_tls=False, upstream_stls=False, opaque=True)
        path = cfg.out_dir / name
        try:
            self._fd = create_capture_file(path)
        except OSError as exc:
            if self.view:
                reason = f"cannot create a capture file in {cfg.out_dir}: {describe_error(exc)}"
                self.view.failed(self.number, self.peer, reason)
            await self._close()
            return
        self._writer = writer = CaptureWriter(header, keep_secrets=cfg.keep_secrets)
        addr = stream_address(self.upstream, peer=True)
        writer.event(0.0, "upstream-connected", addr=addr)
        writer.event(0.0, "opaque", detail=self.reason)
        for direction in (C, S):
            writer.opaque(direction, self.reason)
        if self.view:
            self.view.started(self.number, self.peer, self.label, path)
        try:
            await self._write()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, C, nursery.cancel_scope)
                nursery.start_soon(self._pump, S, nursery.cancel_scope)
                nursery.start_soon(self._watchdog, nursery.cancel_scope)
        except OSError as exc:
            self.how = self.how or "capture-error"
            self.error = self.error or f"capture write failed: {describe_error(exc)}"
        finally:
            if self.how is None and trio.current_effective_deadline() == float("-inf"):
                self.how = "proxy-shutdown"
            with trio.CancelScope(shield=True):
                self._finish()
                await self._close()

    async def _pump(self, direction: Direction, scope: trio.CancelScope) -> None:
        assert self._writer is not None
        src, dst = (self.client, self.upstream) if direction is C else (self.upstream, self.client)
        who = "client" if direction is C else "server"
        while True:
            try:
                data = bytes(await src.receive_some(CHUNK))
            except STREAM_ERRORS as exc:
                self._stop(scope, f"{who}-reset", describe_error(exc))
                return
            self._last = trio.current_time()
            if not data:
                self._eof[direction] = True
                self._first_eof = self._first_eof or who
                self._writer.eof(direction, self.now())
                await self._write()
                if isinstance(dst, trio.abc.HalfCloseableStream):
                    with contextlib.suppress(*STREAM_ERRORS):
                        await dst.send_eof()
                if all(self._eof.values()) or not isinstance(dst, trio.abc.HalfCloseableStream):
                    scope.cancel()
                return
            try:
                await dst.send_all(data)
            except STREAM_ERRORS as exc:
                other = "server" if direction is C else "client"
                self._stop(scope, f"{other}-reset", describe_error(exc))
                return
            offset = self.octets[direction]
            self.octets[direction] += len(data)
            self._writer.data(direction, self.now(), data)
            if direction is C and not self.config.keep_secrets:
                self._writer.observe([Secret(C, offset, len(data), SecretKind.OPAQUE)])
            await self._write()

    async def _watchdog(self, scope: trio.CancelScope) -> None:
        limit = self.config.idle_timeout
        while True:
            remaining = self._last + limit - trio.current_time()
            if remaining <= 0:
                self._stop(scope, "idle-timeout", f"no traffic for {limit:g} s")
                return
            await trio.sleep(min(remaining, 1.0))

    def _stop(self, scope: trio.CancelScope, how: str, error: str | None) -> None:
        if self.how is None:
            self.how, self.error = how, error
        scope.cancel()

    async def _write(self) -> None:
        assert self._writer is not None
        async with self._disk:
            self._writer.advance(_EVERYTHING, _EVERYTHING)
            size = self._writer.buffered
            pieces = self._writer.take()
            if size <= SMALL_WRITE:
                fmt.write_all(self._fd, pieces)
            else:
                await trio.to_thread.run_sync(fmt.write_all, self._fd, pieces)

    def _finish(self) -> None:
        writer = self._writer
        assert writer is not None
        t = self.now()
        for direction in (S, C):
            if not self._eof[direction]:
                writer.eof(direction, t)
        first = self._first_eof
        how = self.how or (f"{first}-closed" if first else "closed")
        # The observer's "opaque" anomaly, one per direction.
        writer.end(SessionEnd(t, how, self.error, anomaly_kinds={"opaque": 2}))
        try:
            fmt.write_all(self._fd, writer.take())
        except OSError as exc:
            self.error = self.error or f"capture write failed: {describe_error(exc)}"
        finally:
            os.close(self._fd)
        if self.view:
            self.view.ended(self.number, how, self.error, t, SessionSummary())

    async def _close(self) -> None:
        with trio.move_on_after(1):
            for stream in (self.client, self.upstream):
                with contextlib.suppress(*STREAM_ERRORS, trio.BusyResourceError):
                    await stream.aclose()
