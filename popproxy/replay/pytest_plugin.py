"""pytest plugin: a ``pop3_server`` fixture that plays (or records) POP3 sessions, VCR-style.

Mark a test with ``@pytest.mark.pop3_capture("captures/login.popcap")`` (a capture file or
a folder of captures, relative to the test file; without a path,
``captures/<module>/<test>.popcap``) and use the ``pop3_server`` fixture: it is
synchronous, runs its server in its own thread (its own ``trio.run``), so plain and async
tests can both use it, and exposes ``.host``, ``.port``, ``.cafile`` and ``.report``.
docs/replay.md documents the marker's keywords and the record modes (``none``, ``once``,
``new_episodes``, ``all``, ``rewrite``) against VCR.py's.  A recording replaces a
capture only when it is usable (it reached the server and ended cleanly); otherwise the
old capture stays and the test fails with the reason.
``faults=[...]`` and ``pop3_server.add_fault(RULE)`` inject faults (docs/faults.md) when
replaying; recording modes record the real server unfaulted (a capture is a fixture).
Each replayed session is itself captured; the captures are kept (``pop3_server.served``,
named in the failure report) when the test fails or a fault was injected.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy.capture.format import SUFFIX, CaptureError
from popproxy.capture.reader import CaptureReader
from popproxy.faults import FaultSet, FaultSyntaxError, parse_rule
from popproxy.proxy.config import ProxyConfig, UsageError, parse_hostport
from popproxy.replay import recording
from popproxy.replay.fake import FakeServer, ServeConfig, ServeReport, serve_replay
from popproxy.replay.mailbox import Maildrop
from popproxy.replay.netguard import NetworkGuard
from popproxy.replay.script import load_sessions
from popproxy.replay.scrub import Scrub, scrub_capture
from popproxy.tls.ca import CertificateAuthority

MODES = ("none", "once", "new_episodes", "all", "rewrite")
DEFAULT_FOLDER = "captures"
_GUARD = pytest.StashKey[NetworkGuard]()
_SERVED = pytest.StashKey[Path]()  # the test's folder of served-session captures
_FAILED = pytest.StashKey[bool]()  # the test's setup or call failed
SERVED_FOLDER = "popproxy-served"  # under pytest's base temporary folder, by default
START_TIMEOUT = 10.0
SETTLE_TIMEOUT = 5.0  # recording: how long open sessions get to write their end record


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("popproxy", "popproxy POP3 record/replay")
    group.addoption(
        "--pop3-record-mode",
        choices=MODES,
        default=None,
        help="none (default): only replay; once: record missing captures; new_episodes: "
        "play the recorded sessions, record further ones; all: always record (the replaced "
        "captures kept as .previous); rewrite: always record, replacing the old captures",
    )
    group.addoption(
        "--pop3-block-network",
        action="store_true",
        default=None,
        help="refuse every connection a test makes except to popproxy's fake POP3 servers "
        "on loopback (and, while recording, popproxy's own connection to the upstream)",
    )
    group.addoption(
        "--pop3-upstream", default=None, metavar="HOST:PORT", help="the POP3 server to record from"
    )
    parser.addini("pop3_record_mode", "default record mode for pop3_server", default="none")
    group.addoption(
        "--pop3-upstream-ca",
        default=None,
        metavar="FILE",
        help="also trust this CA for the upstream while recording (pop3s with tls=True, STLS)",
    )
    parser.addini("pop3_upstream", "the POP3 server pop3_server records from (HOST:PORT)")
    parser.addini("pop3_upstream_ca", "as --pop3-upstream-ca")
    parser.addini("pop3_block_network", "as --pop3-block-network", type="bool", default=False)
    group.addoption(
        "--pop3-served-dir",
        default=None,
        metavar="DIR",
        help="keep the captures of replayed sessions (when the test fails or a fault was "
        "injected) in DIR/<module>/<test>/ (default: popproxy-served/ in pytest's "
        "temporary folder)",
    )
    parser.addini("pop3_served_dir", "as --pop3-served-dir (relative to the rootdir)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pop3_capture(path=None, mode='replay', match='ordered', allow_unplayed=False, "
        "allow_near_misses=False, password=None, user=None, persist=False, strict=False, "
        "tls=False, before_record=None, faults=[]): the POP3 capture (file or folder, relative to "
        "the test file; default captures/<module>/<test>.popcap) the pop3_server fixture "
        "plays, serves as a mailbox (mode='mailbox') or records, with fault rules to inject",
    )
    if _block_network(config):
        config.stash[_GUARD] = NetworkGuard()


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
        self.maildrop: Maildrop | None = None  # mode="mailbox": the messages left
        self.served: Path | None = None  # replaying: the folder of served-session captures

    def served_captures(self, timeout: float = SETTLE_TIMEOUT) -> list[Path]:
        """The captures of the sessions served so far, once each has ended (a session ends
        when its client closes, or QUIT, or a fault cut it); waits up to ``timeout``."""
        if self.served is None:
            return []
        _settle(self.served, set(), timeout)
        return sorted(self.served.glob(f"*{SUFFIX}"))

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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report says where its served sessions' captures are kept."""
    report = yield
    if report.when in ("setup", "call") and report.failed:
        item.stash[_FAILED] = True
        served = item.stash.get(_SERVED, None)
        if served is not None and any(served.glob(f"*{SUFFIX}")):
            report.sections.append(("popproxy served sessions", _served_note(served)))
    return report


def _served_note(folder: Path) -> str:
    return (
        f"the sessions the fake POP3 server played, faults included, are kept in {folder}\n"
        f"  popproxy show {folder}    (or show --json, lint)\n"
    )


def _served_folder(request: pytest.FixtureRequest, base: Path) -> Path:
    """``<root>/<module>/<test>/`` for this test, emptied of earlier runs' captures."""
    given = request.config.getoption("--pop3-served-dir") or request.config.getini(
        "pop3_served_dir"
    )
    root = request.config.rootpath / str(given) if given else base / SERVED_FOLDER
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name).strip("_") or "test"
    folder = root / Path(str(request.path)).stem / name
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for old in folder.glob(f"*{SUFFIX}"):
            old.unlink()
    except OSError as exc:
        pytest.fail(
            f"cannot keep served captures in {folder}: {exc.strerror or exc}", pytrace=False
        )
    return folder


def _drop_served(folder: Path) -> None:
    """Nothing worth keeping: the test passed and no fault was injected."""
    for capture in folder.glob(f"*{SUFFIX}"):
        capture.unlink(missing_ok=True)


def _block_network(config: pytest.Config) -> bool:
    option = config.getoption("--pop3-block-network")
    return bool(option) if option is not None else bool(config.getini("pop3_block_network"))


def _guard(config: pytest.Config) -> NetworkGuard | None:
    return config.stash.get(_GUARD, None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """With --pop3-block-network, the test body runs with socket.connect guarded."""
    guard = _guard(item.config)
    if guard is None:
        return (yield)
    with guard.active():
        return (yield)


def _exists(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.glob(f"*{SUFFIX}")))


def _mode(config: pytest.Config) -> str:
    mode = config.getoption("--pop3-record-mode") or config.getini("pop3_record_mode") or "none"
    if mode not in MODES:
        raise pytest.UsageError(f"pop3 record mode {mode!r}: choose one of {', '.join(MODES)}")
    return str(mode)


def default_capture(request: pytest.FixtureRequest) -> Path:
    """``captures/<module>/<test>.popcap`` beside the test file (pytest-recording's layout)."""
    test_file = Path(str(request.path))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name).strip("_") or "test"
    return test_file.parent / DEFAULT_FOLDER / test_file.stem / f"{name}{SUFFIX}"


@pytest.fixture
def pop3_before_record() -> list[Scrub]:
    """Scrub rules applied to every new recording (override it in a conftest.py)."""
    return []


@pytest.fixture
def pop3_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pop3_before_record: list[Scrub],
) -> Iterator[Pop3Server]:
    """A POP3 server for this test: recorded sessions played back, or recorded (see module)."""
    marker = request.node.get_closest_marker("pop3_capture")
    kwargs = dict(marker.kwargs) if marker is not None else {}
    given = kwargs.pop("path", None) or (marker.args[0] if marker and marker.args else None)
    base = Path(str(request.path)).parent
    path = (base / str(given)).resolve() if given else default_capture(request)
    mode = _mode(request.config)
    if kwargs.get("mode", "replay") not in ("replay", "mailbox"):
        pytest.fail(f"pop3_capture mode={kwargs['mode']!r}: 'replay' or 'mailbox'", pytrace=False)
    ca_dir = tmp_path_factory.getbasetemp() / "popproxy-ca"
    ca_box: list[CertificateAuthority] = []

    def ca() -> CertificateAuthority:
        if not ca_box:
            ca_box.append(CertificateAuthority.load_or_create(ca_dir))
        return ca_box[0]

    faults = _faults(kwargs.get("faults", ()), request.node.nodeid)
    rules = list(kwargs.get("before_record") or []) + list(pop3_before_record)
    guard = _guard(request.config)
    exists = _exists(path) or (kwargs.get("mode") == "mailbox" and path.exists())
    record = mode in ("all", "rewrite") or (mode in ("once", "new_episodes") and not exists)
    if record:
        yield from _recording(request, path, mode, ca, rules, guard, faults)
        return
    served = _served_folder(request, tmp_path_factory.getbasetemp())
    request.node.stash[_SERVED] = served
    episodes = (
        (request, rules) if mode == "new_episodes" and kwargs.get("mode") != "mailbox" else None
    )
    try:
        yield from _replaying(
            path, mode, kwargs, ca, ca_dir, guard, episodes, faults, served, request.node
        )
    finally:
        with contextlib.suppress(OSError):  # only if nothing was kept
            served.rmdir()
            served.parent.rmdir()


def _faults(rules: object, nodeid: str) -> FaultSet:
    """The marker's ``faults=[...]``, parsed; a bad rule fails the test in one line.

    The run seed comes from the test's id: ``p=`` rules draw the same way every run.
    """
    if isinstance(rules, str):
        rules = [rules]
    if not isinstance(rules, list | tuple):
        pytest.fail("pop3_capture(faults=...) takes a list of fault rules", pytrace=False)
    parsed = FaultSet(seed=zlib.crc32(nodeid.encode()))
    for text in rules:
        try:
            parsed.add(parse_rule(str(text)))
        except FaultSyntaxError as exc:
            pytest.fail(f"pop3_capture(faults=...): {str(text)!r}, {exc}", pytrace=False)
    return parsed


def _upstream(request: pytest.FixtureRequest, mode: str) -> tuple[str, int]:
    text = request.config.getoption("--pop3-upstream") or request.config.getini("pop3_upstream")
    if not text:
        pytest.fail(
            f"record mode {mode!r} needs the upstream POP3 server: give "
            "--pop3-upstream HOST:PORT or ini pop3_upstream",
            pytrace=False,
        )
    try:
        return parse_hostport(str(text))
    except UsageError as exc:
        pytest.fail(f"--pop3-upstream: {exc}", pytrace=False)


def _replay_config(path: Path, mode: str, kwargs: dict[str, Any]) -> ServeConfig:
    mailbox = None
    sessions = []
    unusable: str | None = None
    try:
        if kwargs.get("mode") == "mailbox":
            from popproxy.replay.sources import load_mailbox

            mailbox = load_mailbox([str(path)])
        else:
            sessions = load_sessions([str(path)])
    except CaptureError as exc:
        unusable = str(exc)  # it names the file
    if unusable is not None:  # outside the except: no "during handling" chain in the report
        pytest.fail(f"cannot play the capture: {unusable}", pytrace=False)
    return ServeConfig(
        sessions=sessions,
        listen=("127.0.0.1", 0),
        password=kwargs.get("password"),
        strict=bool(kwargs.get("strict")),
        tls=bool(kwargs.get("tls")),
        mailbox=mailbox,
        persist=bool(kwargs.get("persist")),
        mailbox_user=kwargs.get("user"),
        match=str(kwargs.get("match", "ordered")),
    )


def _replaying(
    path: Path,
    mode: str,
    kwargs: dict[str, Any],
    ca: Callable[[], CertificateAuthority],
    ca_dir: Path,
    guard: NetworkGuard | None,
    episodes: tuple[pytest.FixtureRequest, list[Scrub]] | None,
    faults: FaultSet,
    served: Path,
    node: pytest.Item,
) -> Iterator[Pop3Server]:
    if not path.exists() or (kwargs.get("mode") != "mailbox" and not _exists(path)):
        pytest.fail(
            f"no POP3 capture at {path}: record mode {mode!r} never touches the "
            "network; record it with --pop3-record-mode=once --pop3-upstream HOST:PORT",
            pytrace=False,
        )
    config = _replay_config(path, mode, kwargs)
    config.ca_dir = ca_dir
    config.faults = faults
    config.out_dir = served
    if config.tls or any(s.verb == "STLS" for x in config.sessions for s in x.steps):
        config.ca = ca()
    recorder: _TrioThread | None = None
    out_dir: Path | None = None
    if episodes is not None:  # new_episodes: sessions beyond the recorded ones are recorded
        out_dir = Path(tempfile.mkdtemp(prefix="popproxy-rec-"))
        recorder, (rhost, rport) = _start_recorder(episodes[0], mode, out_dir, guard, ca)

        async def fallback(stream: trio.SocketStream) -> None:
            from popproxy.replay.episodes import relay

            await relay(stream, rhost, rport)

        config.fallback = fallback
    server = FakeServer(config)

    async def serve(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
        await serve_replay(config, None, announce=False, server=server, task_status=task_status)

    thread = _TrioThread(serve)
    host, port = thread.start()[0]
    if guard is not None:
        guard.allow_port(port)
    handle = Pop3Server(host, port, mode, path, False, server.report, ca, faults)
    handle.maildrop = server.maildrop
    handle.served = served
    try:
        yield handle
    finally:
        if recorder is not None and out_dir is not None:
            _settle(out_dir, set())
            recorder.stop()
        thread.stop()  # every served session has written its end record now
    if episodes is not None and out_dir is not None:
        _commit(out_dir, path, mode, episodes[1])
    problem = _report_problem(server.report, path, kwargs)
    if not (problem or server.report.faults or node.stash.get(_FAILED, False)):
        _drop_served(served)
    if problem is not None:
        if any(served.glob(f"*{SUFFIX}")):
            problem += "\n" + _served_note(served).rstrip()
        pytest.fail(problem, pytrace=False)


def _report_problem(report: ServeReport, path: Path, kwargs: dict[str, Any]) -> str | None:
    """Why the test fails on what the fake server saw (unplayed, near misses), if it does."""
    unplayed = report.unplayed()
    misses = "\n  ".join(m.describe() for m in report.near_misses[:10])
    if unplayed and not kwargs.get("allow_unplayed"):
        lines = "\n  ".join(unplayed[:30])
        message = f"recorded POP3 exchanges were not played ({path}):\n  {lines}"
        if misses:
            message += f"\nnear misses:\n  {misses}"
        return message + "\n(mark the test pop3_capture(..., allow_unplayed=True) to allow this)"
    if kwargs.get("mode") == "mailbox" and misses and not kwargs.get("allow_near_misses"):
        return (
            f"the mailbox from {path} could not answer:\n  {misses}\n(record the missing "
            "exchanges, or mark the test pop3_capture(..., allow_near_misses=True))"
        )
    return None


def _start_recorder(
    request: pytest.FixtureRequest,
    mode: str,
    out_dir: Path,
    guard: NetworkGuard | None,
    ca: Callable[[], CertificateAuthority],
) -> tuple[_TrioThread, tuple[str, int]]:
    from popproxy.proxy.server import serve_record
    from popproxy.tls.contexts import client_context

    upstream = _upstream(request, mode)
    if guard is not None:
        guard.allow_upstream(*upstream)
    marker = request.node.get_closest_marker("pop3_capture")
    tls = bool(marker is not None and marker.kwargs.get("tls"))
    cafile = request.config.getoption("--pop3-upstream-ca") or request.config.getini(
        "pop3_upstream_ca"
    )
    config = ProxyConfig(
        upstream=upstream,
        listen=("127.0.0.1", 0),
        out_dir=out_dir,
        linger=0.5,
        listen_tls=tls,  # tls=True: pop3s on both legs, as the test's client will speak
        upstream_tls=tls,
    )
    config.ca = ca()  # the CA the test trusts (pop3_server.cafile), also for STLS
    try:
        config.upstream_context = client_context(cafile=cafile or None)
    except OSError as exc:
        pytest.fail(f"--pop3-upstream-ca {cafile}: {exc}", pytrace=False)

    async def serve(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
        await serve_record(config, None, announce=False, task_status=task_status)

    thread = _TrioThread(serve)
    host, port = thread.start()[0]
    if guard is not None:
        guard.allow_port(port)
    return thread, (host, port)


def _recording(
    request: pytest.FixtureRequest,
    path: Path,
    mode: str,
    ca: Callable[[], CertificateAuthority],
    rules: list[Scrub],
    guard: NetworkGuard | None,
    faults: FaultSet,
) -> Iterator[Pop3Server]:
    out_dir = Path(tempfile.mkdtemp(prefix="popproxy-rec-"))  # never the capture itself
    thread, (host, port) = _start_recorder(request, mode, out_dir, guard, ca)
    try:
        yield Pop3Server(host, port, mode, path, True, None, ca, faults)
    finally:
        _settle(out_dir, set())
        thread.stop()
    _commit(out_dir, path, mode, rules, require=True)


def _commit(
    out_dir: Path, path: Path, mode: str, rules: list[Scrub], require: bool = False
) -> None:
    """Keep the new recordings if every one is usable; otherwise keep the old capture."""
    try:
        new = sorted(out_dir.glob(f"*{SUFFIX}"))
        if not new:
            if require:
                pytest.fail(
                    f"record mode {mode!r}: the test made no POP3 session to record; "
                    f"{path} was left as it was",
                    pytrace=False,
                )
            return
        problems = [p for p in (recording.problem(c) for c in new) if p]
        if problems:
            kept = "kept as it was" if path.exists() else "not written"
            pytest.fail(
                f"record mode {mode!r}: the recording is not usable, so {path} was {kept}:\n  "
                + "\n  ".join(problems),
                pytrace=False,
            )
        single = path.suffix == SUFFIX
        if single and (len(new) > 1 or (mode == "new_episodes" and path.exists())):
            total = len(new) + (1 if mode == "new_episodes" else 0)
            pytest.fail(
                f"the test made {total} POP3 sessions but {path} holds one: "
                "mark it with a folder to keep them all",
                pytrace=False,
            )
        for capture in new:
            scrub_capture(capture, rules)
        recording.commit(new, path, keep_previous=mode == "all", append=mode == "new_episodes")
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _settle(out_dir: Path, before: set[Path], timeout: float = SETTLE_TIMEOUT) -> None:
    """Give sessions whose client has gone a moment to write their end record."""
    deadline = time.monotonic() + timeout
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
