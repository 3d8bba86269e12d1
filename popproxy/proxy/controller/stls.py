"""The relay controller's STLS decisions (RFC 2595 §4) and CAPA filtering (RFC 2449 §5)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from popproxy.core.events import BodyChunk, Direction, Greeting, Reply
from popproxy.proxy.controller.flows import Phase, StlsMode, Upgrade
from popproxy.proxy.controller.io import (
    Drop,
    Forward,
    HoldReads,
    Leg,
    Note,
    ResumeReads,
    StartTls,
    TlsFact,
)

if TYPE_CHECKING:
    from popproxy.proxy.controller.machine import Controller

C, S = Direction.CLIENT, Direction.SERVER

STLS_OK = b"+OK Begin TLS negotiation now.\r\n"
STRIP_ERR = b"-ERR STLS not available.\r\n"
ACTIVE_ERR = b"-ERR TLS is already active.\r\n"
OWN_STLS = b"STLS\r\n"
# RFC 2449 §5: one capability per line; STLS (RFC 2595 §4) takes no arguments.
_STLS_CAPABILITY = re.compile(rb"(?i)stls[ \t]*\r?\n")
# RFC 5034 §6: "SASL" and its mechanism names; RFC 5802 §4: "-PLUS" names channel binding.
_SASL_CAPABILITY = re.compile(rb"(?i)sasl[ \t]")
_PLUS_WORD = re.compile(rb"(?i)[ \t]+[A-Z0-9_-]+-PLUS(?=[ \t\r\n])")
_PLUS_LINE = re.compile(rb"(?i)[A-Z0-9_-]+-PLUS[ \t]*\r?\n")
STLS_WHY = "STLS capability hidden by popproxy"
PLUS_WHY = "-PLUS mechanism hidden by popproxy (--hide-plus)"


def greeting(ctl: Controller, greeting: Greeting) -> None:
    ctl._greeted = True
    upgrade = ctl._upgrade
    if upgrade is None or upgrade.phase is not Phase.GREETING:
        return
    ctl._forward_to(S, greeting.offset + len(greeting.raw))
    upgrade.phase = Phase.OWN_REPLY
    ctl._send(Leg.UPSTREAM, OWN_STLS, "popproxy upgrades the upstream leg (--upstream-stls)")


def stls_reply(ctl: Controller, reply: Reply, upgrade: Upgrade) -> None:
    server, client = ctl._flows[S], ctl._flows[C]
    ctl._forward_to(S, reply.offset)
    end = reply.offset + len(reply.raw)
    if reply.status != "+OK":
        ctl._upgrade = None  # the session goes on in plaintext
        ctl._out.append(ResumeReads(Leg.CLIENT))
        return
    if ctl.stls is not StlsMode.INTERCEPT and ctl.stls is not StlsMode.PASSTHROUGH:
        ctl._end("proxy-error", "an STLS reached the server unanswered by popproxy")
        return
    if ctl.stls is StlsMode.PASSTHROUGH:
        ctl._forward_to(S, end)
    else:
        upgrade.ok_offset, upgrade.ok_line = reply.offset, bytes(reply.raw)
        del server.pending[: len(reply.raw)]
        server.decided = end
    if ctl.stls is StlsMode.INTERCEPT:
        upgrade.phase = Phase.UPSTREAM_HANDSHAKE
        ctl._out.append(HoldReads(Leg.UPSTREAM))
        ctl._out.append(StartTls(Leg.UPSTREAM, "stls"))
    # RFC 2595 §4: nothing sent after STLS (client) or its +OK (server) before the
    # handshake belongs to the TLS session: such bytes are injected, never forwarded.
    ctl._drop_to(S, server.received, "plaintext after STLS +OK")
    ctl._drop_to(C, client.received, "plaintext after STLS")
    if ctl.stls is StlsMode.PASSTHROUGH:
        ctl._out.append(TlsFact(S, decrypted=False, mode="passthrough"))
        ctl._out.append(TlsFact(C, decrypted=False, mode="passthrough"))
        ctl._transparent = True
        ctl._upgrade = None
        ctl._out.append(ResumeReads(Leg.CLIENT))


def own_stls_reply(ctl: Controller, reply: Reply, upgrade: Upgrade) -> None:
    ctl._forward_to(S, reply.offset)
    end = reply.offset + len(reply.raw)
    ctl._drop_to(S, end, "reply to popproxy's own STLS")
    if reply.status != "+OK":
        ctl._refuse("upstream-tls-error", "upstream refused STLS")
        return
    upgrade.phase = Phase.UPSTREAM_HANDSHAKE
    ctl._out.append(HoldReads(Leg.UPSTREAM))
    ctl._out.append(StartTls(Leg.UPSTREAM, "stls"))
    ctl._drop_to(S, ctl._flows[S].received, "plaintext after STLS +OK")


def answer_locally(ctl: Controller) -> None:
    """Answer the client's STLS: RFC 2449 §6.6, only after every earlier reply."""
    upgrade = ctl._upgrade
    assert upgrade is not None
    if ctl.tls[Leg.CLIENT]:
        ctl._send(Leg.CLIENT, ACTIVE_ERR, "TLS is already active on the client leg")
    elif ctl.stls is StlsMode.STRIP:
        ctl._out.append(Note("strip", "STLS refused by popproxy (strip mode)"))
        ctl._send(Leg.CLIENT, STRIP_ERR, "strip mode: popproxy refuses STLS")
    else:
        # The upstream leg is TLS already: upgrade only the client leg.
        ctl._send(Leg.CLIENT, STLS_OK, "the upstream leg is TLS already")
        upgrade.phase = Phase.CLIENT_HANDSHAKE
        ctl._out.append(StartTls(Leg.CLIENT, "stls"))
        ctl._drop_to(C, ctl._flows[C].received, "plaintext after STLS")
        return
    ctl._upgrade = None
    ctl._out.append(ResumeReads(Leg.CLIENT))


def tls_established(ctl: Controller, leg: Leg) -> None:
    ctl.tls[leg] = True
    upgrade = ctl._upgrade
    if upgrade is None:
        return
    # Plaintext read from the leg before its handshake began is injected (RFC 2595 §4).
    why = "plaintext after STLS" if leg is Leg.CLIENT else "plaintext after STLS +OK"
    ctl._drop_to(leg.sender, ctl._flows[leg.sender].received, why)
    if leg is Leg.UPSTREAM and upgrade.phase is Phase.UPSTREAM_HANDSHAKE:
        if upgrade.seq < 0:  # --upstream-stls: the client leg stays as it is
            ctl._out.append(TlsFact(C, decrypted=True, mode="unchanged"))
            ctl._upgrade = None
            ctl._out.append(ResumeReads(Leg.UPSTREAM))
            ctl._out.append(ResumeReads(Leg.CLIENT))
            ctl._settle()
            return
        ctl._out.append(Forward(S, upgrade.ok_line, upgrade.ok_offset))
        upgrade.phase = Phase.CLIENT_HANDSHAKE
        ctl._out.append(StartTls(Leg.CLIENT, "stls"))
    elif leg is Leg.CLIENT and upgrade.phase is Phase.CLIENT_HANDSHAKE:
        if not upgrade.ok_line:  # answered by popproxy: the upstream leg was TLS already
            ctl._out.append(TlsFact(S, decrypted=True, mode="already-tls"))
        ctl._upgrade = None
        ctl._out.append(ResumeReads(Leg.UPSTREAM))
        ctl._out.append(ResumeReads(Leg.CLIENT))
        ctl._settle()


def tls_failed(ctl: Controller, leg: Leg, reason: str) -> None:
    if leg is Leg.CLIENT:
        ctl._end("client-tls-error", f"TLS handshake with the client failed: {reason}")
        return
    upgrade = ctl._upgrade
    if upgrade is not None and upgrade.ok_line:
        # The client never saw the server's +OK: it gets popproxy's answer instead.
        ctl._out.append(Drop(S, upgrade.ok_offset, len(upgrade.ok_line), "upstream TLS failed"))
    # Never relay mail from an upstream whose certificate failed verification.
    ctl._refuse("upstream-tls-error", f"TLS with upstream failed: {reason}")


def capa_chunk(ctl: Controller, chunk: BodyChunk) -> None:
    """Filter a listing line by line; an unfinished line waits for its end."""
    flow = ctl._flows[S]
    verb = ctl._capa[chunk.seq]
    line = ctl._capa_line if ctl._capa_line is not None else chunk.offset
    end = chunk.offset + len(chunk.raw)
    while True:
        lo = line - flow.decided
        newline = flow.pending.find(b"\n", lo, end - flow.decided)
        if newline < 0:
            break
        stop = flow.decided + newline + 1
        filter_line(ctl, verb, line, lo, newline + 1)
        line = stop
    ctl._capa_line = line


def filter_line(ctl: Controller, verb: str, line: int, lo: int, hi: int) -> None:
    """One complete listing line at stream offset ``line`` (``pending[lo:hi]``)."""
    pending = ctl._flows[S].pending
    stop = line + hi - lo
    if verb == "CAPA" and ctl._hiding() and _STLS_CAPABILITY.fullmatch(pending, lo, hi):
        ctl._forward_to(S, line)
        ctl._drop_to(S, stop, STLS_WHY)
        ctl._out.append(Note("strip", "STLS hidden from CAPA"))
    elif not ctl.hide_plus:
        return
    elif verb == "CAPA" and _SASL_CAPABILITY.match(pending, lo, hi):
        words = [(m.start(), m.end()) for m in _PLUS_WORD.finditer(pending, lo, hi)]
        for start, finish in words:  # each name with the blank before it
            ctl._forward_to(S, line + start - lo)
            ctl._drop_to(S, line + finish - lo, PLUS_WHY)
        if words:
            ctl._out.append(Note("hide-plus", "-PLUS mechanisms hidden (--hide-plus)"))
    elif verb == "AUTH" and _PLUS_LINE.fullmatch(pending, lo, hi):
        ctl._forward_to(S, line)
        ctl._drop_to(S, stop, PLUS_WHY)
        ctl._out.append(Note("hide-plus", "-PLUS mechanisms hidden (--hide-plus)"))
