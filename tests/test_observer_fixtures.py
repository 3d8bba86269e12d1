"""The observer on real transcripts: poplib and curl sessions recorded against Dovecot."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import pytest

from popproxy.core import (
    AuthIdentity,
    BodyChunk,
    Command,
    Direction,
    Event,
    Observer,
    Reply,
    SaslResponse,
)
from tests.test_observer import (
    anomaly_kinds,
    assert_contiguous,
    canonical,
    covered,
    of,
    random_splitter,
    rebuild,
)

C = Direction.CLIENT
S = Direction.SERVER
FIXTURES = Path(__file__).parent / "fixtures"

# name -> (verbs in order, statuses in order, SASL mechanism whose identity must be decoded)
EXPECTED: dict[str, tuple[list[str], list[str] | None, str | None]] = {
    "poplib_userpass": (
        [
            "CAPA",
            "USER",
            "PASS",
            "STAT",
            "LIST",
            "UIDL",
            "TOP",
            "RETR",
            "RETR",
            "RETR",
            "RETR",
            "QUIT",
        ],
        None,
        None,
    ),
    "poplib_apop": (["CAPA", "APOP", "STAT", "LIST", "UIDL", "TOP", "QUIT"], None, None),
    "curl_plain": (["CAPA", "AUTH", "LIST", "RETR", "QUIT"], None, "PLAIN"),
    "curl_login": (["CAPA", "AUTH", "LIST", "RETR", "QUIT"], None, "LOGIN"),
    "curl_cram_md5": (["CAPA", "AUTH", "LIST", "RETR", "QUIT"], None, "CRAM-MD5"),
    "pipelined": (["USER", "PASS", "STAT", "LIST", "UIDL", "RETR", "NOOP", "QUIT"], None, None),
    "auth_cancel": (["AUTH", "USER", "PASS", "QUIT"], ["-ERR", "+OK", "+OK", "+OK"], None),
}


def load(name: str) -> dict[str, Any]:
    path = FIXTURES / f"{name}.json"
    if not path.exists():
        pytest.skip(f"{path.name} not recorded yet (made from real Dovecot sessions)")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def chunks(fixture: dict[str, Any]) -> list[tuple[Direction, bytes]]:
    return [(C if c["dir"] == "c" else S, base64.b64decode(c["b64"])) for c in fixture["chunks"]]


def run(steps: list[tuple[Direction, bytes]], rng: random.Random | None = None) -> list[Event]:
    obs = Observer()
    split = random_splitter(rng, 20) if rng is not None else None
    events: list[Event] = []
    for direction, data in steps:
        for piece in split(data) if split is not None else [data]:
            events += obs.receive_data(direction, piece)
    return events


def poplib_body(server: bytes, start: int) -> bytes:
    """A multi-line body the way ``poplib._getlongresp`` reads it, lines rejoined with CRLF."""
    lines: list[bytes] = []
    pos = start
    while True:
        nl = server.index(b"\n", pos)
        line, pos = server[pos : nl + 1], nl + 1
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if line == b".":
            return b"".join(x + b"\r\n" for x in lines)
        lines.append(line[1:] if line.startswith(b"..") else line)


def b64_cores(secret: bytes) -> list[bytes]:
    """The base64 characters determined by ``secret`` alone, at each of the 3 alignments."""
    cores = []
    for k in range(3):
        enc = base64.b64encode(b"\x00" * k + secret)
        first = -(-8 * k // 6)
        last = (8 * (k + len(secret))) // 6
        if last > first:
            cores.append(enc[first:last])
    return cores


def occurrences(stream: bytes, needle: bytes) -> list[int]:
    out, at = [], stream.find(needle)
    while at >= 0:
        out.append(at)
        at = stream.find(needle, at + 1)
    return out


NAMES = sorted(EXPECTED)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_exchanges(name: str) -> None:
    fixture = load(name)
    steps = chunks(fixture)
    events = run(steps)
    streams = {
        C: b"".join(d for x, d in steps if x is C),
        S: b"".join(d for x, d in steps if x is S),
    }
    assert rebuild(events) == streams
    assert_contiguous(events)
    want_verbs, want_status, mechanism = EXPECTED[name]
    assert [c.verb for c in of(events, Command)] == want_verbs
    statuses = [r.status for r in of(events, Reply)]
    assert statuses == (want_status or ["+OK"] * len(want_verbs))
    assert [r.seq for r in of(events, Reply)] == [c.seq for c in of(events, Command)]
    assert anomaly_kinds(events) == []
    for reply in of(events, Reply):
        if reply.verb in ("RETR", "TOP"):
            body = b"".join(b.data for b in of(events, BodyChunk) if b.seq == reply.seq)
            assert body == poplib_body(streams[S], reply.offset + len(reply.raw))
    if mechanism is not None:
        assert of(events, AuthIdentity) == [AuthIdentity(2, mechanism, fixture["user"])]
    if name == "auth_cancel":
        assert [r.cancel for r in of(events, SaslResponse)] == [True]


@pytest.mark.parametrize("name", NAMES)
def test_fixture_password_is_redacted(name: str) -> None:
    fixture = load(name)
    steps = chunks(fixture)
    events = run(steps)
    password = fixture["password"].encode()
    client = b"".join(d for x, d in steps if x is C)
    secret = covered(events, C)
    for at in occurrences(client, password):
        assert set(range(at, at + len(password))) <= secret, at
    found = 0
    for core in b64_cores(password):
        for at in occurrences(client, core):
            found += 1
            assert set(range(at, at + len(core))) <= secret, (core, at)
    if name in ("curl_plain", "curl_login"):
        assert found, "the password's base64 should appear in the SASL exchange"
    for event in events:
        for field in ("args", "text", "verb"):
            value = getattr(event, field, None)
            assert not (isinstance(value, str) and fixture["password"] in value), event
    server = b"".join(d for x, d in steps if x is S)
    assert password not in server


@pytest.mark.parametrize("name", NAMES)
def test_fixture_segmentation_independent(name: str) -> None:
    steps = chunks(load(name))
    ref = canonical(run(steps))
    for seed in range(3):
        got = run(steps, random.Random(seed))
        assert canonical(got) == ref


def test_fixture_names_known() -> None:
    """Every recorded transcript has expectations here."""
    present = {p.stem for p in FIXTURES.glob("*.json")}
    assert present <= set(EXPECTED), sorted(present - set(EXPECTED))
