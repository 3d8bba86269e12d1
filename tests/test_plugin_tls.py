"""The pytest plugin records through TLS: tls=True (pop3s on both legs) and a client's STLS."""

from __future__ import annotations

import pytest

from tests.support.dovecot import USERS, DovecotServer

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.dovecot

INNER = """
import poplib, ssl
import pytest

@pytest.mark.pop3_capture("caps/{name}.popcap"{marker})
def test_fetch(pop3_server):
    ctx = ssl.create_default_context(cafile=pop3_server.cafile)
    {connect}
    c.user("alice")
    c.pass_({pw!r})
    assert c.stat()[0] == 4
    c.quit()
"""


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "no:cacheprovider", *args)


@pytest.mark.parametrize(
    ("name", "marker", "connect", "port"),
    [
        (
            "pop3s",
            ", tls=True",
            "c = poplib.POP3_SSL(pop3_server.host, pop3_server.port, context=ctx, timeout=10)",
            "pop3s_port",
        ),
        (
            "stls",
            "",
            "c = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10); c.stls(ctx)",
            "port",
        ),
    ],
)
def test_record_through_tls_then_replay(
    pytester: pytest.Pytester,
    dovecot_clean: DovecotServer,
    name: str,
    marker: str,
    connect: str,
    port: str,
) -> None:
    pw = USERS["alice"]
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_rec=INNER.format(name=name, marker=marker, connect=connect, pw=pw))
    upstream = f"{dovecot_clean.host}:{getattr(dovecot_clean, port)}"
    result = _run(
        pytester,
        "--pop3-record-mode=once",
        f"--pop3-upstream={upstream}",
        f"--pop3-upstream-ca={dovecot_clean.cafile}",
    )
    result.assert_outcomes(passed=1)
    capture = pytester.path / "caps" / f"{name}.popcap"
    assert capture.is_file() and pw.encode() not in capture.read_bytes()
    assert b'"r":"tls"' in capture.read_bytes().replace(b" ", b"")
    # Offline: the recording plays back over TLS the same way.
    result = _run(pytester, "--pop3-upstream=127.0.0.1:1")
    result.assert_outcomes(passed=1)
