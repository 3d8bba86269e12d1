"""Each TLS misconfiguration, tried for real against Dovecot, says its likely cause and fix."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from popproxy.hints import Leg, first_bytes_hint, looks_like_tls, tls_hint
from popproxy.netutil import describe_error
from popproxy.tls.contexts import client_context
from tests.support.dovecot import DovecotServer
from tests.support.tlsfakes import LineClient
from tests.test_tls_e2e import Capture, make_config, running, wait_captures

pytestmark = pytest.mark.dovecot


async def _refusal(config: object) -> tuple[bytes, Capture]:
    with trio.fail_after(20):
        async with running(config) as port:  # type: ignore[arg-type]
            client = await LineClient.connect(port)
            everything = await client.rest(timeout=10)
            await client.aclose()
            (path,) = await wait_captures(config, 1)  # type: ignore[arg-type]
    return everything, Capture(path)


async def test_untrusted_upstream_names_upstream_ca(dovecot: DovecotServer, tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        dovecot,
        upstream=(dovecot.host, dovecot.pop3s_port),
        upstream_tls=True,
        upstream_context=client_context(),  # the system store: Dovecot's test CA is not in it
    )
    line, cap = await _refusal(config)
    assert b"certificate verification failed" in line
    assert b"--upstream-ca FILE" in line and b"--insecure" in line
    assert line.count(b"\r\n") == 1  # one line, whole
    assert "--upstream-ca" in cap.end["error"]


async def test_upstream_tls_against_a_plaintext_port(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    config = make_config(tmp_path, dovecot, upstream_tls=True)  # dovecot.port is plaintext
    line, cap = await _refusal(config)
    assert b"TLS with upstream failed" in line
    assert b"drop --upstream-tls" in line, line
    assert "WRONG_VERSION_NUMBER" in cap.end["error"] or "wrong version" in cap.end["error"]


def _connect_tls(port: int, context: ssl.SSLContext) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            with context.wrap_socket(sock, server_hostname="localhost") as tls:
                tls.recv(100)
        except ssl.SSLError as exc:
            return type(exc).__name__
    return "ok"


async def test_client_that_does_not_trust_popproxy_ca(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path, dovecot, upstream=(dovecot.host, dovecot.pop3s_port), upstream_tls=True
    )
    config.listen_tls = True
    with trio.fail_after(30):
        async with running(config) as port:
            outcome = await trio.to_thread.run_sync(
                _connect_tls, port, ssl.create_default_context()
            )
            (path,) = await wait_captures(config, 1)
    assert outcome == "SSLCertVerificationError"
    cap = Capture(path)
    assert cap.end["how"] == "client-tls-error"
    assert "popproxy ca" in cap.end["error"], cap.end["error"]


async def test_plaintext_client_at_a_tls_listener(dovecot: DovecotServer, tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        dovecot,
        upstream=(dovecot.host, dovecot.pop3s_port),
        upstream_tls=True,
        connect_timeout=0.5,
    )
    config.listen_tls = True
    with trio.fail_after(20):
        async with running(config) as port:
            client = await LineClient.connect(port)  # waits for a greeting, sends nothing
            await client.rest(timeout=5)
            await client.aclose()
            (path,) = await wait_captures(config, 1)
    error = Capture(path).end["error"]
    assert "drop --listen-tls" in error, error


def test_hints_by_leg() -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    assert "--ca FILE" in (tls_hint(verify, Leg.UPSTREAM, ca_flag="--ca") or "")
    assert tls_hint(verify, Leg.CLIENT) is None
    plain = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
    plain.reason = "WRONG_VERSION_NUMBER"  # type: ignore[misc]
    assert "drop --upstream-tls" in (tls_hint(plain, Leg.UPSTREAM) or "")
    assert "drop --listen-tls" in (tls_hint(plain, Leg.CLIENT) or "")
    text = describe_error(plain, Leg.UPSTREAM)
    assert text.startswith("[SSL: WRONG_VERSION_NUMBER] wrong version number (hint: ")
    assert "_ssl.c" not in text
    assert describe_error(OSError(111, "Connection refused")) == "Connection refused"


def test_tls_record_detection() -> None:
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    assert looks_like_tls(hello) and looks_like_tls(b"\x15\x03\x03\x00\x02")
    assert not looks_like_tls(b"+OK ready\r\n") and not looks_like_tls(b"\x16\x03")
    assert "--listen-tls" in (first_bytes_hint(hello, from_client=True, leg_tls=False) or "")
    assert first_bytes_hint(hello, from_client=True, leg_tls=True) is None
    assert "--upstream-tls" in (first_bytes_hint(hello, from_client=False, leg_tls=False) or "")


def test_curl_without_popproxy_ca_is_told_where_it_is(tmp_path: Path) -> None:
    """The `popproxy ca` command the hint points to exists and names the certificate."""
    done = subprocess.run(
        [sys.executable, "-m", "popproxy", "ca", "--ca-dir", str(tmp_path / "ca"), "--path"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(".pem")


@pytest.mark.parametrize("split", [1, 2, 3, 64])
def test_observer_flags_a_tls_client_on_a_plaintext_leg(split: int) -> None:
    from popproxy.core import Anomaly, Direction, Observer

    hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(40))
    observer = Observer()
    events = observer.receive_data(Direction.SERVER, b"+OK ready\r\n")
    for i in range(0, len(hello), split):
        events += observer.receive_data(Direction.CLIENT, hello[i : i + split])
    kinds = [e.kind for e in events if isinstance(e, Anomaly)]
    assert kinds.count("tls-on-plaintext") == 1
    anomaly = next(e for e in events if isinstance(e, Anomaly) and e.kind == "tls-on-plaintext")
    assert "--listen-tls" in anomaly.detail


def test_observer_does_not_sniff_pop3_or_tls_legs() -> None:
    from popproxy.core import Anomaly, Direction, Observer

    observer = Observer()
    observer.start_tls(Direction.CLIENT)
    observer.start_tls(Direction.SERVER)
    events = observer.receive_data(Direction.SERVER, b"+OK ready\r\n")
    events += observer.receive_data(Direction.CLIENT, b"\x16\x03\x01CAPA\r\n")
    assert not [e for e in events if isinstance(e, Anomaly) and e.kind == "tls-on-plaintext"]


async def test_start_up_probe_of_the_upstream(dovecot: DovecotServer, tmp_path: Path) -> None:
    from popproxy.proxy.probe import probe_upstream
    from tests.support.dovecot import free_port

    good = make_config(tmp_path, dovecot)
    assert await probe_upstream(good) is None
    tls_ok = make_config(
        tmp_path, dovecot, upstream=(dovecot.host, dovecot.pop3s_port), upstream_tls=True
    )
    assert await probe_upstream(tls_ok) is None
    tls_at_plain = make_config(tmp_path, dovecot, upstream_tls=True)
    assert "drop --upstream-tls" in (await probe_upstream(tls_at_plain) or "")
    plain_at_tls = make_config(tmp_path, dovecot, upstream=(dovecot.host, dovecot.pop3s_port))
    assert "add --upstream-tls" in (await probe_upstream(plain_at_tls, timeout=1) or "")
    untrusted = make_config(
        tmp_path,
        dovecot,
        upstream=(dovecot.host, dovecot.pop3s_port),
        upstream_tls=True,
        upstream_context=client_context(),
    )
    assert "--upstream-ca FILE" in (await probe_upstream(untrusted) or "")
    nobody = make_config(tmp_path, dovecot, upstream=("127.0.0.1", free_port()))
    assert "cannot reach upstream" in (await probe_upstream(nobody) or "")


def test_record_warns_about_a_non_loopback_listener_and_a_dead_upstream(tmp_path: Path) -> None:
    from tests.support.dovecot import free_port

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "popproxy",
            "record",
            "--upstream",
            f"127.0.0.1:{free_port()}",
            "--listen",
            "0.0.0.0:0",
            "--out",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin"},
    )
    try:
        seen = ""
        assert proc.stdout is not None
        while "cannot reach upstream" not in seen:
            line = proc.stdout.readline()
            assert line, seen
            seen += line
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "accepts clients from other machines" in seen
    assert "--listen 127.0.0.1:PORT" in seen
