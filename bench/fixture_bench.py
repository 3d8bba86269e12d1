"""200 pytest tests, each a poplib session: the mailbox fixture against a socketserver fake."""

from __future__ import annotations

import mailbox
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import Table, fmt, median, ratio

TESTS = 200
MESSAGES = [
    f"From: sender{i}@example.org\nSubject: message {i}\n\n" + "a line of text\n" * (20 * i)
    for i in range(1, 4)
]

SESSION = """
import poplib

def session(host, port):
    c = poplib.POP3(host, port, timeout=10)
    c.user("alice")
    c.pass_("secret")
    count, size = c.stat()
    c.list()
    body = c.retr(1)[1]
    c.quit()
    assert count == 3 and body
"""

MAILBOX_TESTS = (
    SESSION
    + f"""
import pytest

@pytest.mark.parametrize("n", range({TESTS}))
@pytest.mark.pop3_capture("Maildir", mode="mailbox", password="secret")
def test_session(pop3_server, n):
    session(pop3_server.host, pop3_server.port)
"""
)

# The baseline: the same session against the simplest fake a test author would write.
SOCKETSERVER_TESTS = (
    SESSION
    + f"""
import socketserver
import threading
from pathlib import Path

import pytest

MESSAGES = [p.read_bytes().replace(b"\\n", b"\\r\\n") for p in sorted(
    (Path(__file__).parent / "Maildir" / "new").iterdir())]


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(b"+OK ready\\r\\n")
        for line in self.rfile:
            verb, *args = line.decode().split()
            verb = verb.upper()
            if verb in ("USER", "PASS", "NOOP"):
                self.wfile.write(b"+OK\\r\\n")
            elif verb == "STAT":
                self.wfile.write(b"+OK %d %d\\r\\n" % (len(MESSAGES), sum(map(len, MESSAGES))))
            elif verb == "LIST":
                rows = b"".join(b"%d %d\\r\\n" % (i, len(m)) for i, m in enumerate(MESSAGES, 1))
                self.wfile.write(b"+OK\\r\\n" + rows + b".\\r\\n")
            elif verb == "RETR":
                body = MESSAGES[int(args[0]) - 1].replace(b"\\r\\n.", b"\\r\\n..")
                self.wfile.write(b"+OK\\r\\n" + body + b".\\r\\n")
            elif verb == "QUIT":
                self.wfile.write(b"+OK bye\\r\\n")
                return
            else:
                self.wfile.write(b"-ERR\\r\\n")


@pytest.fixture
def fake():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    # serve_forever's default 0.5 s poll would make shutdown() cost 0.5 s a test
    thread = threading.Thread(target=server.serve_forever, args=(0.005,), daemon=True)
    thread.start()
    yield server.server_address
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("n", range({TESTS}))
def test_session(fake, n):
    session(*fake)
"""
)

EMPTY_TESTS = f"""
import pytest

@pytest.mark.parametrize("n", range({TESTS}))
def test_nothing(n):
    pass
"""

VARIANTS = {
    "socketserver fake": "test_socketserver.py",
    "pop3_server mailbox": "test_mailbox.py",
    "no server (pytest alone)": "test_empty.py",
}


def _project() -> Path:
    root = Path(tempfile.mkdtemp(prefix="popproxy-bench-fixture-"))
    box = mailbox.Maildir(str(root / "Maildir"), create=True)
    for text in MESSAGES:
        box.add(text.encode())
    (root / "test_mailbox.py").write_text(MAILBOX_TESTS)
    (root / "test_socketserver.py").write_text(SOCKETSERVER_TESTS)
    (root / "test_empty.py").write_text(EMPTY_TESTS)
    (root / "pytest.ini").write_text("[pytest]\n")
    return root


def _once(root: Path, name: str) -> float:
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
    start = time.perf_counter()
    proc = subprocess.run([*argv, name], cwd=root, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0 or f"{TESTS} passed" not in proc.stdout:
        raise RuntimeError(f"{name} failed in run:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return took


def run(runs: int) -> Table:
    """Median wall time of each suite (a pytest subprocess), interleaved over ``runs`` rounds."""
    root = _project()
    times: dict[str, list[float]] = {label: [] for label in VARIANTS}
    for name in VARIANTS.values():
        _once(root, name)  # warm .pyc files and the page cache
    for _ in range(runs):
        for label, name in VARIANTS.items():
            times[label].append(_once(root, name))
    empty = median(times["no server (pytest alone)"])
    base = median(times["socketserver fake"])
    table = Table(
        f"pytest fixture: {TESTS} tests, one poplib session each (median wall time)",
        ["suite", "median s", "per test ms (minus pytest alone)", "× socketserver fake", "target"],
    )
    for label, values in times.items():
        m = median(values)
        table.rows.append(
            [
                label,
                fmt(m),
                fmt((m - empty) / TESTS * 1e3) if label != "no server (pytest alone)" else "",
                ratio(m, base),
                "≤ 2×" if label == "pop3_server mailbox" else "",
            ]
        )
    table.notes.append(
        f"{runs} interleaved rounds; each suite is one `python -m pytest` process; "
        "USER, PASS, STAT, LIST, RETR 1, QUIT per test; both fixtures start a server per "
        "test (the socketserver one polls for shutdown every 5 ms)"
    )
    return table
