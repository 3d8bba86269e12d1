"""XOAUTH2 and OAUTHBEARER with curl and mpop: the Gmail and Outlook personas, record, replay."""

from __future__ import annotations

import base64
import json
import poplib
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy.core import sasl
from tests.support.leaks import assert_no_leak
from tests.support.mpop import have_mpop, mpop_fetch
from tests.support.recorder import record
from tests.support.scripted import ScriptedServer
from tests.test_scram_e2e import popproxy, serving

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")

USER = "someone@example.com"
GOOD = "ya29.GOOD-token-0123456789abcdef"
BAD = "ya29.BAD-token-9876543210fedcba"
SUBJECT = "hello oauth"


@pytest.fixture
def mail(tmp_path: Path) -> Path:
    folder = tmp_path / "mail"
    folder.mkdir()
    (folder / "1.eml").write_bytes(
        b"From: a@example.org\r\nTo: b@example.org\r\nSubject: " + SUBJECT.encode() + b"\r\n"
        b"\r\nbody line\r\n"
    )
    return folder


def curl(
    port: int, token: str, *extra: str, scheme: str = "pop3"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "curl",
            "-s",
            "-v",
            f"{scheme}://127.0.0.1:{port}/1",
            "-u",
            f"{USER}:",
            "--oauth2-bearer",
            token,
            "--max-time",
            "20",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def sent(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines curl's -v shows it sent (``> ...``)."""
    return [line[2:] for line in result.stderr.splitlines() if line.startswith("> ")]


@pytest.fixture
def gmail(mail: Path, tmp_path: Path) -> Iterator[int]:
    with serving(
        "--persona", "gmail", str(mail), "--token", GOOD, "--ca-dir", str(tmp_path / "ca")
    ) as port:
        yield port


@pytest.fixture
def outlook(mail: Path, tmp_path: Path) -> Iterator[tuple[int, str]]:
    ca = tmp_path / "ca"
    with serving("--persona", "outlook", str(mail), "--token", GOOD, "--ca-dir", str(ca)) as port:
        yield port, str(ca / "ca.pem")


# ----------------------------------------------------------------- Gmail


@pytest.mark.parametrize("ir", [True, False], ids=["one-line", "two-step"])
def test_curl_oauthbearer_against_gmail(gmail: int, ir: bool) -> None:
    result = curl(gmail, GOOD, *(["--sasl-ir"] if ir else []))
    assert result.returncode == 0, result.stderr
    assert f"Subject: {SUBJECT}" in result.stdout
    auth = [line for line in sent(result) if line.startswith("AUTH ")]
    assert auth == ([auth[0]] if ir else ["AUTH OAUTHBEARER"]) and auth[0].startswith(
        "AUTH OAUTHBEARER"
    )
    if ir:
        assert len(auth[0].split()) == 3


def test_curl_refused_token_at_gmail_gets_json_and_answers_aq(gmail: int) -> None:
    result = curl(gmail, BAD)
    assert result.returncode == 67, result.stderr  # CURLE_LOGIN_DENIED
    challenge = next(x for x in result.stderr.splitlines() if x.startswith("< + ey"))
    error = json.loads(base64.b64decode(challenge[4:]))
    assert error == {"status": "400", "schemes": "Bearer", "scope": "https://mail.google.com/"}
    assert sent(result)[-1] == "AQ=="  # RFC 7628 §3.2.3
    assert "< -ERR [AUTH] Invalid credentials." in result.stderr


@pytest.mark.skipif(not have_mpop(), reason="mpop is not installed")
@pytest.mark.parametrize("auth", ["xoauth2", "oauthbearer"])
def test_mpop_oauth_against_gmail(gmail: int, tmp_path: Path, auth: str) -> None:
    done, messages = mpop_fetch("127.0.0.1", gmail, USER, GOOD, tmp_path / "ok", auth=auth)
    assert done.returncode == 0, done.stderr
    assert len(messages) == 1 and SUBJECT.encode() in messages[0]
    done, _ = mpop_fetch("127.0.0.1", gmail, USER, BAD, tmp_path / "bad", auth=auth)
    assert done.returncode != 0 and "Invalid credentials" in done.stderr


# ----------------------------------------------------------------- Outlook


def test_outlook_capa_before_and_after_stls(outlook: tuple[int, str]) -> None:
    port, cafile = outlook
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        assert "Microsoft Exchange" in client.getwelcome().decode()
        before = client.capa()
        assert "SASL" not in before and "STLS" in before
        with pytest.raises(poplib.error_proto, match="not valid in this state"):
            client._shortcmd("AUTH XOAUTH2")
        client.stls(ssl.create_default_context(cafile=cafile))
        after = client.capa()
        assert after["SASL"] == ["PLAIN", "XOAUTH2"] and "STLS" not in after
    finally:
        client.close()


def test_curl_xoauth2_against_outlook(outlook: tuple[int, str]) -> None:
    port, cafile = outlook
    tls = ["--ssl-reqd", "--cacert", cafile]
    ok = curl(port, GOOD, *tls)
    assert ok.returncode == 0, ok.stderr
    assert f"Subject: {SUBJECT}" in ok.stdout
    assert "AUTH XOAUTH2" in sent(ok)  # two steps: the token follows the '+'
    one_line = curl(port, GOOD, "--sasl-ir", *tls)
    assert one_line.returncode != 0
    assert "< -ERR Protocol error. Connection is closed. 10" in one_line.stderr
    refused = curl(port, BAD, *tls)
    assert refused.returncode == 67
    assert "< -ERR Authentication failure: unknown user name or bad password." in refused.stderr
    assert "< + ey" not in refused.stderr  # no JSON at Microsoft


# ----------------------------------------------------------------- record, show, replay


def record_curl(port: int, out: Path, *extra: str) -> Path:
    path, result = record(("127.0.0.1", port), out, lambda h, p: curl(p, GOOD, *extra))
    assert result.returncode == 0, result.stderr
    return path


def test_recorded_oauth_holds_no_token_and_replays_with_token_command(
    gmail: int, tmp_path: Path
) -> None:
    one = record_curl(gmail, tmp_path / "captures", "--sasl-ir")
    two = record_curl(gmail, tmp_path / "captures")
    outputs: dict[str, bytes | str] = {"capture-1": one.read_bytes(), "capture-2": two.read_bytes()}
    ex = tmp_path / "exports"
    for name, argv in {
        "show": ["show", str(one), str(two)],
        "show-json": ["show", "--json", str(one)],
        "export": [
            "export",
            str(one),
            "--text",
            str(ex / "t.txt"),
            "--html",
            str(ex / "t.html"),
            "--pcap",
            str(ex / "t.pcap"),
            "--streams",
            str(ex / "streams"),
        ],
    }.items():
        result = popproxy(*argv)
        assert result.returncode == 0, result.stderr
        outputs[name] = result.stdout
    for f in ex.rglob("*"):
        if f.is_file():
            outputs[f.name] = f.read_bytes()
    assert {"t.txt", "t.html", "t.pcap", "client.bin"} <= set(outputs)
    assert_no_leak(outputs, [GOOD.encode()])
    assert f"identity {USER} (OAUTHBEARER, host=127.0.0.1" in str(outputs["show"])

    counter = tmp_path / "runs"
    command = f"echo run >> {counter}; printf '%s\\n' {GOOD}"
    ok = popproxy(
        "replay", str(one), str(two), "--server", f"127.0.0.1:{gmail}", "--token-command", command
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert counter.read_text().count("run") == 1  # once per replay, for every capture
    assert_no_leak({"replay": ok.stdout + ok.stderr}, [GOOD.encode()])
    refused = popproxy(
        "replay", str(one), "--server", f"127.0.0.1:{gmail}", "--token-command", f"printf {BAD}"
    )
    assert refused.returncode == 2 and "login refused" in refused.stderr
    failing = popproxy(
        "replay",
        str(one),
        "--server",
        f"127.0.0.1:{gmail}",
        "--token-command",
        "echo nope >&2; exit 3",
    )
    assert failing.returncode == 2 and "status 3: nope" in failing.stderr
    missing = popproxy(
        "replay", str(one), "--server", f"127.0.0.1:{gmail}", env={"POPPROXY_TOKEN": ""}
    )
    assert missing.returncode == 2 and "bearer token" in missing.stderr
    from_env = popproxy(
        "replay", str(one), "--server", f"127.0.0.1:{gmail}", env={"POPPROXY_TOKEN": GOOD}
    )
    assert from_env.returncode == 0, from_env.stdout + from_env.stderr


def refusing_server(mechanism: str) -> ScriptedServer:
    """Refuses every token with RFC 7628 §3.2.2's JSON challenge, then -ERR."""
    state = {"step": 0}
    error = base64.b64encode(b'{"status":"invalid_token"}')

    def answer(line: bytes) -> bytes | None:
        text = line.rstrip(b"\r\n")
        if text.upper() == b"CAPA":
            return b"+OK\r\nSASL " + mechanism.encode() + b"\r\n.\r\n"
        if text.upper().startswith(b"AUTH"):
            one_line = len(text.split()) > 2
            state["step"] = 2 if one_line else 1
            return b"+ " + error + b"\r\n" if one_line else b"+ \r\n"
        if state["step"] == 1:
            state["step"] = 2
            return b"+ " + error + b"\r\n"
        if state["step"] == 2:
            state["step"] = 0
            return b"-ERR [AUTH] refused\r\n"
        return b"+OK\r\n" if text.upper() != b"QUIT" else None

    return ScriptedServer(answer=answer)


@pytest.mark.skipif(not have_mpop(), reason="mpop is not installed")
@pytest.mark.parametrize(("auth", "ack"), [("xoauth2", b""), ("oauthbearer", b"AQ==")])
async def test_replay_answers_the_error_continuation_as_the_mechanism_requires(
    gmail: int, tmp_path: Path, auth: str, ack: bytes
) -> None:
    work = tmp_path / "mpop"
    path, (done, _) = await trio.to_thread.run_sync(
        lambda: record(
            ("127.0.0.1", gmail),
            tmp_path / "captures",
            lambda h, p: mpop_fetch(h, p, USER, GOOD, work, auth=auth),
        )
    )
    assert done.returncode == 0, done.stderr
    server = refusing_server(auth.upper())
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        result: Any = await trio.run_process(
            [
                sys.executable,
                "-m",
                "popproxy",
                "replay",
                str(path),
                "--server",
                f"127.0.0.1:{port}",
                "--token",
                GOOD,
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        nursery.cancel_scope.cancel()
    assert result.returncode == 2 and b"login refused" in result.stderr
    received = bytes(server.connections[0].received)
    lines = received.split(b"\r\n")
    auth_at = next(i for i, line in enumerate(lines) if line.startswith(b"AUTH "))
    token_line = lines[auth_at] if len(lines[auth_at].split()) > 2 else lines[auth_at + 1]
    ack_line = lines[lines.index(token_line) + 1]
    assert ack_line == ack
    decoded = base64.b64decode(token_line.split()[-1])
    assert GOOD.encode() in decoded
    request = sasl.parse_xoauth2(decoded) if auth == "xoauth2" else sasl.parse_oauthbearer(decoded)
    assert request is not None and request.user == USER


@pytest.mark.parametrize("ir", [True, False], ids=["one-line", "two-step"])
async def test_curl_answers_a_scripted_refusal_with_aq(ir: bool) -> None:
    """A server that follows RFC 7628 §3.2.2 to the letter, scripted: curl's acknowledgement."""
    server = refusing_server("OAUTHBEARER")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve)
        result = await trio.to_thread.run_sync(
            lambda: curl(port, BAD, *(["--sasl-ir"] if ir else []))
        )
        nursery.cancel_scope.cancel()
    assert result.returncode == 67, result.stderr
    lines = bytes(server.connections[0].received).split(b"\r\n")
    auth = next(i for i, line in enumerate(lines) if line.startswith(b"AUTH "))
    assert (len(lines[auth].split()) == 3) is ir
    token_at = auth if ir else auth + 1
    assert BAD.encode() in base64.b64decode(lines[token_at].split()[-1])
    assert lines[token_at + 1] == b"AQ=="  # RFC 7628 §3.2.3
