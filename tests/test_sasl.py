"""XOAUTH2, OAUTHBEARER and SCRAM: decoded, redacted, shown and linted (core/sasl.py)."""

from __future__ import annotations

import base64
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.capture import format as fmt
from popproxy.core import Direction, Observer, sasl
from popproxy.core.events import Anomaly, AuthIdentity, Event, Secret
from popproxy.core.transcript import TranscriptBuilder
from tests.test_inspect_cli import QUIT, make_capture, run_json, script

C, S = Direction.CLIENT, Direction.SERVER
TOKEN = b"ya29.a0AfB_byC-SECRET-TOKEN-0123456789"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


XOAUTH2 = b64(b"user=someone@example.com\x01auth=Bearer " + TOKEN + b"\x01\x01")
OAUTHBEARER = b64(
    b"n,a=someone@example.com,\x01host=pop.example.com\x01port=995\x01auth=Bearer "
    + TOKEN
    + b"\x01\x01"
)
GMAIL_ERROR = b64(b'{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}')
SCRAM_FIRST = b64(b"n,,n=al=2Cice,r=fyko+d2lbbFgONRv9qkxdawL")
SCRAM_SERVER_FIRST = b64(b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096")
PROOF = b"v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
SCRAM_FINAL = b64(b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=" + PROOF)
SIGNATURE = b"rmF9pqV8S7suAoZWja4dJRkFsKQ="
SCRAM_SERVER_FINAL = b64(b"v=" + SIGNATURE)


def feed(script_: list[tuple[Direction, bytes]]) -> list[Event]:
    obs = Observer()
    out: list[Event] = []
    for d, data in script_:
        out += obs.receive_data(d, data)
    return out


def sasl_entries(events: list[Event]) -> list[dict[str, object]]:
    builder = TranscriptBuilder()
    return [item.detail for item in builder.feed(0.0, events) if item.what == "sasl"]


def masked(events: list[Event], direction: Direction, stream: bytes) -> bytes:
    out = bytearray(stream)
    for e in events:
        if isinstance(e, Secret) and e.direction is direction:
            out[e.offset : e.offset + e.length] = b"#" * e.length
    return bytes(out)


# ----------------------------------------------------------------- OAuth


def test_xoauth2_one_line_gmail_error() -> None:
    client = b"AUTH XOAUTH2 " + XOAUTH2 + b"\r\n" + b"\r\n"
    events = feed(
        [
            (S, b"+OK Gpop ready\r\n"),
            (C, b"AUTH XOAUTH2 " + XOAUTH2 + b"\r\n"),
            (S, b"+ " + GMAIL_ERROR + b"\r\n"),
            (C, b"\r\n"),
            (S, b"-ERR [AUTH] Invalid credentials.\r\n"),
        ]
    )
    ident = [e for e in events if isinstance(e, AuthIdentity)]
    assert [(i.mechanism, i.identity) for i in ident] == [("XOAUTH2", "someone@example.com")]
    assert XOAUTH2 not in masked(events, C, client)
    server, client_ack = sasl_entries(events)
    assert "status=400" in str(server["decoded"]) and "empty line" in str(server["decoded"])
    assert client_ack["line"] == "" and "acknowledges" in str(client_ack["decoded"])


def test_oauthbearer_two_step_identity_and_ack_in_clear() -> None:
    client = b"AUTH OAUTHBEARER\r\n" + OAUTHBEARER + b"\r\nAQ==\r\n"
    events = feed(
        [
            (S, b"+OK ready\r\n"),
            (C, b"AUTH OAUTHBEARER\r\n"),
            (S, b"+ \r\n"),
            (C, OAUTHBEARER + b"\r\n"),
            (S, b"+ " + GMAIL_ERROR + b"\r\n"),
            (C, b"AQ==\r\n"),
            (S, b"-ERR no\r\n"),
        ]
    )
    (ident,) = [e for e in events if isinstance(e, AuthIdentity)]
    assert ident.identity == "someone@example.com"
    assert dict(ident.details) == {"host": "pop.example.com", "port": "995"}
    shown = masked(events, C, client)
    assert OAUTHBEARER not in shown and shown.endswith(b"AQ==\r\n")
    entries = sasl_entries(events)
    assert entries[1]["secret"] is True and "token" in str(entries[1]["decoded"])
    assert TOKEN.decode() not in json.dumps(entries)
    assert entries[3] == {
        "from": "client",
        "line": "AQ==",
        "cancel": False,
        "secret": False,
        "decoded": "AQ== (0x01: acknowledges the error)",
    }


def test_oauth_messages_round_trip() -> None:
    req = sasl.parse_xoauth2(sasl.xoauth2_message("u@x", "tok"))
    assert req is not None and (req.user, req.scheme, req.token) == ("u@x", "Bearer", b"tok")
    req = sasl.parse_oauthbearer(sasl.oauthbearer_message("a,b=c", "tok", "h", "995"))
    assert req is not None and (req.user, req.host, req.port) == ("a,b=c", "h", "995")
    assert sasl.oauth_error(b'{"status":"401"}') == {"status": "401"}
    assert sasl.oauth_error(b"[1]") is None and sasl.oauth_error(b"{bad") is None


# ----------------------------------------------------------------- SCRAM


def scram_session(mech: str = "SCRAM-SHA-1") -> tuple[list[Event], bytes, bytes]:
    steps = [
        (S, b"+OK Dovecot ready.\r\n"),
        (C, f"AUTH {mech} ".encode() + SCRAM_FIRST + b"\r\n"),
        (S, b"+ " + SCRAM_SERVER_FIRST + b"\r\n"),
        (C, SCRAM_FINAL + b"\r\n"),
        (S, b"+ " + SCRAM_SERVER_FINAL + b"\r\n"),
        (C, b"\r\n"),
        (S, b"+OK Logged in.\r\n"),
    ]
    client = b"".join(data for d, data in steps if d is C)
    server = b"".join(data for d, data in steps if d is S)
    return feed(steps), client, server


def test_scram_identity_structure_and_secrets() -> None:
    events, client, server = scram_session()
    (ident,) = [e for e in events if isinstance(e, AuthIdentity)]
    assert (ident.mechanism, ident.identity) == ("SCRAM-SHA-1", "al,ice")
    shown_c, shown_s = masked(events, C, client), masked(events, S, server)
    assert SCRAM_FIRST in shown_c  # RFC 5802 §5.1: no credential in client-first
    assert SCRAM_FINAL not in shown_c and SCRAM_SERVER_FINAL not in shown_s
    assert SCRAM_SERVER_FIRST in shown_s
    entries = sasl_entries(events)
    text = json.dumps(entries)
    assert PROOF.decode() not in text and SIGNATURE.decode() not in text
    assert SCRAM_FINAL.decode() not in text and SCRAM_SERVER_FINAL.decode() not in text
    first, final, verifier = (str(e.get("decoded")) for e in entries[:3])
    assert "salt=QSXCR+Q6sek8bf92 (12 octets)" in first and "iterations=4096" in first
    assert "proof present (secret)" in final
    assert verifier == "server-final: verifier v= present (secret)"
    assert not [e for e in events if isinstance(e, Anomaly)]


def test_scram_server_error_is_shown() -> None:
    msg = sasl.parse_scram(b"e=invalid-proof", from_client=False)
    assert msg is not None and sasl.describe_scram(msg) == "server-final: error invalid-proof"
    assert not sasl.server_data_is_secret("SCRAM-SHA-256", b"e=invalid-proof")


@pytest.mark.parametrize(
    ("mech", "first", "expect"),
    [
        ("SCRAM-SHA-256-PLUS", b"p=tls-exporter,,n=u,r=abc", "SCRAM-SHA-256-PLUS binds"),
        ("SCRAM-SHA-256", b"p=tls-unique,,n=u,r=abc", "channel binding tls-unique"),
    ],
)
def test_channel_binding_is_an_anomaly(mech: str, first: bytes, expect: str) -> None:
    events = feed(
        [
            (S, b"+OK ready\r\n"),
            (C, f"AUTH {mech}\r\n".encode()),
            (S, b"+ \r\n"),
            (C, b64(first) + b"\r\n"),
            (S, b"-ERR [AUTH] Authentication failed.\r\n"),
        ]
    )
    kinds = [(e.kind, e.detail) for e in events if isinstance(e, Anomaly)]
    assert kinds and kinds[0][0] == "channel-binding" and expect in kinds[0][1]
    entries = sasl_entries(events)
    assert "CHANNEL BINDING" in str(entries[1]["decoded"])


def test_scram_client_first_with_proof_stays_secret() -> None:
    odd = b64(b"n,,n=u,r=abc,p=xyz")
    assert sasl.client_data_is_secret("SCRAM-SHA-1", 0, odd)
    assert sasl.client_data_is_secret("SCRAM-SHA-1", 1, SCRAM_FIRST)
    assert sasl.client_data_is_secret("XOAUTH2", 1, b"AQ==")
    assert not sasl.client_data_is_secret("OAUTHBEARER", 1, b"AQ==")


# ----------------------------------------------------------------- capture, show, lint


def test_capture_and_show_hold_no_token_proof_or_verifier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    steps = script(
        (b"AUTH SCRAM-SHA-256 " + SCRAM_FIRST + b"\r\n", b"+ " + SCRAM_SERVER_FIRST + b"\r\n"),
        (SCRAM_FINAL + b"\r\n", b"+ " + SCRAM_SERVER_FINAL + b"\r\n"),
        (b"\r\n", b"+OK Logged in.\r\n"),
        QUIT,
    )
    path = make_capture(tmp_path / f"scram{fmt.SUFFIX}", steps)
    raw = path.read_bytes()
    for secret in (SCRAM_FINAL, SCRAM_SERVER_FINAL, PROOF, SIGNATURE):
        assert secret not in raw
    assert b'"identity":"al,ice"' in raw
    code, doc = run_json(["show", "--json", str(path)], capsys)
    assert code == 0
    text = json.dumps(doc)
    for secret in (SCRAM_FINAL, SCRAM_SERVER_FINAL, PROOF, SIGNATURE):
        assert secret.decode() not in text
    assert main_text(["show", str(path)], capsys).count("identity al,ice") == 1


def test_oauth_capture_keeps_identity_details(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    steps = script(
        (b"AUTH OAUTHBEARER\r\n", b"+ \r\n"),
        (OAUTHBEARER + b"\r\n", b"+OK Welcome.\r\n"),
        QUIT,
    )
    path = make_capture(tmp_path / f"ob{fmt.SUFFIX}", steps)
    raw = path.read_bytes()
    assert TOKEN not in raw and OAUTHBEARER not in raw
    out = " ".join(main_text(["show", str(path)], capsys).split())
    assert "identity someone@example.com (OAUTHBEARER, host=pop.example.com, port=995)" in out
    assert TOKEN.decode() not in out


def main_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from popproxy.cli.main import main

    capsys.readouterr()
    main(argv)
    return capsys.readouterr().out


def test_lint_auth_initial_response_too_long(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_token = b64(b"user=u@example.com\x01auth=Bearer " + b"t" * 300 + b"\x01\x01")
    steps = script((b"AUTH XOAUTH2 " + long_token + b"\r\n", b"+OK Welcome.\r\n"), QUIT)
    path = make_capture(tmp_path / f"ir{fmt.SUFFIX}", steps)
    code, doc = run_json(["lint", "--json", str(path)], capsys)
    rules = [f["rule"] for f in doc["captures"][0]["findings"]]
    assert rules == ["auth-initial-response-too-long"]
    assert doc["captures"][0]["findings"][0]["rfc"] == "RFC 5034 §4"
    assert code == 1
    short = script((b"AUTH XOAUTH2 " + XOAUTH2 + b"\r\n", b"+OK Welcome.\r\n"), QUIT)
    path = make_capture(tmp_path / f"short{fmt.SUFFIX}", short)
    code, doc = run_json(["lint", "--json", str(path)], capsys)
    assert doc["captures"][0]["findings"] == [] and code == 0


# ----------------------------------------------------------------- properties


MECHS = st.sampled_from(["XOAUTH2", "OAUTHBEARER", "SCRAM-SHA-1", "SCRAM-SHA-256-PLUS", "X"])


@settings(max_examples=300, deadline=None)
@given(MECHS, st.binary(max_size=120), st.integers(0, 3))
def test_decoders_never_raise(mech: str, data: bytes, step: int) -> None:
    for raw in (data, b64(data)):
        sasl.describe_server(mech, raw)
        sasl.describe_client(mech, step, raw)
        sasl.client_data_is_secret(mech, step, raw)
        sasl.server_data_is_secret(mech, raw)
        sasl.identity(mech, [raw])
        sasl.channel_binding(mech, raw)
        sasl.parse_scram(raw, from_client=bool(step % 2))
        sasl.server_entry(mech, b"+ " + raw, raw)
        sasl.client_entry(mech + " x", [], raw)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=60).filter(lambda b: b"\x01" not in b and b"," not in b))
def test_oauth_token_never_in_views(token: bytes) -> None:
    message = b64(b"n,a=u@x,\x01auth=Bearer " + token + b"\x01\x01")
    for mech, line in (
        ("OAUTHBEARER", message),
        ("XOAUTH2", b64(b"user=u\x01auth=Bearer " + token)),
    ):
        entry = sasl.client_entry(mech, [{"from": "server"}], line)
        assert entry["secret"] is True and entry["line"] == "#" * len(line)
        assert line.decode() not in json.dumps(entry)


def _events_by(chunks: list[tuple[Direction, bytes]]) -> list[Event]:
    obs = Observer()
    out: list[Event] = []
    for d, data in chunks:
        out += obs.receive_data(d, data)
    for d in (S, C):
        out += obs.receive_data(d, b"")
    return out


def _scram_script() -> list[tuple[Direction, bytes]]:
    return [
        (S, b"+OK Dovecot ready.\r\n"),
        (C, b"AUTH SCRAM-SHA-256 " + SCRAM_FIRST + b"\r\n"),
        (S, b"+ " + SCRAM_SERVER_FIRST + b"\r\n"),
        (C, SCRAM_FINAL + b"\r\n"),
        (S, b"+ " + SCRAM_SERVER_FINAL + b"\r\n"),
        (C, b"\r\n"),
        (S, b"+OK Logged in.\r\n"),
        (C, b"AUTH OAUTHBEARER\r\n"),
        (S, b"+ \r\n"),
        (C, OAUTHBEARER + b"\r\n"),
        (S, b"+ " + GMAIL_ERROR + b"\r\n"),
        (C, b"AQ==\r\n"),
        (S, b"-ERR no\r\n"),
    ]


def _canonical(events: list[Event]) -> list[object]:
    """Events with raw pieces joined per direction: the parts that must not depend on chunks."""
    return [e for e in events if not hasattr(e, "raw")] + [
        (type(e).__name__, getattr(e, "seq", None))
        for e in events
        if hasattr(e, "raw") and type(e).__name__ not in ("Opaque", "LineTail")
    ]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=60))
def test_sasl_decoding_does_not_depend_on_segmentation(cuts: list[int]) -> None:
    script = _scram_script()
    whole = _events_by(script)
    pieces: list[tuple[Direction, bytes]] = []
    sizes = itertools.cycle(cuts)
    for d, data in script:
        at = 0
        while at < len(data):
            n = next(sizes)
            pieces.append((d, data[at : at + n]))
            at += n
    assert _canonical(_events_by(pieces)) == _canonical(whole)
    secrets = sorted(
        (e.direction.value, e.offset, e.length) for e in whole if isinstance(e, Secret)
    )
    split = _events_by(pieces)
    assert (
        sorted((e.direction.value, e.offset, e.length) for e in split if isinstance(e, Secret))
        == secrets
    )
    ident = [e for e in split if isinstance(e, AuthIdentity)]
    assert [(i.mechanism, i.identity) for i in ident] == [
        ("SCRAM-SHA-256", "al,ice"),
        ("OAUTHBEARER", "someone@example.com"),
    ]
