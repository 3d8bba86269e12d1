#!/usr/bin/env python3
"""Record real POP3 byte transcripts (Dovecot <-> real clients) for the parser's tests.

Starts a private Dovecot (tests/support/dovecot.py), puts a threaded TCP tee
relay in front of it, drives one client session per fixture through the relay
and writes ``tests/fixtures/<name>.json``::

    {"name": ..., "description": ..., "user": ..., "password": ...,
     "chunks": [{"dir": "c" | "s", "t": seconds since the session began,
                 "b64": base64 of exactly the bytes one recv() returned}, ...]}

"c" is client -> server, "s" is server -> client; chunks are in the order
the relay forwarded them. The bytes are exact (the APOP greeting carries this
machine's host name and a timestamp); record once, commit, and do not expect
a rerun to give the same bytes or chunking.

Run: .venv/bin/python scripts/make_fixtures.py [--out DIR] [NAME ...]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import clients  # noqa: E402
from tests.support.dovecot import DovecotServer  # noqa: E402

USER = "alice"
TIMEOUT = 20.0


class TeeRelay:
    """Accept TCP connections on 127.0.0.1, forward each to ``upstream``, record bytes."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.sessions: list[list[dict[str, Any]]] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            chunks: list[dict[str, Any]] = []
            self.sessions.append(chunks)
            thread = threading.Thread(target=self._relay, args=(conn, chunks), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _relay(self, client: socket.socket, chunks: list[dict[str, Any]]) -> None:
        start = time.monotonic()
        lock = threading.Lock()
        server = socket.create_connection(self.upstream, timeout=TIMEOUT)
        client.settimeout(TIMEOUT)

        def pump(src: socket.socket, dst: socket.socket, direction: str) -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    with lock:
                        chunks.append(
                            {"dir": direction, "t": time.monotonic() - start, "data": data}
                        )
                        dst.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

        pumps = [
            threading.Thread(target=pump, args=(client, server, "c"), daemon=True),
            threading.Thread(target=pump, args=(server, client, "s"), daemon=True),
        ]
        for p in pumps:
            p.start()
        for p in pumps:
            p.join(TIMEOUT * 3)
        client.close()
        server.close()

    def take_session(self, wait: float = TIMEOUT) -> list[dict[str, Any]]:
        """Wait for every relayed connection to end; return the one session's chunks."""
        deadline = time.monotonic() + wait
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                raise RuntimeError("relayed session did not end")
        if len(self.sessions) != 1:
            raise RuntimeError(f"expected one connection, saw {len(self.sessions)}")
        chunks = self.sessions[0]
        self.sessions.clear()
        self._threads.clear()
        return chunks

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._acceptor.join(2)


class Raw:
    """A minimal blocking POP3 conversation over a plain socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buf = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"server closed; buffered {self.buf!r}")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def status(self) -> bytes:
        line = self.line()
        if not line.startswith((b"+OK", b"-ERR", b"+ ")) and line != b"+":
            raise ValueError(f"not a status line: {line!r}")
        return line

    def ok(self) -> bytes:
        line = self.status()
        if not line.startswith(b"+OK"):
            raise ValueError(f"expected +OK, got {line!r}")
        return line

    def multiline(self) -> list[bytes]:
        self.ok()
        body = []
        while (line := self.line()) != b".":
            body.append(line)
        return body

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def login_userpass(raw: Raw, password: str) -> None:
    raw.ok()  # greeting
    raw.send(f"USER {USER}\r\n".encode())
    raw.ok()
    raw.send(f"PASS {password}\r\n".encode())
    raw.ok()


def session_pipelined(port: int, password: str) -> None:
    raw = Raw(port)
    login_userpass(raw, password)
    raw.send(b"STAT\r\nLIST\r\nUIDL\r\nRETR 2\r\nNOOP\r\n")  # one write
    raw.ok()
    raw.multiline()
    raw.multiline()
    raw.multiline()
    raw.ok()
    raw.send(b"QUIT\r\n")
    raw.ok()
    raw.close()


def session_auth_cancel(port: int, password: str) -> None:
    raw = Raw(port)
    raw.ok()  # greeting
    raw.send(b"AUTH PLAIN\r\n")
    cont = raw.status()
    if not cont.startswith(b"+"):
        raise ValueError(f"expected a continuation, got {cont!r}")
    raw.send(b"*\r\n")
    cancelled = raw.status()
    if not cancelled.startswith(b"-ERR"):
        raise ValueError(f"expected -ERR after cancel, got {cancelled!r}")
    raw.send(f"USER {USER}\r\n".encode())
    raw.ok()
    raw.send(f"PASS {password}\r\n".encode())
    raw.ok()
    raw.send(b"QUIT\r\n")
    raw.ok()
    raw.close()


def curl_session(port: int, password: str, mech: str) -> None:
    """One curl run, one connection: the listing, then RETR 1 (curl reuses it)."""
    base = f"pop3://127.0.0.1:{port}/"
    subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            str(TIMEOUT),
            "--user",
            f"{USER}:{password}",
            "--login-options",
            f"AUTH={mech}",
            "--output",
            "/dev/null",
            base,
            "--output",
            "/dev/null",
            base + "1",
        ],
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=TIMEOUT + 5,
    )


SESSIONS: dict[str, tuple[str, Callable[[int, str], object]]] = {
    "poplib_userpass": (
        "poplib: CAPA, USER/PASS, STAT, LIST, UIDL, TOP 1 0, RETR 1-4, QUIT",
        lambda port, pw: clients.poplib_session("127.0.0.1", port, USER, pw),
    ),
    "poplib_apop": (
        "poplib: CAPA, APOP, STAT, LIST, UIDL, TOP 1 0, QUIT (no RETR)",
        lambda port, pw: clients.poplib_session(
            "127.0.0.1", port, USER, pw, apop=True, retrieve=False
        ),
    ),
    "curl_plain": (
        "curl --login-options AUTH=PLAIN: listing, then RETR 1 on the same connection",
        lambda port, pw: curl_session(port, pw, "PLAIN"),
    ),
    "curl_login": (
        "curl --login-options AUTH=LOGIN: listing, then RETR 1 on the same connection",
        lambda port, pw: curl_session(port, pw, "LOGIN"),
    ),
    "curl_cram_md5": (
        "curl --login-options AUTH=CRAM-MD5: listing, then RETR 1 on the same connection",
        lambda port, pw: curl_session(port, pw, "CRAM-MD5"),
    ),
    "pipelined": (
        "raw socket: USER/PASS, then STAT LIST UIDL RETR 2 NOOP in one write, QUIT",
        session_pipelined,
    ),
    "auth_cancel": (
        "raw socket: AUTH PLAIN, '+ ', client cancels with '*', -ERR, USER/PASS, QUIT",
        session_auth_cancel,
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures")
    parser.add_argument("names", nargs="*", choices=[[], *SESSIONS], default=[])
    args = parser.parse_args(argv)
    names = args.names or list(SESSIONS)
    args.out.mkdir(parents=True, exist_ok=True)

    with DovecotServer() as server:
        password = server.users[USER]
        relay = TeeRelay((server.host, server.port))
        try:
            for name in names:
                description, run = SESSIONS[name]
                server.reset_mailbox(USER)
                run(relay.port, password)
                chunks = relay.take_session()
                record = {
                    "name": name,
                    "description": description,
                    "user": USER,
                    "password": password,
                    "chunks": [
                        {
                            "dir": c["dir"],
                            "t": round(c["t"], 6),
                            "b64": base64.b64encode(c["data"]).decode("ascii"),
                        }
                        for c in chunks
                    ],
                }
                path = args.out / f"{name}.json"
                path.write_text(json.dumps(record, indent=1) + "\n")
                sizes = {d: sum(len(c["data"]) for c in chunks if c["dir"] == d) for d in "cs"}
                print(
                    f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
                    f"{len(chunks)} chunks, client {sizes['c']} B, server {sizes['s']} B"
                )
        finally:
            relay.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
