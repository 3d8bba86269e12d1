"""Credentials stay masked: every login mechanism, any blanks, lost sync, server echoes."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from popproxy.capture.writer import CaptureWriter
from popproxy.core import Command, Direction, Observer, Secret, SecretKind
from popproxy.core.credentials import credential_span, echo_forms, split_command
from popproxy.proxy.tap import LIVE_LISTINGS, Tap
from popproxy.views.live import LineRenderer
from popproxy.views.theme import THEME
from tests.support.leaks import (
    LOGINS,
    PASSWORD,
    Login,
    assert_no_leak,
    base64_cores,
    find_leaks,
    session_steps,
)

C, S = Direction.CLIENT, Direction.SERVER


def run_tap(steps: list[tuple[str, bytes]], *, max_pending: int | None = None) -> tuple[bytes, str]:
    """Feed a session through the proxy's tap: (capture file bytes, live view output)."""
    out = io.StringIO()
    console = Console(file=out, theme=THEME, force_terminal=True, width=200)
    renderer = LineRenderer("verbose")

    def view(items: list[object]) -> None:
        for item in items:
            line = renderer.render("item", 1, item)
            if line is not None:
                console.print(line)

    writer = CaptureWriter({"start": "2024-01-01T00:00:00Z"})
    tap = Tap(writer, view, body_items=4096)  # type: ignore[arg-type]
    if max_pending is not None:
        tap.observer = Observer(max_pending=max_pending, listings=LIVE_LISTINGS)
    t = 0.0
    for d, data in steps:
        t += 0.001
        tap.data(Direction(d), t, data)
    tap.data(C, t, b"")
    tap.data(S, t, b"")
    writer.flush_all()
    return b"".join(writer.take()), out.getvalue()


def test_leak_helper_can_fail() -> None:
    """The helper finds each form it claims to look for (so a passing check means something)."""
    for skew, core in enumerate(base64_cores(PASSWORD)):
        assert len(core) >= 16
        assert find_leaks({"x": b"..." + core + b"..."}, [PASSWORD]), skew
    assert find_leaks({"x": PASSWORD.upper()}, [PASSWORD])


@pytest.mark.parametrize("login", LOGINS, ids=lambda x: x.name)
def test_capture_and_live_view_mask_every_mechanism(login: Login) -> None:
    capture, live = run_tap(session_steps(login))
    assert_no_leak({"capture": capture, "live view": live}, login.secrets)
    assert b'"r":"redact"' in capture


@pytest.mark.parametrize("login", LOGINS, ids=lambda x: x.name)
def test_redaction_survives_pipeline_overflow(login: Login) -> None:
    """After the pending-command limit the observer loses sync; credentials are still found."""
    capture, live = run_tap(session_steps(login, pipelined=10), max_pending=4)
    assert "pipeline-overflow" in live
    assert_no_leak({"capture": capture, "live view": live}, login.secrets)


def test_redaction_survives_100000_outstanding_commands() -> None:
    login = LOGINS[0]
    capture, live = run_tap(session_steps(login, pipelined=100_001))
    assert "pipeline-overflow" in live
    assert_no_leak({"capture": capture, "live view": live}, login.secrets)


@pytest.mark.parametrize(
    ("line", "verb", "secret"),
    [
        (b"PASS pw12", "PASS", b"pw12"),
        (b"PASS\tpw12", "PASS", b"pw12"),
        (b"pass \t pw12", "PASS", b"\t pw12"),
        (b"  Pass  pw 12 ", "PASS", b" pw 12 "),
        (b"RPOP\tpw12", "RPOP", b"pw12"),
        (
            b"APOP\tbob\tc4c9334bac560ecc979e58001b3e22fb",
            "APOP",
            b"c4c9334bac560ecc979e58001b3e22fb",
        ),
        (b"APOP bob  digest  ", "APOP", b"digest"),
        (b"AUTH\tPLAIN\tAGJvYgBwdw==", "AUTH", b"AGJvYgBwdw=="),
        (b"auth plain  AGJvYgBwdw==", "AUTH", b" AGJvYgBwdw=="),
    ],
)
def test_credential_commands_with_any_blanks_and_case(
    line: bytes, verb: str, secret: bytes
) -> None:
    cmd = split_command(line)
    assert cmd.verb == verb
    span = credential_span(cmd, line)
    assert span is not None
    assert line[span[0] : span[1]] == secret
    obs = Observer()
    obs.receive_data(S, b"+OK ready\r\n")
    events = obs.receive_data(C, line + b"\r\n")
    (command,) = [e for e in events if isinstance(e, Command)]
    assert command.verb == verb
    assert secret.strip(b" \t") not in (command.args or "").encode()
    assert [e.length for e in events if isinstance(e, Secret)] == [len(secret)]


def test_no_span_for_a_plain_user_or_an_empty_auth_response() -> None:
    for line in (b"USER bob", b"AUTH PLAIN", b"AUTH PLAIN =", b"PASS", b"PASS \t "):
        assert credential_span(split_command(line), line) is None, line


def test_echo_forms_cover_every_alignment() -> None:
    forms = [f for f, _ in echo_forms(PASSWORD)]
    assert PASSWORD.lower() in forms
    for core in base64_cores(PASSWORD):
        assert any(core in f or f in core for f in forms)


def test_echoed_secret_is_masked_in_the_server_reply() -> None:
    obs = Observer()
    obs.receive_data(S, b"+OK ready\r\n")
    obs.receive_data(C, b"AUTH LOGIN\r\n")
    obs.receive_data(S, b"+ VXNlcm5hbWU6\r\n")
    obs.receive_data(C, b"Ym9i\r\n")  # bob
    obs.receive_data(S, b"+ UGFzc3dvcmQ6\r\n")
    obs.receive_data(C, b"c2VjcmV0LXB3\r\n")  # secret-pw
    events = obs.receive_data(S, b"-ERR no such user bob with password SECRET-PW\r\n")
    echoes = [e for e in events if isinstance(e, Secret) and e.kind is SecretKind.ECHO]
    assert [e.length for e in echoes] == [len(b"secret-pw")]
