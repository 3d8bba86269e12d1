"""Replaying a capture that upgraded with STLS: --ca and --insecure count, --stls never
sends a second STLS (RFC 2595 §4: one upgrade per connection)."""

from __future__ import annotations

from pathlib import Path

import pytest

from popproxy.capture import format as fmt
from popproxy.cli.main import main
from popproxy.core import Direction
from tests.support.dovecot import USERS, DovecotServer

pytestmark = pytest.mark.dovecot
PW = USERS["alice"]


def stls_capture(path: Path) -> Path:
    """Greeting, STLS, TLS on both legs, then USER/PASS (redacted), NOOP and QUIT."""
    offsets = {"c": 0, "s": 0}
    pieces = [fmt.encode_meta({"r": fmt.HEADER, "v": fmt.VERSION, "client": "test"})]
    t = 0.0

    def data(direction: str, payload: bytes) -> None:
        nonlocal t
        t += 0.01
        pieces.extend(fmt.encode_data(Direction(direction), t, payload))
        offsets[direction] += len(payload)

    data("s", b"+OK Dovecot (Debian) ready.\r\n")
    data("c", b"STLS\r\n")
    data("s", b"+OK Begin TLS negotiation now.\r\n")
    for d, leg in (("c", "client"), ("s", "upstream")):
        pieces.append(
            fmt.encode_meta(
                {"r": fmt.TLS, "d": d, "t": t, "off": offsets[d], "leg": leg, "mode": "stls"}
            )
        )
    data("c", b"USER alice\r\n")
    data("s", b"+OK\r\n")
    data("c", b"PASS " + b"#" * len(PW) + b"\r\n")
    data("s", b"+OK Logged in.\r\n")
    data("c", b"NOOP\r\n")
    data("s", b"+OK\r\n")
    data("c", b"QUIT\r\n")
    data("s", b"+OK Logging out.\r\n")
    path.write_bytes(b"".join(pieces))
    return path


@pytest.fixture
def capture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("POPPROXY_PASSWORD", PW)
    return stls_capture(tmp_path / f"stls{fmt.SUFFIX}")


def test_recorded_stls_uses_the_ca_given(
    dovecot: DovecotServer, capture: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = f"{dovecot.host}:{dovecot.port}"
    assert main(["replay", str(capture), "--server", server, "--ca", dovecot.cafile]) == 0
    assert "equivalent" in capsys.readouterr().out


def test_recorded_stls_without_the_ca_names_the_flag(
    dovecot: DovecotServer, capture: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = f"{dovecot.host}:{dovecot.port}"
    assert main(["replay", str(capture), "--server", server]) == 2
    err = capsys.readouterr().err
    assert "certificate verification failed" in err and "--ca FILE" in err


def test_insecure_counts_for_a_recorded_stls(
    dovecot: DovecotServer, capture: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = f"{dovecot.host}:{dovecot.port}"
    assert main(["replay", str(capture), "--server", server, "--insecure"]) == 0


def test_stls_flag_does_not_send_the_recorded_stls_again(
    dovecot: DovecotServer, capture: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = f"{dovecot.host}:{dovecot.port}"
    code = main(["replay", str(capture), "--server", server, "--stls", "--ca", dovecot.cafile])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "TLS is already active" not in out
    assert "recorded STLS" in out and "was not sent" in out
