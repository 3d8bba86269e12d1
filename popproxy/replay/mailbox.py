"""The fake mailbox's POP3 state machine (sans-IO): one client line in, one answer out.

Everything that decides what the fake mailbox says lives here, as tables per RFC 1939 §3
state (AUTHORIZATION, TRANSACTION; UPDATE happens inside QUIT).  ``MailboxSession.answer``
is the single reply path: IO code feeds it each client line and sends what it returns,
so a wrapper (fault injection, logging) sees every answer the mailbox gives.
"""

from __future__ import annotations

import base64
import enum
import re
from collections.abc import Callable
from dataclasses import dataclass

from popproxy.core import credentials
from popproxy.core.values import apop_timestamp
from popproxy.replay.mailbox_auth import Authenticator, Login, SaslDialog, fresh_msg_id
from popproxy.replay.sources import MailboxSource, StoredMessage, crlf

MAX_COMMAND = 255  # RFC 2449 §4: a command line is at most 255 octets, CRLF included

DEFAULT_TEXTS: dict[str, str] = {
    "GREETING": "+OK popproxy mailbox ready.",
    "USER": "+OK",
    "LOGIN": "+OK Logged in.",
    "STAT": "+OK {count} {size}",
    "LIST": "+OK {count} messages:",
    "LIST1": "+OK {msg} {size}",
    "UIDL": "+OK",
    "UIDL1": "+OK {msg} {uid}",
    "RETR": "+OK {size} octets",
    "TOP": "+OK",
    "DELE": "+OK Marked to be deleted.",
    "RSET": "+OK",
    "NOOP": "+OK",
    "QUIT": "+OK Logging out.",
    "QUIT-DELETED": "+OK Logging out, messages deleted.",
    "QUIT-AUTHORIZATION": "+OK Logging out",
    "STLS": "+OK Begin TLS negotiation now.",
    "ERR-NOMSG": "-ERR There's no message {msg}.",
    "ERR-DELETED": "-ERR Message is deleted.",
    "ERR-AUTH": "-ERR [AUTH] Authentication failed.",
    "ERR-UNKNOWN": "-ERR Unknown command: {verb}",
}

SYNTHESIZED_CAPA = ("TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE", "USER")


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    CLOSED = "CLOSED"  # after QUIT (and its UPDATE state, RFC 1939 §6)


@dataclass(frozen=True)
class Answer:
    """What to send, what to do next (``"tls"`` handshake, ``"close"``), and any near miss."""

    data: bytes
    then: str | None = None
    miss: str | None = None  # why the recordings could not answer this command
    closest: str | None = None  # what the recordings do hold for it


class Maildrop:
    """The messages every session starts from; ``persist`` keeps deletions across sessions."""

    def __init__(self, source: MailboxSource, *, persist: bool = False) -> None:
        self.source = source
        self.persist = persist
        self.messages: list[StoredMessage] = list(source.messages)
        self.deletions = 0  # committed by UPDATE states, for initial_stat's validity

    def open(self) -> list[StoredMessage]:
        """The maildrop as a session sees it from login on (RFC 1939 §4: numbering fixed)."""
        return list(self.messages)

    def update(self, deleted: list[StoredMessage]) -> None:
        """RFC 1939 §6: the UPDATE state removes the messages marked as deleted."""
        if self.persist and deleted:
            gone = {id(m) for m in deleted}
            self.messages = [m for m in self.messages if id(m) not in gone]
            self.deletions += len(deleted)


def stuff(data: bytes) -> bytes:
    """RFC 1939 §3: dot-stuff a body and terminate it (a last line without CRLF gets one)."""
    lines = data.splitlines(keepends=True)
    out = [b"." + line if line.startswith(b".") else line for line in lines]
    if out and not out[-1].endswith(b"\n"):
        out[-1] += b"\r\n"
    return b"".join(out) + b".\r\n"


def top_of(data: bytes, lines: int) -> bytes:
    """RFC 1939 §7 TOP: the header, the blank line, then ``lines`` lines of the body."""
    if data.startswith(b"\r\n"):
        head, body = b"\r\n", data[2:]
    else:
        split = data.find(b"\r\n\r\n")
        if split < 0:
            return data
        head, body = data[: split + 4], data[split + 4 :]
    return head + b"".join(body.splitlines(keepends=True)[:lines])


def mask_command(line: str) -> str:
    """A client line fit for a log: PASS, APOP and AUTH initial responses become ``#``."""
    return credentials.mask_text(line)


def _err(text: str) -> bytes:
    return f"-ERR {text}\r\n".encode()


class MailboxSession:
    """One client connection's view of the maildrop, from greeting to UPDATE."""

    def __init__(
        self,
        maildrop: Maildrop,
        authenticator: Authenticator,
        *,
        stls: bool = False,
        tls_active: bool = False,
        offer_stls: bool = False,
    ) -> None:
        self.maildrop = maildrop
        self.persona = maildrop.source.persona
        self.auth = authenticator
        self.state = State.AUTHORIZATION
        self.stls = stls  # STLS can be answered (popproxy's CA is there)
        self.tls_active = tls_active
        self.offer_stls = offer_stls
        self.max_command: int | None = MAX_COMMAND  # None: no limit (a provider persona)
        self.user: str | None = None
        self.messages: list[StoredMessage] = []
        self.deleted: set[int] = set()  # message numbers marked by DELE
        self.timestamp: str | None = None
        self._dialog: SaslDialog | None = None
        self._greeting = self._make_greeting()
        self._handlers: dict[State, dict[str, Callable[[list[str]], Answer]]] = {
            State.AUTHORIZATION: {
                "USER": self._user,
                "PASS": self._pass,
                "APOP": self._apop,
                "AUTH": self._auth,
                "CAPA": self._capa,
                "STLS": self._stls,
                "QUIT": self._quit,
            },
            State.TRANSACTION: {
                "STAT": self._stat,
                "LIST": self._list,
                "UIDL": self._uidl,
                "RETR": self._retr,
                "TOP": self._top,
                "DELE": self._dele,
                "RSET": self._rset,
                "NOOP": self._noop,
                "CAPA": self._capa,
                "QUIT": self._quit,
            },
        }

    # ------------------------------------------------------------------ the reply path

    def greeting(self) -> bytes:
        return self._greeting

    def answer(self, line: bytes) -> Answer:
        """The answer to one client line (CRLF included or not); the only reply path."""
        if self._dialog is not None:
            return self._sasl_step(line.rstrip(b"\r\n").decode("ascii", "replace").strip())
        too_long = self.max_command is not None and len(line) > self.max_command
        if too_long and self.state is not State.CLOSED:
            return Answer(_err("Command line too long."))
        text = line.rstrip(b"\r\n").decode("utf-8", "backslashreplace").strip(" \t")
        verb, _, rest = text.partition(" ")
        verb = verb.upper()
        handler = self._handlers.get(self.state, {}).get(verb)
        if handler is None:
            return Answer(self._unknown(verb))
        # RFC 1939 §3: arguments are separated by single spaces; PASS keeps its spaces.
        args = [rest] if verb == "PASS" and rest else rest.split()
        return handler(args)

    @property
    def in_sasl(self) -> bool:
        """Whether the next client line is a SASL response, not a command (RFC 5034 §4)."""
        return self._dialog is not None

    def tls_started(self) -> None:
        self.tls_active = True

    # ------------------------------------------------------------------ texts

    def _text(self, key: str, **values: int | str) -> str:
        recorded = self.persona.texts.get(key)
        for candidate in (recorded, DEFAULT_TEXTS[key]):
            if candidate is None:
                continue
            try:
                return candidate.format(**values)
            except (KeyError, IndexError, ValueError):
                continue
        return DEFAULT_TEXTS[key]

    def _status(self, key: str, **values: int | str) -> bytes:
        """The status line for ``key``: the recorded server's wording, else the default."""
        return (self._text(key, **values) + "\r\n").encode("utf-8", "surrogateescape")

    def _make_greeting(self) -> bytes:
        recorded = self.persona.greeting
        if recorded is None:
            self.timestamp = fresh_msg_id("popproxy")
            return f"{DEFAULT_TEXTS['GREETING']} {self.timestamp}\r\n".encode()
        old = apop_timestamp(recorded)
        if old is None:
            return recorded
        # RFC 1939 §7: the timestamp must differ for each greeting; keep the recorded host.
        self.timestamp = fresh_msg_id(old.rpartition("@")[2].rstrip(">") or None)
        return recorded.replace(old.encode("utf-8", "surrogateescape"), self.timestamp.encode())

    def _unknown(self, verb: str) -> bytes:
        if self.state is State.AUTHORIZATION and verb in self._handlers[State.TRANSACTION]:
            return _err(f"[AUTH] {verb} needs a login first.") if verb else _err("Unknown command.")
        return self._status("ERR-UNKNOWN", verb=verb) if verb else _err("Unknown command.")

    # ------------------------------------------------------------------ AUTHORIZATION

    def _user(self, args: list[str]) -> Answer:
        if len(args) != 1:
            return Answer(_err("USER needs one argument."))
        self.user = args[0]
        return Answer(self._status("USER"))

    def _pass(self, args: list[str]) -> Answer:
        if self.user is None:
            return Answer(_err("No username given."))
        return self._logged_in(self.auth.user_pass(self.user, args[0] if args else ""))

    def _apop(self, args: list[str]) -> Answer:
        if len(args) != 2:
            return Answer(_err("APOP needs a name and a digest."))
        return self._logged_in(self.auth.apop(args[0], self.timestamp, args[1]))

    def _auth(self, args: list[str]) -> Answer:
        if not args:  # RFC 1734 §2 clients probe with a bare AUTH: list the mechanisms
            return Answer(b"+OK\r\n" + stuff("\r\n".join(self.auth.mechanisms).encode()))
        dialog = self.auth.sasl(args[0], args[1] if len(args) > 1 else None)
        if dialog is None:
            return Answer(_err("Unsupported authentication mechanism."))
        self._dialog = dialog
        return self._advance(lambda: next(dialog))

    def _sasl_step(self, response: str) -> Answer:
        dialog = self._dialog
        assert dialog is not None
        if response == "*":  # RFC 5034 §4: the client cancels
            self._dialog = None
            return Answer(_err("Authentication cancelled."))
        return self._advance(lambda: dialog.send(response))

    def _advance(self, step: Callable[[], bytes]) -> Answer:
        try:
            challenge = step()
        except StopIteration as done:
            self._dialog = None
            result = done.value
            assert isinstance(result, Login)
            return self._logged_in(result)
        return Answer(b"+ " + base64.b64encode(challenge) + b"\r\n")

    def _logged_in(self, login: Login) -> Answer:
        if not login.ok:
            self.user = None
            return Answer(self._status("ERR-AUTH"))
        self.user = login.user
        self.state = State.TRANSACTION
        self.messages = self.maildrop.open()
        return Answer(self._status("LOGIN"))

    def _stls(self, args: list[str]) -> Answer:
        if self.tls_active:
            return Answer(_err("TLS is already active."))
        if not self.stls:
            return Answer(_err("STLS is not offered here."))
        return Answer(self._status("STLS"), then="tls")

    def _capa(self, args: list[str]) -> Answer:
        recorded = (
            self.persona.capa_transaction or self.persona.capa_authorization
            if self.state is State.TRANSACTION
            else self.persona.capa_authorization or self.persona.capa_transaction
        )
        if recorded is not None:
            lines = [ln for ln in crlf(recorded).split(b"\r\n")[1:] if ln and ln != b"."]
            status = recorded.split(b"\n", 1)[0].rstrip(b"\r")
        else:
            lines = [c.encode() for c in SYNTHESIZED_CAPA]
            lines.append(("SASL " + " ".join(self.auth.mechanisms)).encode())
            status = b"+OK"
        offered = self.stls and not self.tls_active and self.state is State.AUTHORIZATION
        has = any(ln.upper() == b"STLS" for ln in lines)
        if has and not offered:
            lines = [ln for ln in lines if ln.upper() != b"STLS"]
        elif offered and not has and (recorded is None or self.offer_stls):
            lines.append(b"STLS")
        unstuffed = [ln[1:] if ln.startswith(b"..") else ln for ln in lines]
        return Answer(status + b"\r\n" + stuff(b"\r\n".join(unstuffed) + b"\r\n"))

    def _quit(self, args: list[str]) -> Answer:
        if self.state is State.AUTHORIZATION:
            self.state = State.CLOSED
            return Answer(self._status("QUIT-AUTHORIZATION"), then="close")
        gone = [m for i, m in enumerate(self.messages, 1) if i in self.deleted]
        self.maildrop.update(gone)  # RFC 1939 §6: the UPDATE state
        self.state = State.CLOSED
        return Answer(self._status("QUIT-DELETED" if gone else "QUIT"), then="close")

    # ------------------------------------------------------------------ TRANSACTION

    def _message(self, arg: str) -> tuple[int, StoredMessage] | bytes:
        """The live message an argument names, or the -ERR answer (RFC 1939 §5)."""
        if not re.fullmatch(r"\d{1,9}", arg):
            return _err(f"Invalid message number: {arg}")
        n = int(arg)
        if n < 1 or n > len(self.messages):
            return self._status("ERR-NOMSG", msg=n)
        if n in self.deleted:
            return self._status("ERR-DELETED", msg=n)
        return n, self.messages[n - 1]

    def _live(self) -> list[tuple[int, StoredMessage]]:
        return [(i, m) for i, m in enumerate(self.messages, 1) if i not in self.deleted]

    def _cannot(self, what: str, closest: str | None = None) -> Answer:
        """RFC 3206 §4 SYS/PERM: the recordings do not hold what this command needs."""
        return Answer(
            _err(f"[SYS/PERM] popproxy mailbox: {what}"), miss=what, closest=closest or None
        )

    def _stat(self, args: list[str]) -> Answer:
        live = self._live()
        sizes = [m.octets for _, m in live]
        if any(s is None for s in sizes):
            initial = self.maildrop.source.initial_stat
            pristine = not self.deleted and not self.maildrop.deletions
            if initial is not None and pristine and initial[0] == len(live):
                return Answer(self._status("STAT", count=initial[0], size=initial[1]))
            unknown = [str(i) for i, m in live if m.octets is None]
            return self._cannot(f"the size of message {', '.join(unknown)} was never recorded")
        return Answer(self._status("STAT", count=len(live), size=sum(s or 0 for s in sizes)))

    def _list(self, args: list[str]) -> Answer:
        if args:
            found = self._message(args[0])
            if isinstance(found, bytes):
                return Answer(found)
            n, message = found
            if message.octets is None:
                return self._cannot(f"the size of message {n} was never recorded", message.origin)
            return Answer(self._status("LIST1", msg=n, size=message.octets))
        live = self._live()
        unknown = [str(i) for i, m in live if m.octets is None]
        if unknown:
            return self._cannot(f"the size of message {', '.join(unknown)} was never recorded")
        body = b"".join(f"{i} {m.octets}\r\n".encode() for i, m in live)
        total = sum(m.octets or 0 for _, m in live)
        return Answer(self._status("LIST", count=len(live), size=total) + stuff(body))

    def _uidl(self, args: list[str]) -> Answer:
        if args:
            found = self._message(args[0])
            if isinstance(found, bytes):
                return Answer(found)
            n, message = found
            if message.uid is None:
                return self._cannot(f"no UIDL of message {n} was recorded", message.origin)
            return Answer(self._status("UIDL1", msg=n, uid=message.uid))
        live = self._live()
        unknown = [str(i) for i, m in live if m.uid is None]
        if unknown:
            return self._cannot(f"no UIDL of message {', '.join(unknown)} was recorded")
        body = b"".join(f"{i} {m.uid}\r\n".encode() for i, m in live)
        return Answer(self._status("UIDL") + stuff(body))

    def _retr(self, args: list[str]) -> Answer:
        if len(args) != 1:
            return Answer(_err("RETR needs a message number."))
        found = self._message(args[0])
        if isinstance(found, bytes):
            return Answer(found)
        n, message = found
        if message.data is None:
            seen = ", ".join(sorted(message.seen_in)) or "STAT"
            return self._cannot(
                f"message {n} was never retrieved in the recordings (seen only in {seen})",
                message.origin,
            )
        size = message.octets or len(message.data)
        return Answer(self._status("RETR", size=size) + stuff(message.data))

    def _top(self, args: list[str]) -> Answer:
        if len(args) != 2 or not re.fullmatch(r"\d{1,9}", args[1]):
            return Answer(_err("TOP needs a message number and a line count."))
        found = self._message(args[0])
        if isinstance(found, bytes):
            return Answer(found)
        n, message = found
        lines = int(args[1])
        if message.data is not None:
            return Answer(self._status("TOP") + stuff(top_of(message.data, lines)))
        if lines in message.tops:
            return Answer(self._status("TOP") + stuff(message.tops[lines]))
        larger = sorted(m for m in message.tops if m > lines)
        if larger:
            return Answer(self._status("TOP") + stuff(top_of(message.tops[larger[0]], lines)))
        recorded = ", ".join(f"TOP {n} {m}" for m in sorted(message.tops)) or None
        return self._cannot(
            f"message {n} was never retrieved and no TOP {n} {lines} or longer was recorded",
            recorded or message.origin,
        )

    def _dele(self, args: list[str]) -> Answer:
        if len(args) != 1:
            return Answer(_err("DELE needs a message number."))
        found = self._message(args[0])
        if isinstance(found, bytes):
            return Answer(found)
        n, _ = found
        self.deleted.add(n)
        return Answer(self._status("DELE", msg=n))

    def _rset(self, args: list[str]) -> Answer:
        self.deleted.clear()  # RFC 1939 §5: unmark every message marked as deleted
        return Answer(self._status("RSET"))

    def _noop(self, args: list[str]) -> Answer:
        return Answer(self._status("NOOP"))
