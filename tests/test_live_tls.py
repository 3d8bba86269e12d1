"""The live view names each leg's TLS, popproxy's own actions and attachments (real Dovecot)."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import pytest
import trio
from rich.console import Console

from popproxy.proxy.config import StlsMode
from popproxy.proxy.server import serve_record
from popproxy.views.live import LiveView
from popproxy.views.theme import THEME
from tests.support import clients
from tests.support.dovecot import DovecotServer
from tests.test_tls_e2e import ALICE, CLIENT_TIMEOUT, HOST, in_thread, make_config, wait_captures

pytestmark = pytest.mark.dovecot


async def _watch(config: object, client: functools.partial[object]) -> str:
    """Run ``client(port)`` through the proxy with a live view; return what it showed."""
    out = io.StringIO()
    view = LiveView(Console(file=out, theme=THEME, width=400, color_system=None))
    try:
        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                addrs = await nursery.start(
                    functools.partial(serve_record, config, view, announce=False)
                )
                await in_thread(client, addrs[0][1])
                await wait_captures(config, 1)  # type: ignore[arg-type]
                nursery.cancel_scope.cancel()
    finally:
        view.close()
    return out.getvalue()


async def test_stls_intercept_names_both_legs(dovecot: DovecotServer, tmp_path: Path) -> None:
    config = make_config(tmp_path, dovecot)
    ca = str(config.certificate_authority().cert_path)
    pw = dovecot.users[ALICE]
    shown = await _watch(
        config,
        functools.partial(
            lambda port: clients.poplib_session(
                HOST, port, ALICE, pw, tls="stls", cafile=ca, timeout=CLIENT_TIMEOUT
            )
        ),
    )
    lines = [line for line in shown.splitlines() if "🔒 TLS" in line]
    client = next(line for line in lines if "client ⇄ popproxy" in line)
    server = next(line for line in lines if "popproxy ⇄ server" in line)
    assert "version=TLSv1" in client and "cipher=" in client
    assert "issuer=" in server and "peer=" in server and "verified" in server
    assert "NOT verified" not in server
    assert "📎 report.pdf" in shown  # the attachment of the third message, named live


async def test_insecure_upstream_says_not_verified(dovecot: DovecotServer, tmp_path: Path) -> None:
    from popproxy.tls.contexts import client_context

    config = make_config(
        tmp_path,
        dovecot,
        upstream=(dovecot.host, dovecot.pop3s_port),
        upstream_tls=True,
        insecure=True,
        upstream_context=client_context(insecure=True),
    )
    pw = dovecot.users[ALICE]
    shown = await _watch(
        config,
        functools.partial(
            lambda port: clients.poplib_session(HOST, port, ALICE, pw, timeout=CLIENT_TIMEOUT)
        ),
    )
    assert "popproxy ⇄ server" in shown and "NOT verified (--insecure)" in shown


async def test_passthrough_and_strip_are_told_apart(dovecot: DovecotServer, tmp_path: Path) -> None:
    pw = dovecot.users[ALICE]
    (tmp_path / "strip").mkdir()
    config = make_config(tmp_path / "strip", dovecot, stls=StlsMode.STRIP)
    shown = await _watch(
        config,
        functools.partial(
            lambda port: clients.poplib_session(HOST, port, ALICE, pw, timeout=CLIENT_TIMEOUT)
        ),
    )
    assert "popproxy" in shown and ("did not forward" in shown or "● popproxy:" in shown)
    (tmp_path / "pt").mkdir()
    config = make_config(tmp_path / "pt", dovecot, stls=StlsMode.PASSTHROUGH)
    shown = await _watch(
        config,
        functools.partial(
            lambda port: clients.poplib_session(
                HOST,
                port,
                ALICE,
                pw,
                tls="stls",
                cafile=dovecot.cafile,
                timeout=CLIENT_TIMEOUT,
            )
        ),
    )
    assert "passthrough: not decrypted" in shown
