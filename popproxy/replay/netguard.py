"""``--pop3-block-network``: a test may connect only to popproxy's servers on loopback."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from collections.abc import Iterator
from typing import Any


class NetworkBlocked(RuntimeError):
    """A connection ``--pop3-block-network`` refused."""


class NetworkGuard:
    """Patches ``socket.socket.connect``/``connect_ex`` while active (as pytest-recording's
    block_network does); allowed: Unix sockets and the loopback ports registered here."""

    def __init__(self) -> None:
        self._allowed: set[int] = set()
        self._upstreams: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def allow_port(self, port: int) -> None:
        with self._lock:
            self._allowed.add(port)

    def allow_upstream(self, host: str, port: int) -> None:
        """Recording: popproxy's own proxy may reach the upstream it records from."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            hosts = {str(info[4][0]) for info in infos} | {host}
        except OSError:
            hosts = {host}
        with self._lock:
            self._upstreams.update((h, port) for h in hosts)

    def check(self, family: int, address: Any) -> None:
        if family == getattr(socket, "AF_UNIX", None):
            return
        if not isinstance(address, tuple) or len(address) < 2:
            raise NetworkBlocked(f"popproxy --pop3-block-network: connection to {address!r}")
        host, port = str(address[0]), int(address[1])
        with self._lock:
            if (host, port) in self._upstreams:
                return
            allowed = port in self._allowed
        try:
            loopback = ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
        except ValueError:
            loopback = False
        if not (loopback and allowed):
            raise NetworkBlocked(
                f"popproxy --pop3-block-network: connection to {host}:{port} refused "
                "(tests may only reach popproxy's fake POP3 servers on loopback)"
            )

    @contextlib.contextmanager
    def active(self) -> Iterator[NetworkGuard]:
        guard = self
        original_connect = socket.socket.connect
        original_connect_ex = socket.socket.connect_ex

        def connect(sock: socket.socket, address: Any) -> None:
            guard.check(sock.family, address)
            original_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> int:
            guard.check(sock.family, address)
            return original_connect_ex(sock, address)

        socket.socket.connect = connect  # type: ignore[method-assign,assignment]
        socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]
        try:
            yield self
        finally:
            socket.socket.connect = original_connect  # type: ignore[method-assign]
            socket.socket.connect_ex = original_connect_ex  # type: ignore[method-assign]
