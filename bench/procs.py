"""Start the benchmark's subprocesses (server, relays, socat, popproxy) and always stop them."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")
STOP_TIMEOUT = 5.0

_live: list[Service] = []


class Unavailable(Exception):
    """A variant cannot run here; the message says why."""


@dataclass
class Service:
    """One running subprocess that listens on 127.0.0.1:port."""

    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    group: bool = False
    port: int = 0
    stopped: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGINT, then SIGKILL after ``timeout`` seconds; always reaps."""
        if self.stopped:
            return
        self.stopped = True
        if self.proc.poll() is None or self.group:
            self._signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
            if self.group:  # forked socat children of a finished parent
                self._signal(signal.SIGKILL)
        with contextlib.suppress(ValueError):
            _live.remove(self)

    def err_tail(self, limit: int = 300) -> str:
        try:
            text = self.err.read_text(errors="replace").strip()
        except OSError:
            return ""
        return text[-limit:].replace("\n", " | ")

    def status(self, key: str) -> int:
        """A ``/proc/PID/status`` value in kB, e.g. ``VmHWM`` (peak RSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)


def stop_all() -> None:
    """Stop every service still running (also run at exit)."""
    for service in list(_live):
        service.stop()


atexit.register(stop_all)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start(
    name: str,
    argv: list[str],
    logdir: Path,
    port: int | None = None,
    group: bool = False,
    timeout: float = 20.0,
) -> Service:
    """Start ``argv``; wait for its ``listening on 127.0.0.1:PORT`` stdout line (stdout goes to
    a file), or, when ``port`` is given, until that port accepts."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    out, err = logdir / f"{slug}.out", logdir / f"{slug}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=REPO,
            start_new_session=group,
        )
    service = Service(name, proc, out, err, group=group)
    _live.append(service)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            service.stop()
            raise Unavailable(f"{name} exited with {proc.returncode}: {service.err_tail()}")
        if port is not None:
            if _accepts(port):
                service.port = port
                return service
        else:
            with out.open("rb") as stream:
                match = LISTENING.search(stream.read(1 << 20))
            if match:
                service.port = int(match.group(1))
                return service
        time.sleep(0.02)
    service.stop()
    raise Unavailable(f"{name} did not start listening within {timeout:.0f} s")


def python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def start_server(logdir: Path, size: int, line: int = 1024) -> Service:
    argv = python("bench.pop3server", "--port", "0", "--retr-size", str(size), "--line", str(line))
    return start("pop3server", argv, logdir)


def start_relay(logdir: Path, upstream: int) -> Service:
    argv = python("bench.relay", "--upstream", f"127.0.0.1:{upstream}", "--listen", "127.0.0.1:0")
    return start("bare relay", argv, logdir)


def ensure_socat() -> str:
    """Return socat's path, installing it with apt-get when missing and running as root."""
    path = shutil.which("socat")
    if path:
        return path
    if os.geteuid() != 0:
        raise Unavailable("socat is not installed (run: apt-get install -y socat)")
    install = ["apt-get", "install", "-y", "socat"]
    for commands in ([install], [["apt-get", "update"], install]):
        for command in commands:
            subprocess.run(command, check=False, capture_output=True, stdin=subprocess.DEVNULL)
        path = shutil.which("socat")
        if path:
            return path
    raise Unavailable("socat is missing and apt-get install -y socat failed")


def start_socat(logdir: Path, upstream: int) -> Service:
    port = free_port()
    argv = [
        ensure_socat(),
        f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
        f"TCP:127.0.0.1:{upstream}",
    ]
    return start("socat", argv, logdir, port=port, group=True)


_popproxy_note: list[str] = []


def popproxy_missing() -> str | None:
    """None when ``python -m popproxy record`` exists, else why not (checked once)."""
    if not _popproxy_note:
        try:
            done = subprocess.run(
                python("popproxy", "record", "--help"),
                cwd=REPO,
                capture_output=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            why = lines[-1] if lines else f"exit status {done.returncode}"
            _popproxy_note.append("" if done.returncode == 0 else why)
        except (OSError, subprocess.TimeoutExpired) as exc:
            _popproxy_note.append(str(exc))
    note = _popproxy_note[0]
    return f"`python -m popproxy record` not available yet ({note})" if note else None


def start_popproxy(
    logdir: Path,
    upstream: int,
    out: Path,
    quiet: bool = True,
    extra: tuple[str, ...] = (),
    label: str | None = None,
    tree: str | None = None,
) -> Service:
    """``python -m popproxy record`` with captures in ``out``; live view when not quiet.

    ``tree``: run the ``popproxy`` package of that source tree instead of this one.
    """
    missing = popproxy_missing()
    if missing:
        raise Unavailable(missing)
    out.mkdir(parents=True, exist_ok=True)
    argv = python(
        "popproxy", "record", "--upstream", f"127.0.0.1:{upstream}", "--listen", "127.0.0.1:0"
    )
    if tree is not None:
        boot = (
            f"import sys; sys.path.insert(0, {tree!r}); "
            "from popproxy.cli.main import main; sys.exit(main())"
        )
        argv = [sys.executable, "-c", boot, *argv[3:]]
    argv += ["--out", str(out)] + (["--quiet"] if quiet else []) + list(extra)
    name = label or ("popproxy" + (" --quiet" if quiet else " live view"))
    return start(name, argv, logdir)
