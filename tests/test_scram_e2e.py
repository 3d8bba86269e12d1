"""mpop's SCRAM-SHA-1 and SCRAM-SHA-256 against the real Dovecot: recorded, shown, replayed."""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy.capture.events import replay_events
from popproxy.capture.reader import CaptureReader
from popproxy.core import SaslChallenge, SaslResponse
from popproxy.proxy.config import ProxyConfig
from popproxy.proxy.server import serve_record
from popproxy.tls.ca import CertificateAuthority
from popproxy.tls.contexts import client_context
from tests.support.dovecot import SCRAM_MECHANISMS, DovecotServer, find_dovecot
from tests.support.faults import wait_ended
from tests.support.leaks import assert_no_leak
from tests.support.mpop import have_mpop, mpop_fetch

pytestmark = [
    pytest.mark.dovecot,
    pytest.mark.skipif(not have_mpop(), reason="mpop is not installed (scripts/test installs it)"),
]

USER = "bob"
MODES = ("off", "stls", "implicit")
AUTHS = ("scram-sha-1", "scram-sha-256")


@pytest.fixture(scope="module")
def scram_dovecot() -> Iterator[DovecotServer]:
    """A second private Dovecot offering SCRAM (the shared one's CAPA is asserted on)."""
    if find_dovecot() is None:
        pytest.skip("dovecot is not installed")
    server = DovecotServer(mechanisms=SCRAM_MECHANISMS)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def popproxy(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popproxy", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def record_mpop(
    dovecot: DovecotServer, tmp_path: Path, auth: str, mode: str
) -> tuple[Path, subprocess.CompletedProcess[str], list[bytes], str]:
    """mpop through ``record`` (STLS intercepted, or pop3s on both legs)."""
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    out = tmp_path / "captures"
    out.mkdir(exist_ok=True)
    settings: dict[str, Any] = dict(
        listen=("127.0.0.1", 0),
        out_dir=out,
        linger=0.2,
        ca=ca,
        upstream=(dovecot.host, dovecot.port),
        upstream_context=client_context(cafile=dovecot.cafile),
    )
    if mode == "implicit":
        settings.update(
            upstream=(dovecot.host, dovecot.pop3s_port), listen_tls=True, upstream_tls=True
        )
    config = ProxyConfig(**settings)
    result: list[Any] = []

    async def main() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                addrs = await nursery.start(
                    functools.partial(serve_record, config, None, announce=False)
                )
                port = addrs[0][1]
                fetch = functools.partial(
                    mpop_fetch,
                    "127.0.0.1",
                    port,
                    USER,
                    dovecot.users[USER],
                    tmp_path / "via-proxy",
                    auth=auth,
                    tls=mode,
                    cafile=str(ca.cert_path),
                )
                result.append(await trio.to_thread.run_sync(fetch))
                result.append(await wait_ended(out, 1))
                nursery.cancel_scope.cancel()

    trio.run(main)
    (done, messages), paths = result
    return paths[0], done, messages, str(ca.cert_path)


def sasl_lines(path: Path) -> tuple[list[bytes], list[bytes]]:
    """The client and server SASL lines as the capture holds them."""
    client: list[bytes] = []
    server: list[bytes] = []
    with CaptureReader(path) as reader:
        for _, _, events in replay_events(reader):
            for e in events:
                if isinstance(e, SaslResponse):
                    client.append(e.raw.rstrip(b"\r\n"))
                elif isinstance(e, SaslChallenge):
                    server.append(e.raw.rstrip(b"\r\n"))
    return client, server


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("auth", AUTHS)
def test_mpop_scram_record_show_replay(
    scram_dovecot: DovecotServer, tmp_path: Path, auth: str, mode: str
) -> None:
    port = scram_dovecot.pop3s_port if mode == "implicit" else scram_dovecot.port
    password = scram_dovecot.users[USER]
    direct, expected = mpop_fetch(
        scram_dovecot.host,
        port,
        USER,
        password,
        tmp_path / "direct",
        auth=auth,
        tls=mode,
        cafile=scram_dovecot.cafile,
    )
    assert direct.returncode == 0, direct.stderr
    path, done, messages, _ = record_mpop(scram_dovecot, tmp_path, auth, mode)
    assert done.returncode == 0, done.stderr
    assert messages == expected and len(messages) >= 1

    # On disk: no password, no proof, no verifier; the identity and mechanism are there.
    raw = path.read_bytes()
    assert_no_leak({"capture": raw}, [password.encode()])
    client, server = sasl_lines(path)
    mech = auth.upper()
    final = [line for line in client if line and set(line) != {ord("#")}]
    first_in_clear = base64.b64decode(final[0]) if final else b""
    assert first_in_clear.startswith(b"n,,n=bob,r="), client  # client-first, in clear
    secret_lines = [line for line in client if line and set(line) == {ord("#")}]
    assert len(secret_lines) == 1, client  # the client-final with the proof
    assert server[-1].startswith(b"+ ") and set(server[-1][2:]) == {ord("#")}, server
    assert f'"mech":"{mech}","identity":"bob"'.encode() in raw

    shown = popproxy("show", str(path))
    assert shown.returncode == 0, shown.stderr
    assert f"identity bob ({mech})" in shown.stdout
    assert "server-first: nonce=" in shown.stdout and "iterations=" in shown.stdout
    assert "verifier v= present (secret, redacted)" in shown.stdout
    assert_no_leak({"show": shown.stdout}, [password.encode()])

    # Replay recomputes the exchange with a fresh nonce and verifies the server's signature.
    pw_file = tmp_path / "pw"
    pw_file.write_text(password + "\n")
    target = f"{scram_dovecot.host}:{port}"
    tls_args = ["--ca", scram_dovecot.cafile] + (["--tls"] if mode == "implicit" else [])
    ok = popproxy(
        "replay", str(path), "--server", target, "--password-file", str(pw_file), *tls_args
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"AUTH {mech}" in ok.stdout and "equivalent" in ok.stdout
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    bad = popproxy(
        "replay", str(path), "--server", target, "--password-file", str(wrong), *tls_args
    )
    assert bad.returncode == 2 and "login refused" in bad.stderr, bad.stdout + bad.stderr


# ----------------------------------------------------------------- a tampered server signature


class TamperRelay:
    """A loopback relay that flips one octet of a SCRAM server-final's signature."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.tampered = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        client, _ = self.sock.accept()
        server = socket.create_connection(self.upstream)
        threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
        self._pump(server, client, True)

    def _pump(self, src: socket.socket, dst: socket.socket, rewrite: bool) -> None:
        buf = b""
        try:
            while data := src.recv(65536):
                if not rewrite:
                    dst.sendall(data)
                    continue
                buf += data
                *lines, buf = buf.split(b"\n")
                dst.sendall(b"".join(self._rewrite(line + b"\n") for line in lines))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _rewrite(self, line: bytes) -> bytes:
        if not line.startswith(b"+ "):
            return line
        decoded = base64.b64decode(line[2:].strip())
        if not decoded.startswith(b"v="):
            return line
        signature = bytearray(base64.b64decode(decoded[2:]))
        signature[0] ^= 0x01
        self.tampered += 1
        return b"+ " + base64.b64encode(b"v=" + base64.b64encode(bytes(signature))) + b"\r\n"

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("auth", AUTHS)
def test_replay_tampered_server_signature_is_a_difference(
    scram_dovecot: DovecotServer, tmp_path: Path, auth: str
) -> None:
    path, done, _, _ = record_mpop(scram_dovecot, tmp_path, auth, "off")
    assert done.returncode == 0, done.stderr
    pw_file = tmp_path / "pw"
    pw_file.write_text(scram_dovecot.users[USER] + "\n")
    relay = TamperRelay((scram_dovecot.host, scram_dovecot.port))
    try:
        result = popproxy(
            "replay",
            str(path),
            "--server",
            f"127.0.0.1:{relay.port}",
            "--password-file",
            str(pw_file),
            "--json",
        )
    finally:
        relay.close()
    assert relay.tampered == 1
    assert result.returncode == 1, result.stdout + result.stderr
    assert "sasl.server-signature" in result.stdout
    assert "does not verify" in result.stdout


# ----------------------------------------------------------------- mpop against serve


@contextlib.contextmanager
def serving(*argv: str, env: dict[str, str] | None = None) -> Iterator[int]:
    """``popproxy serve ARGV --listen 127.0.0.1:0``; yields the port, stops it after."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "popproxy", "serve", *argv, "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1", **(env or {})},
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        if not first.startswith("listening on 127.0.0.1:"):
            proc.kill()
            raise AssertionError(first + proc.communicate(timeout=10)[1].decode())
        yield int(first.strip().rsplit(":", 1)[1])
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("mailbox", [False, True], ids=["recorded", "mailbox"])
@pytest.mark.parametrize("auth", AUTHS)
def test_mpop_against_serve_gets_the_same_mail(
    scram_dovecot: DovecotServer, tmp_path: Path, auth: str, mailbox: bool
) -> None:
    path, done, expected, _ = record_mpop(scram_dovecot, tmp_path, auth, "off")
    assert done.returncode == 0, done.stderr
    password = scram_dovecot.users[USER]
    mode = ["--mailbox"] if mailbox else []
    env = {"POPPROXY_PASSWORD": password}
    with serving(str(path), *mode, "--check-password", env=env) as port:
        served, messages = mpop_fetch(
            "127.0.0.1", port, USER, password, tmp_path / "served", auth=auth
        )
    assert served.returncode == 0, served.stderr
    assert messages == expected
    with serving(str(path), *mode, "--check-password", env=env) as port:
        refused, _ = mpop_fetch(
            "127.0.0.1", port, USER, "wrong password", tmp_path / "refused", auth=auth
        )
    assert refused.returncode != 0 and "authentication failed" in refused.stderr.lower()


def test_serve_refuses_scram_without_password(scram_dovecot: DovecotServer, tmp_path: Path) -> None:
    path, done, _, _ = record_mpop(scram_dovecot, tmp_path, "scram-sha-256", "off")
    assert done.returncode == 0, done.stderr
    result = popproxy("serve", str(path), "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert "SCRAM-SHA-256" in result.stderr and "password" in result.stderr
