"""A small folder of real Dovecot sessions (poplib through the proxy) for inspector tests."""

from __future__ import annotations

import contextlib
import poplib
from pathlib import Path
from typing import Any

from tests.support import clients
from tests.support.dovecot import USERS, DovecotServer
from tests.support.recorder import record


def _wrong_password(host: str, port: int) -> str:
    client = poplib.POP3(host, port, timeout=10)
    try:
        client.user("bob")
        with contextlib.suppress(poplib.error_proto):
            client.pass_("not-bobs-password")
        client.quit()
    finally:
        client.close()
    return "refused"


def _list_only(host: str, port: int) -> Any:
    return clients.poplib_session(host, port, "bob", USERS["bob"], retrieve=False)


def record_samples(dovecot: DovecotServer, folder: Path) -> dict[str, Path]:
    """Three sessions: alice retrieves everything, bob only lists, bob mistypes his password."""
    upstream = ("127.0.0.1", dovecot.port)
    paths: dict[str, Path] = {}
    paths["alice"], _ = record(
        upstream,
        folder,
        lambda h, p: clients.poplib_session(h, p, "alice", USERS["alice"]),
    )
    paths["bob"], _ = record(upstream, folder, _list_only)
    paths["refused"], _ = record(upstream, folder, _wrong_password)
    return paths
