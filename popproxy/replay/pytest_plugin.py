"""pytest plugin: a ``pop3_server`` fixture that plays (or records) POP3 sessions, VCR-style.

Mark a test with ``@pytest.mark.pop3_capture("captures/login.popcap")`` (a capture file or a
folder of captures, relative to the test file) and use the ``pop3_server`` fixture: it is
synchronous, runs its server in its own thread (its own ``trio.run``), so plain and async
tests can both use it, and exposes ``.host``, ``.port``, ``.cafile`` and ``.report``.
Successive connections get successive recorded sessions.  After the test, recorded
exchanges that no client asked for fail the test, unless the marker says
``allow_unplayed=True``.  Other marker keywords: ``password="..."`` (check credentials, as
``popproxy serve --password``), ``strict=True``, ``tls=True`` (implicit TLS with popproxy's
CA; trust ``pop3_server.cafile``), ``faults=["RETR 1: cut after 500", ...]`` (fault rules,
docs/faults.md, replaying and recording alike); ``pop3_server.add_fault(RULE)`` adds one
mid-test, for the commands that follow.  ``pop3_server.report.faults`` lists what was
injected; a connection a fault ended is not failed for its unplayed exchanges.

Record modes (``--pop3-record-mode`` or ini ``pop3_record_mode``), as in VCR.py:

``none`` (default)
    Only play captures; never touch the network.  A missing capture fails the test.
``once``
    Play the capture if it exists; otherwise record it: the fixture runs popproxy's
    recording proxy in front of the upstream and writes what the test's client did.
``all``
    Always record against the upstream and never play.  A folder gets the new captures
    beside the old ones; a file is replaced.
``rewrite``
    Delete the capture (a file, or a folder's ``*.popcap``) and record it anew.

The upstream comes from ``--pop3-upstream HOST:PORT`` or ini ``pop3_upstream``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy import fsutil
from popproxy.capture.format import SUFFIX, CaptureError
from popproxy.capture.reader import CaptureReader
from popproxy.faults import FaultSet, FaultSyntaxError, parse_rule
from popproxy.proxy.config import ProxyConfig, UsageError, parse_hostport
from popproxy.replay.fake import FakeServer, ServeConfig, ServeReport, serve_replay
from popproxy.replay.script import load_sessions
from popproxy.tls.ca import CertificateAuthority

MODES = ("none", "once", "all", "rewrite")
START_TIMEOUT = 10.0
SETTLE_TIMEOUT = 5.0  # recording: how long open sessions get to write their end record


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("popproxy", "popproxy POP3 record/replay")
    group.addoption(
        "--pop3-record-mode",
        choices=MODES,
        default=None,
        help="none (default): only replay; once: record missing captures; "
        "all: always record; rewrite: delete and record anew",
    )
    group.addoption(
        "--pop3-upstream", default=None, metavar="HOST:PORT", help="the POP3 server to record from"
    )
    parser.addini("pop3_record_mode", "default record mode for pop3_server", default="none")
    parser.addini("pop3_upstream", "the POP3 server pop3_server records from (HOST:PORT)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pop3_capture(path, allow_unplayed=False, password=None, strict=False, "
        "tls=False, faults=[]): the POP3 capture (file or folder, relative to the test "
        "file) the pop3_server fixture plays or records, and fault rules to inject",
    )


class Pop3Server:
    """What a test talks to: a fake server (replaying) or the recording proxy."""

    def __init__(
        self,
        host: str,
        port: int,
        mode: str,
        capture: Path,
        recording: bool,
        report: ServeReport | None,
        ca: Callable[[], CertificateAuthority],
        faults: FaultSet | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.mode = mode
        self.capture = capture
        self.recording = recording
        self.report = report if report is not None else ServeReport()
        self._ca = ca
        self.faults = faults if faults is not None else FaultSet()

    def add_fault(self, rule: str) -> None:
        """Inject a fault (docs/faults.md) from now on, e.g. ``"RETR 1: cut after 500"``."""
        try:
            self.faults.add(parse_rule(rule))
        except FaultSyntaxError as exc:
            raise ValueError(f"fault rule {rule!r}: {exc}") from None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def cafile(self) -> str:
        """popproxy's CA certificate (PEM): trust it for ``tls=True`` and STLS."""
        return str(self._ca().cert_path)


class _TrioThread:
    """Runs one server coroutine under its own ``trio.run`` in a daemon thread."""

    def __init__(self, serve: Callable[..., Awaitable[Any]]) -> None:
        self._serve = serve
        self._started = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self.addresses: list[tuple[str, int]] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="popproxy-pop3-server", daemon=True)

    def start(self) -> list[tuple[str, int]]:
        self._thread.start()
        if not self._started.wait(START_TIMEOUT) or self.error is not None:
            raise RuntimeError(f"the POP3 test server did not start: {self.error}")
        return self.addresses

    def stop(self) -> None:
        if self._token is not None and self._scope is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(START_TIMEOUT)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the test through start()
            self.error = exc
            self._started.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            self.addresses = await nursery.start(self._serve)
            self._started.set()


def _exists(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.glob(f"*{SUFFIX}")))


def _mode(config: pytest.Config) -> str:
    mode = config.getoption("--pop3-record-mode") or config.getini("pop3_record_mode") or "none"
    if mode not in MODES:
        raise pytest.UsageError(f"pop3 record mode {mode!r}: choose one of {', '.join(MODES)}")
    return str(mode)


@pytest.fixture
def pop3_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pop3Server]:
    """A POP3 server for this test: recorded sessions played back, or recorded (see module)."""
    marker = request.node.get_closest_marker("pop3_capture")
    if marker is None or not marker.args:
        pytest.fail('pop3_server needs @pytest.mark.pop3_capture("path/to/capture")', pytrace=False)
    path = (Path(str(request.path)).parent / str(marker.args[0])).resolve()
    kwargs = dict(marker.kwargs)
    mode = _mode(request.config)
    ca_dir = tmp_path_factory.getbasetemp() / "popproxy-ca"
    ca_box: list[CertificateAuthority] = []

    def ca() -> CertificateAuthority:
        if not ca_box:
            ca_box.append(CertificateAuthority.load_or_create(ca_dir))
        return ca_box[0]

    faults = _faults(kwargs.get("faults", ()))
    record = mode in ("all", "rewrite") or (mode == "once" and not _exists(path))
    if record:
        yield from _recording(request, path, mode, ca, faults)
    else:
        yield from _replaying(path, mode, kwargs, ca, faults)


def _faults(rules: object) -> FaultSet:
    """The marker's ``faults=[...]``, parsed; a bad rule fails the test in one line."""
    if isinstance(rules, str):
        rules = [rules]
    if not isinstance(rules, list | tuple):
        pytest.fail("pop3_capture(faults=...) takes a list of fault rules", pytrace=False)
    parsed = FaultSet()
    for text in rules:
        try:
            parsed.add(parse_rule(str(text)))
        except FaultSyntaxError as exc:
            pytest.fail(f"pop3_capture(faults=...): {str(text)!r}, {exc}", pytrace=False)
    return parsed


def _replaying(
    path: Path,
    mode: str,
    kwargs: dict[str, Any],
    ca: Callable[[], CertificateAuthority],
    faults: FaultSet,
) -> Iterator[Pop3Server]:
    if not _exists(path):
        pytest.fail(
            f"no POP3 capture at {path}: record mode {mode!r} never touches the "
            "network; record it with --pop3-record-mode=once --pop3-upstream HOST:PORT",
            pytrace=False,
        )
    try:
        sessions = load_sessions([str(path)])
    except CaptureError as exc:
        pytest.fail(f"cannot play {path}: {exc}", pytrace=False)
    config = ServeConfig(
        sessions=sessions,
        listen=("127.0.0.1", 0),
        password=kwargs.get("password"),
        strict=bool(kwargs.get("strict")),
        tls=bool(kwargs.get("tls")),
        faults=faults,
    )
    if config.tls or any(s.verb == "STLS" for x in sessions for s in x.steps):
        config.ca = ca()
    server = FakeServer(config)

    async def serve(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
        await serve_replay(config, None, announce=False, server=server, task_status=task_status)

    thread = _TrioThread(serve)
    host, port = thread.start()[0]
    try:
        yield Pop3Server(host, port, mode, path, False, server.report, ca, faults)
    finally:
        thread.stop()
    unplayed = server.report.unplayed()
    if unplayed and not kwargs.get("allow_unplayed"):
        lines = "\n  ".join(unplayed[:30])
        misses = "\n  ".join(m.describe() for m in server.report.near_misses[:10])
        message = f"recorded POP3 exchanges were not played ({path}):\n  {lines}"
        if misses:
            message += f"\nnear misses:\n  {misses}"
        message += "\n(mark the test pop3_capture(..., allow_unplayed=True) to allow this)"
        pytest.fail(message, pytrace=False)


def _recording(
    request: pytest.FixtureRequest,
    path: Path,
    mode: str,
    ca: Callable[[], CertificateAuthority],
    faults: FaultSet,
) -> Iterator[Pop3Server]:
    from popproxy.proxy.server import serve_record

    text = request.config.getoption("--pop3-upstream") or request.config.getini("pop3_upstream")
    if not text:
        pytest.fail(
            f"record mode {mode!r} needs the upstream POP3 server: give "
            "--pop3-upstream HOST:PORT or ini pop3_upstream",
            pytrace=False,
        )
    try:
        upstream = parse_hostport(str(text))
    except UsageError as exc:
        pytest.fail(f"--pop3-upstream: {exc}", pytrace=False)
    single = path.suffix == SUFFIX
    if mode == "rewrite" and path.is_dir():
        for old in path.glob(f"*{SUFFIX}"):
            old.unlink()
    out_dir = Path(tempfile.mkdtemp(prefix="popproxy-rec-")) if single else path
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.glob(f"*{SUFFIX}"))
    config = ProxyConfig(upstream=upstream, listen=("127.0.0.1", 0), out_dir=out_dir, linger=0.5)

    async def serve(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
        await serve_record(config, None, announce=False, task_status=task_status)

    thread = _TrioThread(serve)
    host, port = thread.start()[0]
    try:
        yield Pop3Server(host, port, mode, path, True, None, ca, faults)
    finally:
        _settle(out_dir, before)
        thread.stop()
    new = sorted(set(out_dir.glob(f"*{SUFFIX}")) - before)
    if single:
        try:
            if len(new) > 1:
                pytest.fail(
                    f"the test made {len(new)} POP3 sessions but {path} holds one: "
                    "mark it with a folder to keep them all",
                    pytrace=False,
                )
            if new:
                path.parent.mkdir(parents=True, exist_ok=True)
                fsutil.move_file(new[0], path)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
    if not new:
        pytest.fail(f"record mode {mode!r}: the test made no POP3 session to record", pytrace=False)


def _settle(out_dir: Path, before: set[Path]) -> None:
    """Give sessions whose client has gone a moment to write their end record."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        pending = False
        for capture in set(out_dir.glob(f"*{SUFFIX}")) - before:
            try:
                with CaptureReader(capture) as reader:
                    pending = pending or reader.end() is None
            except CaptureError:
                pending = True
        if not pending:
            return
        time.sleep(0.02)
