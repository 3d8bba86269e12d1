"""The fake mailbox on a socket: reads client lines, sends ``MailboxSession`` answers, does TLS."""

from __future__ import annotations

from collections.abc import Callable

import trio
from rich.text import Text

from popproxy.faults.fake import FakeFaults, FaultEnded
from popproxy.faults.matcher import Injection
from popproxy.faults.rules import Answer as FaultAnswer
from popproxy.replay.fake import (
    ClientGone,
    ClientIO,
    ConnectionReport,
    Log,
    NearMiss,
    ServeConfig,
)
from popproxy.replay.mailbox import Answer, MailboxSession, Maildrop, mask_command
from popproxy.replay.mailbox_auth import Authenticator, LoginPolicy
from popproxy.replay.sasl_server import oauth_rules

#: Wraps the reply path: given the session's ``answer`` and a client line, returns the answer.
AnswerHook = Callable[[Callable[[bytes], Answer], bytes], Answer]


def make_session(config: ServeConfig, maildrop: Maildrop) -> MailboxSession:
    """A fresh session on ``maildrop`` with the logins ``config`` allows."""
    policy = LoginPolicy(password=config.password, user=config.mailbox_user, token=config.token)
    return MailboxSession(
        maildrop,
        Authenticator(policy, oauth=oauth_rules(config.persona)),
        stls=not config.tls,
        tls_active=config.tls,
        offer_stls=config.offer_stls,
    )


class MailboxConnection(ClientIO):
    """One client served by the fake mailbox."""

    def __init__(
        self,
        config: ServeConfig,
        maildrop: Maildrop,
        stream: trio.abc.Stream,
        report: ConnectionReport,
        log: Log | None,
        hook: AnswerHook | None = None,
    ) -> None:
        self.config = config
        self.session = make_session(config, maildrop)
        self.stream = stream
        self.report = report
        self.log = log
        self.hook = hook
        self._buf = b""
        self.faults: FakeFaults | None = None  # docs/faults.md
        if config.faults is not None:
            self.faults = FakeFaults(
                config.faults.session(report.number), lambda t: self._say(t, "pop.warning")
            )
            self.faults.log = report.faults

    def answer(self, line: bytes) -> Answer:
        """The single reply path: the session's answer, through the hook when one is set."""
        if self.hook is not None:
            return self.hook(self.session.answer, line)
        return self.session.answer(line)

    async def run(self) -> None:
        try:
            if self.config.tls:
                await self._handshake()
            await self._reply(None, None, self.session.greeting(), None)
            while True:
                line = await self._line()
                if not line:
                    if self.report.ended == "open":
                        self.report.ended = "client closed"
                    return
                in_sasl = self.session.in_sasl
                verb, args, fault = self._fault(line, in_sasl)
                if fault is not None and isinstance(fault.action, FaultAnswer):
                    await self._reply(verb, args, b"", fault)  # the mailbox never sees it
                    continue
                answer = self.answer(line)
                self._note(line, answer, in_sasl)
                await self._reply(verb, args, answer.data, fault)
                if answer.then == "tls":
                    if self._discard_unread():
                        self._say("plaintext after STLS discarded (RFC 2595 §4)", "pop.warning")
                    await self._handshake()
                    self.session.tls_started()
                elif answer.then == "close":
                    self.report.ended = "quit"
                    return
        except ClientGone:
            if self.report.ended == "open":
                self.report.ended = "connection lost"
        except FaultEnded as end:
            self.report.ended, self.report.fault_ended = end.how, True

    # ------------------------------------------------------------------ faults

    def _fault(self, line: bytes, in_sasl: bool) -> tuple[str | None, str | None, Injection | None]:
        """The command's verb and arguments, and the fault rule for it (if any)."""
        if self.faults is None or in_sasl:
            return None, None, None
        text = line.rstrip(b"\r\n").decode("utf-8", "backslashreplace").strip(" \t")
        verb, _, rest = text.partition(" ")
        verb, args = verb.upper(), rest.strip() or None
        return verb, args, self.faults.command(verb, args)

    async def _reply(
        self, verb: str | None, args: str | None, data: bytes, fault: Injection | None
    ) -> None:
        """Send an answer (or the greeting) as a fault shapes it (docs/faults.md)."""
        if self.faults is None:
            await self._send(data)
            return
        sent = await self.faults.send(
            fault, data, self._send, lambda: self.stream, verb=verb, args=args
        )
        if verb is not None:
            self.faults.replied(verb, sent)

    def _note(self, line: bytes, answer: Answer, in_sasl: bool) -> None:
        text = line.rstrip(b"\r\n").decode("utf-8", "backslashreplace")
        shown = "#" * len(text) if in_sasl and text != "*" else mask_command(text)
        first = answer.data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "backslashreplace")
        if answer.miss is not None:
            miss = NearMiss(self.report.number, shown, answer.closest, answer.miss)
            self.report.near_misses.append(miss)
            self._say(f"near miss: {miss.describe()}", "pop.warning")
        else:
            self._say(f"{shown} → {first[:100]}")

    def _say(self, text: str, style: str = "pop.muted") -> None:
        if self.log is not None:
            tag = Text(f"#{self.report.number} ", style="pop.session")
            tag.append(text, style=style)
            self.log(tag)

    # ------------------------------------------------------------------ IO

    async def _line(self) -> bytes:
        faults = self.faults
        watching = faults.watching if faults is not None else None
        if faults is None or watching is None:
            return await self._read_line()
        line = await self._read_line(watching.seconds, lambda: faults.watched(watching, self._send))
        faults.watching = None  # a fault's idle limit covers one wait
        return line
