"""Shared fixtures: one private Dovecot server for the whole session."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Make ``tests.support`` importable however pytest was started.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.dovecot import DovecotError, DovecotServer, find_dovecot  # noqa: E402


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def dovecot() -> Iterator[DovecotServer]:
    """A running private Dovecot (pop3 on ``.port``, pop3s on ``.pop3s_port``).

    Mailboxes start with ``STANDARD_MESSAGES``; tests that change a mailbox
    should use ``dovecot_clean`` instead.
    """
    if find_dovecot() is None:
        reason = "dovecot is not installed (scripts/test installs dovecot-pop3d)"
        if _under_ci():
            pytest.fail(reason + " and CI is set", pytrace=False)
        pytest.skip(reason)
    for attempt in range(3):  # a free port can be taken by another program before Dovecot binds
        server = DovecotServer()
        try:
            server.start()
            break
        except DovecotError:
            server.cleanup()
            if attempt == 2:
                raise
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def dovecot_clean(dovecot: DovecotServer) -> DovecotServer:
    """The session's Dovecot with every mailbox reset to ``STANDARD_MESSAGES``."""
    for user in dovecot.users:
        dovecot.reset_mailbox(user)
    return dovecot
