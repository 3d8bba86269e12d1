"""DELE, RSET and QUIT (RFC 1939 §5, §6) in the fake mailbox, checked against Dovecot's answers."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from popproxy.replay.fake import ServeConfig
from popproxy.replay.sources import load_mailbox
from tests.support.dovecot import USERS, DovecotServer
from tests.test_mailbox_e2e import start

ALICE = "alice"
PW = USERS[ALICE]
MULTI = {
    "LIST",
    "UIDL",
    "RETR",
    "TOP",
    "CAPA",
}  # multi-line on +OK (with no argument for the first two)

#: Each row: sessions of commands, in order; "-" ends a session without QUIT (a dropped
#: connection: no UPDATE state).  Every session logs in first.
TABLE: dict[str, list[list[str]]] = {
    "dele-then-quit-removes": [
        ["DELE 1", "STAT", "LIST", "LIST 1", "RETR 1", "DELE 1", "UIDL", "QUIT"],
        ["STAT", "LIST", "UIDL", "UIDL 1", "QUIT"],
    ],
    "rset-unmarks": [
        ["DELE 2", "DELE 3", "STAT", "RSET", "STAT", "LIST", "QUIT"],
        ["STAT", "QUIT"],
    ],
    "no-quit-no-update": [["DELE 1", "DELE 4", "STAT", "-"], ["STAT", "UIDL", "QUIT"]],
    "dele-last-then-numbers-stay": [
        ["DELE 4", "LIST 4", "RETR 3", "TOP 3 2", "QUIT"],
        ["STAT", "LIST 4", "RETR 4", "UIDL", "QUIT"],
    ],
    "bad-arguments": [["DELE 0", "DELE 9", "DELE x", "RETR 5", "LIST 0", "NOOP", "RSET", "QUIT"]],
    "everything-deleted": [
        ["DELE 1", "DELE 2", "DELE 3", "DELE 4", "STAT", "LIST", "UIDL", "QUIT"],
        ["STAT", "LIST", "QUIT"],
    ],
}


class Client:
    """A raw POP3 client: one reply per command, multi-line bodies read to the dot."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.file.readline()

    def send(self, line: str) -> list[bytes]:
        self.sock.sendall(line.encode() + b"\r\n")
        reply = [self.file.readline()]
        verb, *args = line.split()
        multi = verb in MULTI and not (verb in ("LIST", "UIDL") and args)
        if reply[0].startswith(b"+OK") and multi:
            while reply[-1] not in (b".\r\n", b""):
                reply.append(self.file.readline())
        return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def normalise(command: str, reply: list[bytes]) -> list[bytes]:
    """What must agree: the status, and every value (free text after the values may differ)."""
    status = reply[0].split(b" ", 1)[0].rstrip(b"\r\n")
    verb = command.split()[0]
    if status != b"+OK":
        return [status]
    if verb == "STAT" or (verb in ("LIST", "UIDL") and len(command.split()) > 1):
        return [b" ".join(reply[0].split()[:3])]
    return [status, *reply[1:]]


def run(port: int, sessions: list[list[str]]) -> list[tuple[str, list[bytes]]]:
    out: list[tuple[str, list[bytes]]] = []
    for commands in sessions:
        client = Client(port)
        try:
            for line in (f"USER {ALICE}", f"PASS {PW}", *commands):
                if line == "-":
                    break
                out.append((line, normalise(line, client.send(line))))
        finally:
            client.close()
    return out


@pytest.mark.dovecot
@pytest.mark.parametrize("row", sorted(TABLE))
async def test_dele_rset_quit_agree_with_dovecot(
    dovecot_clean: DovecotServer, row: str, tmp_path: Path
) -> None:
    source = load_mailbox([str(dovecot_clean.dir / "mail" / ALICE / "Maildir")])
    sessions = TABLE[row]
    live = await trio.to_thread.run_sync(lambda: run(dovecot_clean.port, sessions))
    config = ServeConfig([], listen=("127.0.0.1", 0), password=PW, mailbox=source, persist=True)
    async with trio.open_nursery() as nursery:
        server, port = await start(nursery, config)
        fake = await trio.to_thread.run_sync(lambda: run(port, sessions))
        nursery.cancel_scope.cancel()
    assert fake == live
    assert server.report.near_misses == []
