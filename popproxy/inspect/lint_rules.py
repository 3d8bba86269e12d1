"""Conformance rules for recorded POP3 sessions: findings with RFC section and severity."""

from __future__ import annotations

import enum
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

from popproxy.capture import format as fmt
from popproxy.capture.format import Record
from popproxy.core.events import (
    Anomaly,
    BodyEnd,
    Command,
    ConnectionClosed,
    Direction,
    Event,
    Greeting,
    PopproxyClosed,
    PopproxySent,
    Reply,
    StateChanged,
)
from popproxy.core.transcript import Exchange, TranscriptBuilder


class Severity(enum.StrEnum):
    """How bad a finding is; ``lint`` exits 1 for warnings and errors."""

    ERROR = "error"
    WARNING = "warning"
    ADVICE = "advice"


ERROR, WARNING, ADVICE = Severity.ERROR, Severity.WARNING, Severity.ADVICE
SEVERITIES = tuple(Severity)
RANK = {ADVICE: 0, WARNING: 1, ERROR: 2}
MAX_PER_RULE = 100  # findings kept per rule and capture; the rest are counted
MAX_ARG = 40  # RFC 1939 §3: each argument up to 40 characters
_OCTETS_RE = re.compile(r"^\s*(\d+)\s+octets\b", re.IGNORECASE)
# Fault events (docs/capture-format.md, "Faults popproxy injected"): what each says popproxy did.
FAULT_EVENTS = {
    "fault": "popproxy injected",
    "fault-cut": "popproxy cut the connection",
    "fault-stall": "popproxy stalled the replies",
    "fault-close": "popproxy closed the connection",
    "fault-missed": "popproxy could not apply",
}

# RFC 1939 §3-§7, RFC 2449, RFC 2595 §4, RFC 6856 §2: which state each command belongs to.
AUTHORIZATION_ONLY = {
    "USER": "RFC 1939 §7",
    "PASS": "RFC 1939 §7",
    "APOP": "RFC 1939 §7",
    "AUTH": "RFC 5034 §4",
    "STLS": "RFC 2595 §4",
    "UTF8": "RFC 6856 §2",
}
TRANSACTION_ONLY = {
    "STAT": "RFC 1939 §5",
    "LIST": "RFC 1939 §5",
    "RETR": "RFC 1939 §5",
    "DELE": "RFC 1939 §5",
    "NOOP": "RFC 1939 §5",
    "RSET": "RFC 1939 §5",
    "TOP": "RFC 1939 §7",
    "UIDL": "RFC 1939 §7",
}

# Observer anomaly kind -> (rule, severity, RFC section, explanation).  ``{detail}`` and
# ``{command}`` are filled in.  Kinds mapped to None are checked more exactly elsewhere.
ANOMALY_RULES: dict[str, tuple[str, Severity, str, str] | None] = {
    "truncated-body": (
        "body-truncated",
        ERROR,
        "RFC 1939 §3",
        "the connection closed inside the multi-line reply: no '.' terminator",
    ),
    "unstuffed-dot": (
        "unstuffed-dot",
        ERROR,
        "RFC 1939 §3",
        "body lines begin with '.' but were not dot-stuffed ({detail})",
    ),
    "multiline-reply-to-single": (
        "multiline-reply-to-single",
        ERROR,
        "RFC 1939 §5, §7",
        "multi-line listing sent for {command} with an argument, which takes a single-line reply",
    ),
    "command-too-long": (
        "command-too-long",
        WARNING,
        "RFC 2449 §4",
        "command line of {detail} is over 255 octets including CRLF",
    ),
    "status-too-long": (
        "status-too-long",
        WARNING,
        "RFC 2449 §4",
        "first response line of {detail} is over 512 octets including CRLF",
    ),
    "unsolicited": (
        "unsolicited-reply",
        WARNING,
        "RFC 1939 §3",
        "server line with no command outstanding: {detail}",
    ),
    "data-after-quit": (
        "data-after-quit",
        WARNING,
        "RFC 1939 §6",
        "server sent more after answering QUIT: {detail}",
    ),
    "unexpected-line": (
        "unexpected-line",
        ERROR,
        "RFC 1939 §3",
        "server line that is neither status nor body (early terminator?): {detail}",
    ),
    "plaintext-after-stls": (
        "plaintext-after-stls",
        ERROR,
        "RFC 2595 §4",
        "plaintext after STLS, before the TLS handshake: injection",
    ),
    "nonstandard-status": (
        "nonstandard-status",
        ERROR,
        "RFC 1939 §3",
        "status indicator {detail!r}: only +OK and -ERR exist",
    ),
    "status-case": (
        "status-case",
        ERROR,
        "RFC 1939 §3",
        "status indicator {detail!r} must be sent in upper case",
    ),
    "continuation-outside-auth": (
        "continuation-outside-auth",
        ERROR,
        "RFC 5034 §4",
        "'+' continuation answered {command}: only AUTH has them",
    ),
    "bad-greeting": (
        "bad-greeting",
        ERROR,
        "RFC 1939 §4",
        "the greeting is not a status line: {detail}",
    ),
    "command-after-quit": (
        "command-after-quit",
        WARNING,
        "RFC 1939 §6",
        "{command} sent after QUIT was answered",
    ),
    "challenge-without-response": (
        "challenge-without-response",
        WARNING,
        "RFC 5034 §4",
        "a second challenge before the client answered the first",
    ),
    "unterminated-line": (
        "unterminated-line",
        WARNING,
        "RFC 1939 §3",
        "the stream ends in a line without CRLF ({detail})",
    ),
    "bare-lf": None,  # counted exactly from the raw bytes
    "no-reply": None,  # reported per unanswered exchange
    "line-too-long": None,  # the command/status limits above say what matters
}


@dataclass(frozen=True, slots=True)
class Finding:
    """One conformance problem: where (exchange, direction), how bad, and which RFC says so."""

    rule: str
    severity: Severity
    rfc: str
    message: str
    seq: int | None = None
    command: str | None = None
    direction: str | None = None  # "client", "server" or "popproxy"

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "rfc": self.rfc,
            "message": self.message,
            "seq": self.seq,
            "command": self.command,
            "direction": self.direction,
        }


def _who(direction: str) -> str:
    return {"c": "client", "s": "server", "p": "popproxy"}.get(direction, "server")


class Linter:
    """Consumes one capture's (record, time, events) stream; ``finish()`` returns findings.

    Memory stays bounded: findings are capped per rule, and only recent command verbs are
    remembered.
    """

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.suppressed: Counter[str] = Counter()
        self._per_rule: Counter[str] = Counter()
        self._builder = TranscriptBuilder(hash_bodies=False, keep_listings=True)
        self._verbs: OrderedDict[int, str] = OrderedDict()
        self._state = "AUTHORIZATION"
        self._outstanding: set[int] = set()
        self._pipelining = False  # advertised in the latest CAPA (RFC 2449 §6.6)
        self._pipelined_reported = False
        self._apop_stamp: str | None = None
        self._last_reply: tuple[str, str] | None = None
        self._sizes: dict[str, int] = {}  # scan listing: message number -> size
        self._lf = {"c": 0, "s": 0}
        self._crlf = {"c": 0, "s": 0}
        self._cr_end = {"c": False, "s": False}
        self._opaque: set[str] = set()
        self._bare_seq: dict[str, int | None] = {}
        self._closed_by: dict[str, str] = {}  # direction -> "client" | "server" | "popproxy"
        self._cut_reported = False
        self._fault_at: tuple[int | None, str | None] = (None, None)  # the last fault's command

    # ----------------------------------------------------------------- feeding

    def feed(self, record: Record | None, t: float, events: list[Event]) -> None:
        if record is not None:
            self._record(record)
        # An over-long AUTH with an initial response has its own, more precise rule.
        long_ir = {e.seq for e in events if isinstance(e, Command) and _long_initial_response(e)}
        popproxys: Direction | None = None  # this batch is popproxy's bytes (or close)
        for event in events:
            if isinstance(event, (PopproxySent, PopproxyClosed)):
                popproxys = event.direction
                if isinstance(event, PopproxyClosed):
                    self._closed_by[event.direction.value] = "popproxy"
            elif isinstance(event, Anomaly) and event.direction is popproxys:
                self._popproxy_anomaly(event)
            elif (
                isinstance(event, Anomaly)
                and event.kind == "command-too-long"
                and event.seq in long_ir
            ):
                continue
            else:
                if isinstance(event, ConnectionClosed):
                    self._closed_by.setdefault(event.direction.value, _who(event.direction.value))
                self._event(event)
        for item in self._builder.feed(t, events):
            if item.what == "done" and item.exchange is not None:
                self._exchange(item.exchange)

    def _record(self, record: Record) -> None:
        if record.kind == fmt.EVENT and record.fields.get("kind") in FAULT_EVENTS:
            self._fault(record.fields)
        direction = record.direction
        if direction is None:
            return
        d = direction.value
        if record.kind == fmt.DATA and record.data is not None and d in self._lf:
            if d in self._opaque or record.proxy:
                return  # popproxy's own bytes (a fault's) are not the peer's lines
            data = record.data
            # RFC 1939 §3: every line ends in CRLF.  Exact count, across chunk boundaries.
            self._lf[d] += data.count(b"\n")
            self._crlf[d] += data.count(b"\r\n") + (self._cr_end[d] and data[:1] == b"\n")
            self._cr_end[d] = data[-1:] == b"\r"
        elif record.kind == fmt.TLS and not record.decrypted:
            self._opaque.add(d)  # passthrough TLS: ciphertext has no lines

    def _fault(self, fields: dict[str, Any]) -> None:
        """A fault rule acted (docs/faults.md): popproxy's doing, never the server's."""
        kind = str(fields["kind"])
        if kind == "fault":
            verb = fields.get("verb")
            seq = next(reversed(self._verbs), None) if verb else None  # the command it hit
            self._fault_at = (seq, str(verb) if verb else None)
        detail = str(fields.get("detail") or "")
        message = f"{FAULT_EVENTS[kind]}: {detail}" if detail else FAULT_EVENTS[kind]
        self.add("fault-by-popproxy", ADVICE, "-", message, *self._fault_at, "p")

    def _event(self, event: Event) -> None:
        if isinstance(event, Command):
            self._command(event)
        elif isinstance(event, Reply):
            self._reply(event)
        elif isinstance(event, BodyEnd):
            self._outstanding.discard(event.seq)
        elif isinstance(event, StateChanged):
            self._state = event.new.value
        elif isinstance(event, Greeting):
            self._apop_stamp = event.apop_timestamp
        elif isinstance(event, Anomaly):
            self._anomaly(event)

    def _command(self, event: Command) -> None:
        self._verbs[event.seq] = event.verb
        while len(self._verbs) > 10_000:
            self._verbs.popitem(last=False)
        if self._outstanding and not self._pipelining and not self._pipelined_reported:
            self._pipelined_reported = True
            self.add(
                "pipelining-not-advertised",
                ADVICE,
                "RFC 2449 §6.6",
                f"{event.verb} sent before earlier replies were complete, but the server "
                "did not advertise PIPELINING in CAPA",
                event.seq,
                event.verb,
                "c",
            )
        self._outstanding.add(event.seq)
        if _long_initial_response(event):
            mech = (event.args or "").split(" ")[0]
            self.add(
                "auth-initial-response-too-long",
                WARNING,
                "RFC 5034 §4",
                f"AUTH {mech} with an initial response is {len(event.raw)} octets: over 255 "
                "the client must send AUTH alone and the response after the '+' challenge",
                event.seq,
                event.verb,
                "c",
            )
        if event.verb != "AUTH" and event.args:
            longest = max(len(a) for a in event.args.split(" "))
            if longest > MAX_ARG:
                self.add(
                    "argument-too-long",
                    ADVICE,
                    "RFC 1939 §3",
                    f"an argument of {longest} characters (limit 40)",
                    event.seq,
                    event.verb,
                    "c",
                )

    def _reply(self, event: Reply) -> None:
        if not event.multiline:
            self._outstanding.discard(event.seq)
        verb, state = event.verb, self._state  # the state the server processed it in
        if verb in AUTHORIZATION_ONLY and state != "AUTHORIZATION":
            self.add(
                "wrong-state",
                ADVICE,
                AUTHORIZATION_ONLY[verb],
                f"{verb} is valid only in the AUTHORIZATION state, sent in {state}",
                event.seq,
                verb,
                "c",
            )
        elif verb in TRANSACTION_ONLY and state != "TRANSACTION":
            self.add(
                "wrong-state",
                ADVICE,
                TRANSACTION_ONLY[verb],
                f"{verb} is valid only in the TRANSACTION state, sent in {state}",
                event.seq,
                verb,
                "c",
            )
        elif verb == "PASS" and state == "AUTHORIZATION" and self._last_reply != ("USER", "+OK"):
            self.add(
                "pass-without-user",
                ADVICE,
                "RFC 1939 §7",
                "PASS must follow a USER that got +OK",
                event.seq,
                verb,
                "c",
            )
        self._last_reply = (verb, event.status)

    def _anomaly(self, event: Anomaly) -> None:
        command = self._verbs.get(event.seq) if event.seq is not None else None
        if event.kind not in ANOMALY_RULES:
            self.add(
                event.kind,
                ADVICE,
                "-",
                f"observer anomaly: {event.detail}".rstrip(": "),
                event.seq,
                command,
                event.direction.value,
            )
            return
        if event.kind == "bare-lf" and event.direction.value not in self._bare_seq:
            self._bare_seq[event.direction.value] = event.seq
        rule = ANOMALY_RULES[event.kind]
        if rule is None:
            return
        name, severity, rfc, text = rule
        message = text.format(detail=event.detail, command=command or "the command")
        self.add(name, severity, rfc, message, event.seq, command, event.direction.value)

    def _popproxy_anomaly(self, event: Anomaly) -> None:
        """popproxy's own bytes or its own close caused this: never the peer's fault."""
        if event.kind == "truncated-body" and not self._cut_reported:
            self._cut_reported = True
            command = self._verbs.get(event.seq) if event.seq is not None else None
            self.add(
                "cut-by-popproxy",
                ADVICE,
                "-",
                "popproxy ended the session inside this reply (its own shutdown or an error): "
                "not the server's fault",
                event.seq,
                command,
                "p",
            )

    # ----------------------------------------------------------------- exchanges

    def _exchange(self, ex: Exchange) -> None:
        if ex.kind != "command" or ex.status is None:
            return
        verb, ok = ex.command or "", ex.status == "+OK"
        if verb == "QUIT" and not ok:
            self.add(
                "quit-not-ok",
                WARNING,
                "RFC 1939 §6",
                f"QUIT answered {ex.status} {ex.text or ''}".rstrip(),
                ex.seq,
                verb,
                "s",
            )
        elif verb == "APOP" and self._apop_stamp is None:
            self.add(
                "apop-without-timestamp",
                WARNING,
                "RFC 1939 §7",
                "APOP used but the greeting has no <timestamp>",
                ex.seq,
                verb,
                "c",
            )
        if not ok:
            return
        if verb == "CAPA" and ex.listing is not None:
            self._pipelining = any(x and x[0].upper() == "PIPELINING" for x in ex.listing)
        elif verb == "STAT":
            self._drop_listing(ex)
        elif verb in ("LIST", "UIDL") and ex.args:
            self._single_listing(ex)
        elif verb in ("LIST", "UIDL") and ex.listing is not None:
            self._listing(ex)
        elif verb == "RETR" and not ex.truncated:
            self._retr_size(ex)

    def _drop_listing(self, ex: Exchange) -> None:
        # RFC 1939 §5: "+OK nn mm", message count and size in octets.
        if ex.value is None:
            self.add(
                "malformed-drop-listing",
                ERROR,
                "RFC 1939 §5",
                f"STAT reply is not '+OK count octets': {ex.text!r}",
                ex.seq,
                "STAT",
                "s",
            )
        elif len((ex.text or "").split()) > 2:
            self.add(
                "drop-listing-extra",
                ADVICE,
                "RFC 1939 §5",
                "text after the drop listing is discouraged",
                ex.seq,
                "STAT",
                "s",
            )

    def _single_listing(self, ex: Exchange) -> None:
        verb, asked = ex.command or "", (ex.args or "").split(" ")[0]
        section = "RFC 1939 §5" if verb == "LIST" else "RFC 1939 §7"
        what = "scan listing" if verb == "LIST" else "unique-id listing"
        if ex.value is None or (verb == "UIDL" and not _valid_uid(str(ex.value[1]))):
            self.add(
                f"malformed-{what.replace(' ', '-')}",
                ERROR,
                section,
                f"{verb} {asked} reply is not a {what}: {ex.text!r}",
                ex.seq,
                verb,
                "s",
            )
        elif str(ex.value[0]) != asked.lstrip("0") and asked.isdigit():
            self.add(
                f"malformed-{what.replace(' ', '-')}",
                ERROR,
                section,
                f"{verb} {asked} answered for message {ex.value[0]}",
                ex.seq,
                verb,
                "s",
            )
        elif verb == "UIDL" and len((ex.text or "").split()) > 2:
            self.add(
                "malformed-unique-id-listing",
                WARNING,
                section,
                "text after the unique-id",
                ex.seq,
                verb,
                "s",
            )

    def _listing(self, ex: Exchange) -> None:
        assert ex.listing is not None
        verb = ex.command or ""
        bad, extra, first = 0, 0, ""
        seen: set[str] = set()
        duplicates = 0
        if verb == "LIST":
            self._sizes = {}
        for fields in ex.listing:
            ok = len(fields) >= 2 and fields[0].isdigit()
            if verb == "LIST":
                ok = ok and fields[1].isdigit()
                if ok:
                    self._sizes[fields[0]] = int(fields[1])
            else:
                ok = ok and _valid_uid(fields[1])
                if ok and fields[1] in seen:
                    duplicates += 1
                seen.add(fields[1] if ok else "")
            if not ok:
                bad += 1
                first = first or " ".join(fields)
            elif len(fields) > 2:
                extra += 1
        section = "RFC 1939 §5" if verb == "LIST" else "RFC 1939 §7"
        what = "scan listing" if verb == "LIST" else "unique-id listing"
        rule = f"malformed-{what.replace(' ', '-')}"
        if bad:
            detail = " (uid: 1-70 characters 0x21-0x7E)" if verb == "UIDL" else ""
            self.add(
                rule,
                ERROR,
                section,
                f"{bad} malformed {what} line(s), first {first!r}{detail}",
                ex.seq,
                verb,
                "s",
            )
        if extra:
            severity = ADVICE if verb == "LIST" else WARNING
            last = "size" if verb == "LIST" else "uid"
            self.add(
                rule if verb == "UIDL" else "scan-listing-extra",
                severity,
                section,
                f"{extra} {what} line(s) carry text after the {last}",
                ex.seq,
                verb,
                "s",
            )
        if duplicates:
            self.add(
                "duplicate-unique-id",
                WARNING,
                section,
                f"{duplicates} unique-id(s) repeated in one listing",
                ex.seq,
                verb,
                "s",
            )

    def _retr_size(self, ex: Exchange) -> None:
        # RFC 1939 §11: sizes count CRLF as two octets and not the stuffing dots.
        octets = ex.body_octets or 0
        match = _OCTETS_RE.match(ex.text or "")
        if match is not None and int(match.group(1)) != octets:
            self.add(
                "octets-mismatch",
                WARNING,
                "RFC 1939 §11",
                f"'+OK {match.group(1)} octets' but the body has {octets} unstuffed octets",
                ex.seq,
                "RETR",
                "s",
            )
        msg = (ex.args or "").strip()
        if msg in self._sizes and self._sizes[msg] != octets:
            self.add(
                "size-mismatch",
                WARNING,
                "RFC 1939 §11",
                f"LIST said message {msg} has {self._sizes[msg]} octets; RETR sent {octets}",
                ex.seq,
                "RETR",
                "s",
            )

    # ----------------------------------------------------------------- results

    def add(
        self,
        rule: str,
        severity: Severity,
        rfc: str,
        message: str,
        seq: int | None = None,
        command: str | None = None,
        direction: str | None = None,
    ) -> None:
        self._per_rule[rule] += 1
        if self._per_rule[rule] > MAX_PER_RULE:
            self.suppressed[rule] += 1
            return
        self.findings.append(
            Finding(
                rule, severity, rfc, message, seq, command, _who(direction) if direction else None
            )
        )

    def finish(self) -> list[Finding]:
        """Close the books: unanswered commands and the exact bare-LF counts."""
        for ex in self._builder.unfinished():
            if ex.kind == "command" and ex.status is None:
                verb = ex.command or "?"
                if self._closed_by.get("s") == "popproxy":
                    self.add(
                        "cut-by-popproxy",
                        ADVICE,
                        "-",
                        f"{verb} got no reply: popproxy ended the session first",
                        ex.seq,
                        verb,
                        "p",
                    )
                elif verb == "QUIT":
                    self.add(
                        "quit-not-ok",
                        WARNING,
                        "RFC 1939 §6",
                        "QUIT got no reply before the connection closed",
                        ex.seq,
                        verb,
                        "s",
                    )
                else:
                    self.add(
                        "no-reply",
                        WARNING,
                        "RFC 1939 §3",
                        f"{verb} got no reply before the connection closed",
                        ex.seq,
                        verb,
                        "s",
                    )
        for d in ("c", "s"):
            bare = self._lf[d] - self._crlf[d]
            if bare > 0:
                self.add(
                    "bare-lf",
                    WARNING,
                    "RFC 1939 §3",
                    f"{bare} of {self._lf[d]} lines sent by the {_who(d)} end in a bare LF",
                    self._bare_seq.get(d),
                    None,
                    d,
                )
        for rule, n in sorted(self.suppressed.items()):
            self.findings.append(
                Finding(rule, ADVICE, "-", f"{n} more '{rule}' findings not shown")
            )
        return sorted(self.findings, key=lambda f: (f.seq is None, f.seq or 0))


def _long_initial_response(event: Command) -> bool:
    """RFC 5034 §4: an AUTH line with its initial response may not exceed 255 octets."""
    words = (event.args or "").split(" ")
    return event.verb == "AUTH" and len(words) > 1 and len(event.raw) > 255


def _valid_uid(uid: str) -> bool:
    """RFC 1939 §7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E."""
    return 1 <= len(uid) <= 70 and all("!" <= ch <= "~" for ch in uid)


def worst(findings: list[Finding]) -> Severity | None:
    """The highest severity among ``findings``."""
    if not findings:
        return None
    return max((f.severity for f in findings), key=lambda s: RANK[s])
