"""Fault rules in every relay mode (STLS intercept, strip, --hide-plus), with real clients."""

from __future__ import annotations

import poplib
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from popproxy.capture.reader import CaptureReader
from popproxy.faults import FaultSet, parse_rule
from popproxy.proxy.config import StlsMode
from tests.support import clients
from tests.support.dovecot import STANDARD_MESSAGES, DovecotServer
from tests.test_tls_e2e import CLIENT_TIMEOUT, HOST, make_config, running, wait_captures

pytestmark = pytest.mark.dovecot
ALICE = "alice"


def _faults(*rules: str) -> FaultSet:
    return FaultSet([parse_rule(r) for r in rules], seed=3)


def _events(path: Path) -> list[dict[str, Any]]:
    with CaptureReader(path) as reader:
        return [r.fields for r in reader.records() if r.kind == "event"]


def _retr_over_stls(port: int, cafile: str, user: str, pw: str) -> bytes:
    c = poplib.POP3(HOST, port, timeout=CLIENT_TIMEOUT)
    try:
        c.stls(ssl.create_default_context(cafile=cafile))
        c.user(user)
        c.pass_(pw)
        try:
            c.retr(1)
        except poplib.error_proto as exc:
            return bytes(exc.args[0])
        return b"no error"
    finally:
        c.close()


async def test_a_fault_acts_inside_an_intercepted_tls_session(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    config = make_config(tmp_path, dovecot, faults=_faults("RETR 1: -ERR [SYS/TEMP] busy"))
    ca = str(config.certificate_authority().cert_path)
    async with running(config) as port:
        said = await trio.to_thread.run_sync(_retr_over_stls, port, ca, ALICE, dovecot.users[ALICE])
        [path] = await wait_captures(config, 1)
    assert said == b"-ERR [SYS/TEMP] busy"
    kinds = [e["kind"] for e in _events(path)]
    assert "fault" in kinds


async def test_faults_apply_in_strip_mode(dovecot: DovecotServer, tmp_path: Path) -> None:
    config = make_config(
        tmp_path, dovecot, stls=StlsMode.STRIP, faults=_faults("RETR 2: cut after 300")
    )
    pw = dovecot.users[ALICE]
    async with running(config) as port:
        first = await trio.to_thread.run_sync(
            lambda: clients.curl_fetch(HOST, port, ALICE, pw, msg=1, timeout=CLIENT_TIMEOUT)
        )

        def cut() -> bytes:
            c = poplib.POP3(HOST, port, timeout=CLIENT_TIMEOUT)
            assert "STLS" not in c.capa()  # strip mode hides it, faults or not
            c.user(ALICE)
            c.pass_(pw)
            try:
                c.retr(2)
            except (poplib.error_proto, OSError, EOFError) as exc:
                return repr(exc).encode()
            finally:
                c.close()
            return b"no error"

        said = await trio.to_thread.run_sync(cut)
        paths = await wait_captures(config, 2)
    assert first == STANDARD_MESSAGES[0]  # not faulted: byte for byte
    assert said != b"no error"
    kinds = [e["kind"] for p in paths for e in _events(p)]
    assert "strip" in kinds and "fault-cut" in kinds


async def test_faults_apply_with_hide_plus(dovecot: DovecotServer, tmp_path: Path) -> None:
    config = make_config(tmp_path, dovecot, hide_plus=True, faults=_faults("CAPA: delay 300ms"))
    async with running(config) as port:

        def timed_capa() -> tuple[float, dict[str, Any]]:
            c = poplib.POP3(HOST, port, timeout=CLIENT_TIMEOUT)
            try:
                t0 = time.monotonic()
                capa = c.capa()
                took = time.monotonic() - t0
                c.quit()
            finally:
                c.close()
            return took, capa

        took, capa = await trio.to_thread.run_sync(timed_capa)
        [path] = await wait_captures(config, 1)
    assert took >= 0.3
    assert "UIDL" in capa
    assert any(e["kind"] == "fault" for e in _events(path))


async def test_a_command_behind_an_undecided_auth_is_answered(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    config = make_config(tmp_path, dovecot, faults=_faults("NOOP: -ERR [SYS/TEMP] not now"))

    def pipelined(port: int) -> bytes:
        with socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT) as sock:
            f = sock.makefile("rb")
            f.readline()  # the greeting
            sock.sendall(b"AUTH NO-SUCH-MECHANISM\r\nNOOP\r\nQUIT\r\n")
            return f.readline() + f.readline() + f.readline()

    async with running(config) as port:
        got = await trio.to_thread.run_sync(pipelined, port)
        [path] = await wait_captures(config, 1)
    lines = got.splitlines()
    assert lines[0].startswith(b"-ERR")  # Dovecot refuses the mechanism: NOOP is a command
    assert lines[1] == b"-ERR [SYS/TEMP] not now"
    assert lines[2].startswith(b"+OK")  # QUIT reached Dovecot after popproxy's answer
    with CaptureReader(path) as reader:
        drops = [r.fields for r in reader.records() if r.kind == "drop"]
    assert [d["len"] for d in drops] == [len(b"NOOP\r\n")]


async def test_record_advertises_a_mechanism_and_refuses_it(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    config = make_config(tmp_path, dovecot, faults=_faults("CAPA: advertise XOAUTH2"))

    def session(port: int) -> tuple[dict[str, Any], bytes]:
        c = poplib.POP3(HOST, port, timeout=CLIENT_TIMEOUT)
        try:
            capa = c.capa()
            try:
                said = c._shortcmd("AUTH XOAUTH2")
            except poplib.error_proto as exc:
                said = bytes(exc.args[0])
            c.quit()
        finally:
            c.close()
        return capa, said

    async with running(config) as port:
        capa, said = await trio.to_thread.run_sync(session, port)
        [path] = await wait_captures(config, 1)
    assert "XOAUTH2" in capa["SASL"]
    assert said == b"-ERR Unsupported authentication mechanism."
    with CaptureReader(path) as reader:
        records = list(reader.records())
    own = b"".join(r.data or b"" for r in records if r.kind == "d" and r.fields.get("p"))
    assert b"XOAUTH2" in own and said in own  # popproxy's bytes, never the server's


async def test_throttle_paces_a_reply_and_keeps_its_bytes(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    config = make_config(tmp_path, dovecot, faults=_faults("RETR 3: throttle 16KiB/s"))
    pw = dovecot.users[ALICE]
    async with running(config) as port:
        t0 = time.monotonic()
        got = await trio.to_thread.run_sync(
            lambda: clients.curl_fetch(HOST, port, ALICE, pw, msg=3, timeout=CLIENT_TIMEOUT)
        )
        took = time.monotonic() - t0
        [path] = await wait_captures(config, 1)
    assert got == STANDARD_MESSAGES[2]  # 4,952 octets, every one of them
    assert took >= 4952 / 16384 * 0.8  # paced by the controller's ticks
    assert any(e["kind"] == "fault" for e in _events(path))


async def test_undone_dot_stuffing_ends_the_message_early_for_poplib(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    config = make_config(tmp_path, dovecot, faults=_faults("RETR 2: corrupt unstuffed"))
    pw = dovecot.users[ALICE]

    def retr() -> list[bytes]:
        c = poplib.POP3(HOST, port, timeout=CLIENT_TIMEOUT)
        try:
            c.user(ALICE)
            c.pass_(pw)
            return list(c.retr(2)[1])
        finally:
            c.close()

    async with running(config) as port:
        lines = await trio.to_thread.run_sync(retr)
        [path] = await wait_captures(config, 1)
    expected = STANDARD_MESSAGES[1].split(b"\r\n")
    # The body's "." line (sent as "..") now reads as the terminator: the message ends there.
    assert lines == expected[: expected.index(b".")]
    with CaptureReader(path) as reader:
        drops = [r.fields for r in reader.records() if r.kind == "drop"]
    assert drops and all("dot-stuffing undone" in d["why"] for d in drops)


async def test_record_matches_by_nth_occurrence_state_and_user(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    rules = (
        "RETR: -ERR [SYS/TEMP] second fetch fails nth=2",
        "STAT: -ERR not before login state=AUTHORIZATION",
        "UIDL: -ERR [IN-USE] alice is busy user=ali*",
        "NOOP: -ERR never for bob user=bob",
    )
    config = make_config(tmp_path, dovecot, faults=_faults(*rules))
    pw = dovecot.users[ALICE]

    def session(port: int) -> list[bytes]:
        said: list[bytes] = []
        c = poplib.POP3(HOST, port, timeout=CLIENT_TIMEOUT)
        try:
            for call in (
                c.stat,
                lambda: c.user(ALICE),
                lambda: c.pass_(pw),
                c.stat,
                lambda: c.retr(1)[0],
                lambda: c.retr(1)[0],
                lambda: c.retr(1)[0],
                c.uidl,
                c.noop,
            ):
                try:
                    result = call()
                    said.append(result if isinstance(result, bytes) else repr(result).encode())
                except poplib.error_proto as exc:
                    said.append(bytes(exc.args[0]))
            c.quit()
        finally:
            c.close()
        return said

    async with running(config) as port:
        said = await trio.to_thread.run_sync(session, port)
        await wait_captures(config, 1)
    assert said[0] == b"-ERR not before login"  # AUTHORIZATION: the rule's
    assert said[3].startswith(b"(4, ")  # TRANSACTION: Dovecot's STAT
    assert said[4].startswith(b"+OK") and said[6].startswith(b"+OK")
    assert said[5] == b"-ERR [SYS/TEMP] second fetch fails"  # only the second RETR
    assert said[7] == b"-ERR [IN-USE] alice is busy"  # user=ali* matched alice
    assert said[8].startswith(b"+OK")  # user=bob did not
