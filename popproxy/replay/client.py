"""The replay engine: plays a capture's client side against a live server, in lock-step."""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from popproxy.core import (
    Command,
    ConnectionClosed,
    Direction,
    Event,
    Greeting,
    Observer,
    SaslChallenge,
    credentials,
)
from popproxy.core import sasl as sasl_codec
from popproxy.core.transcript import Exchange, TranscriptBuilder
from popproxy.hints import Leg
from popproxy.netutil import STREAM_ERRORS, describe_error, format_hostport, is_ip
from popproxy.replay import auth, sasl_client
from popproxy.replay.auth import AuthError, Credentials
from popproxy.replay.compare import Difference, compare_exchanges, label
from popproxy.replay.script import RecordedSession, Step

C, S = Direction.CLIENT, Direction.SERVER
CHUNK = 65536
LOGIN_VERBS = frozenset({"PASS", "APOP", "AUTH", "RPOP"})
NUMBERED_VERBS = frozenset({"RETR", "TOP", "DELE", "LIST", "UIDL"})


class ReplayError(Exception):
    """The replay could not run (unreachable server, refused login...): exit code 2."""


class _ServerGone(Exception):
    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


@dataclass
class ReplayOptions:
    """How to reach the live server and how faithful the replay should be."""

    server: tuple[str, int]
    credentials: Credentials = field(default_factory=lambda: Credentials(None, None))
    strict: bool = False
    commit_deletes: bool = False
    timeout: float = 10.0
    tls: bool = False  # implicit TLS (RFC 8314)
    stls: bool = False  # upgrade with STLS first (RFC 2595 §4)
    context: ssl.SSLContext | None = None
    token: str | None = None  # a fresh bearer token for XOAUTH2 / OAUTHBEARER


@dataclass
class Outcome:
    """One exchange: the recorded and the live answer, and how they differ."""

    label: str
    recorded: Exchange | None
    live: Exchange | None
    differences: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inserted: bool = False  # sent by the replay itself (RSET, STLS): never compared

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.label,
            "inserted": self.inserted,
            "equal": not self.differences,
            "differences": [d.to_json() for d in self.differences],
            "notes": self.notes,
            "recorded": self.recorded.to_json() if self.recorded else None,
            "live": self.live.to_json() if self.live else None,
        }


@dataclass
class ReplayReport:
    """The result of replaying one capture."""

    capture: Path
    server: str
    outcomes: list[Outcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def differences(self) -> int:
        return sum(len(o.differences) for o in self.outcomes)

    @property
    def equivalent(self) -> bool:
        return self.differences == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "capture": str(self.capture),
            "server": self.server,
            "equivalent": self.equivalent,
            "differences": self.differences,
            "notes": self.notes,
            "exchanges": [o.to_json() for o in self.outcomes],
        }


class _Live:
    """The live connection seen through popproxy's own observer (the same framing rules)."""

    def __init__(self, stream: trio.abc.Stream, timeout: float) -> None:
        self.stream = stream
        self.timeout = timeout
        self.observer = Observer()
        self.builder = TranscriptBuilder(hash_bodies=True, keep_listings=True)
        self.greeting: Greeting | None = None
        self.greeting_exchange: Exchange | None = None
        self.done: dict[int, Exchange] = {}
        self.challenges: dict[int, deque[bytes | None]] = {}
        self.closed = False
        self._t0 = trio.current_time()

    def _take(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Greeting):
                self.greeting = event
            elif isinstance(event, SaslChallenge):
                self.challenges.setdefault(event.seq, deque()).append(event.data)
            elif isinstance(event, ConnectionClosed) and event.direction is S:
                self.closed = True
        for item in self.builder.feed(trio.current_time() - self._t0, events):
            ex = item.exchange
            if item.what == "done" and ex is not None:
                if ex.kind == "greeting":
                    self.greeting_exchange = ex
                elif ex.seq is not None:
                    self.done[ex.seq] = ex

    async def send(self, data: bytes) -> list[int]:
        """Send client bytes; returns the observer's sequence numbers of the commands in them."""
        events = self.observer.receive_data(C, data)
        self._take(events)
        try:
            with trio.fail_after(self.timeout):
                await self.stream.send_all(data)
        except trio.TooSlowError:
            raise _ServerGone(f"the server took no data for {self.timeout:g} s") from None
        except STREAM_ERRORS:
            self._take(self.observer.receive_data(S, b""))
            raise _ServerGone("the server closed the connection") from None
        return [e.seq for e in events if isinstance(e, Command)]

    async def wait(self, ready: Callable[[], bool], what: str) -> None:
        while not ready():
            if self.closed:
                raise _ServerGone(f"the server closed the connection before {what}")
            try:
                with trio.fail_after(self.timeout):
                    data = bytes(await self.stream.receive_some(CHUNK))
            except trio.TooSlowError:
                raise _ServerGone(f"no answer to {what} within {self.timeout:g} s") from None
            except STREAM_ERRORS:
                data = b""
            self._take(self.observer.receive_data(S, data))

    async def start_tls(self, host: str, context: ssl.SSLContext) -> None:
        sni = None if is_ip(host) else host
        tls = trio.SSLStream(self.stream, context, server_hostname=sni, https_compatible=True)
        try:
            with trio.fail_after(self.timeout):
                await tls.do_handshake()
        except trio.TooSlowError:
            raise ReplayError(f"TLS handshake timed out after {self.timeout:g} s") from None
        except STREAM_ERRORS as exc:
            reason = describe_error(exc, Leg.UPSTREAM, ca_flag="--ca")
            raise ReplayError(f"TLS handshake failed: {reason}") from None
        self.stream = tls
        self._take(self.observer.start_tls(S))
        self._take(self.observer.start_tls(C))

    async def close(self) -> None:
        with trio.move_on_after(1), trio.CancelScope(shield=True):
            try:
                await self.stream.aclose()
            except (*STREAM_ERRORS, trio.BusyResourceError):
                pass


def needs_password(session: RecordedSession) -> bool:
    """Whether the capture's login had its secret redacted (so replay must be told it)."""
    for step in session.steps:
        if step.verb in ("PASS", "RPOP") and auth.is_masked(step.args):
            return True
        if step.verb == "APOP":
            return True
        if step.verb == "AUTH" and step.mechanism:
            return step.mechanism not in sasl_codec.OAUTH_MECHANISMS
    return False


def needs_token(session: RecordedSession) -> bool:
    """Whether the capture logged in with a bearer token (XOAUTH2, OAUTHBEARER)."""
    return any(
        s.verb == "AUTH" and s.mechanism in sasl_codec.OAUTH_MECHANISMS for s in session.steps
    )


def check_mechanisms(session: RecordedSession) -> None:
    """Refuse, before connecting, SASL mechanisms whose answers popproxy cannot compute."""
    for step in session.steps:
        mech = step.mechanism
        if mech is None:
            continue
        why = sasl_client.refusal(mech)
        if why is not None:
            raise AuthError(why)
        if mech not in auth.SUPPORTED_MECHANISMS + sasl_client.MODERN_MECHANISMS:
            names = auth.SUPPORTED_MECHANISMS + sasl_client.MODERN_MECHANISMS
            raise AuthError(f"cannot replay AUTH {mech}: popproxy answers {', '.join(names)} only")


def batches(steps: list[Step]) -> list[list[Step]]:
    """Group steps sent together: a pipelined batch stays one send (RFC 2449 §6.6).

    AUTH and STLS always stand alone: the replay must see their answer before going on.
    """
    out: list[list[Step]] = []
    for step in steps:
        alone = step.verb in ("AUTH", "STLS")
        if (
            out
            and not alone
            and out[-1][-1].batch == step.batch
            and out[-1][-1].verb not in ("AUTH", "STLS")
        ):
            out[-1].append(step)
        else:
            out.append([step])
    return out


async def replay_session(session: RecordedSession, options: ReplayOptions) -> ReplayReport:
    """Connect, play every recorded command, compare every answer; see ``ReplayReport``."""
    check_mechanisms(session)
    host, port = options.server
    report = ReplayReport(session.path, format_hostport(host, port))
    try:
        with trio.fail_after(options.timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise ReplayError(
            f"cannot reach {report.server}: timed out after {options.timeout:g} s"
        ) from None
    except OSError as exc:
        raise ReplayError(f"cannot reach {report.server}: {describe_error(exc)}") from None
    live = _Live(stream, options.timeout)
    try:
        await _Replayer(session, options, live, report).run()
    finally:
        await live.close()
    return report


class _Replayer:
    def __init__(
        self, session: RecordedSession, options: ReplayOptions, live: _Live, report: ReplayReport
    ) -> None:
        self.session = session
        self.options = options
        self.live = live
        self.report = report
        self.seqs: dict[int, int] = {}  # recorded seq -> live seq
        self.deletes = 0
        self.logged_in = False
        self.step_outcomes: dict[int, Outcome] = {}  # recorded seq -> outcome
        self.auth_problems: dict[int, list[str]] = {}  # recorded seq -> what did not verify

    async def run(self) -> None:
        live, options, session = self.live, self.options, self.session
        host = options.server[0]
        if options.tls:
            await live.start_tls(host, self._context())
        try:
            await live.wait(lambda: live.greeting is not None, "its greeting")
        except _ServerGone as exc:
            raise ReplayError(exc.why) from None
        self._outcome("greeting", session.greeting_exchange, live.greeting_exchange)
        steps = list(session.steps)
        if options.stls:
            await self._own_stls(host)
        if options.stls or options.tls:
            # TLS is up already: the server would answer a recorded STLS "-ERR TLS is
            # already active" (RFC 2595 §4 allows one upgrade per connection).
            skipped = [s for s in steps if s.verb == "STLS"]
            steps = [s for s in steps if s.verb != "STLS"]
            if skipped:
                self.report.notes.append(
                    f"the recorded STLS (exchange {skipped[0].seq}) was not sent: TLS was "
                    f"already up ({'--stls' if options.stls else '--tls'})"
                )
        groups = batches(steps)
        for index, group in enumerate(groups):
            try:
                if group[0].verb == "AUTH":
                    await self._auth(group[0])
                else:
                    await self._batch(group)
            except _ServerGone as exc:
                if not self.logged_in and any(s.verb in LOGIN_VERBS for s in steps):
                    raise ReplayError(exc.why) from None
                self.report.notes.append(exc.why)
                for step in [s for g in groups[index:] for s in g]:
                    self._compare_step(step, missing=exc.why)
                break
            for step in group:
                self._compare_step(step)
                if step.verb == "STLS" and self._live_ok(step) and step.tls_after:
                    await live.start_tls(host, self._context())
        self._number_notes()

    # ------------------------------------------------------------------ sending

    async def _batch(self, group: list[Step]) -> None:
        lines: list[bytes] = []
        inserted: list[str] = []
        for step in group:
            if step.verb == "QUIT" and self.deletes and not self.options.commit_deletes:
                lines.append(b"RSET\r\n")
                inserted.append("RSET")
            lines.append(self._line(step))
            if step.verb == "DELE":
                self.deletes += 1
        seqs = await self.live.send(b"".join(lines))
        owners: list[Step | str] = []
        for step in group:
            if step.verb == "QUIT" and inserted:
                owners.append(inserted.pop(0))
            owners.append(step)
        rset_seq: int | None = None
        for owner, seq in zip(owners, seqs, strict=False):
            if isinstance(owner, Step):
                self.seqs[owner.seq] = seq
            else:
                rset_seq = seq
        for owner, seq in zip(owners, seqs, strict=False):
            label = owner.command_text if isinstance(owner, Step) else owner
            await self.live.wait(
                lambda seq=seq: seq in self.live.done,  # type: ignore[misc]
                f"{label}",
            )
            if isinstance(owner, Step):
                self._check_login(owner)
        if rset_seq is not None:
            ex = self.live.done.get(rset_seq)
            self.report.outcomes.append(
                Outcome(
                    "RSET",
                    None,
                    ex,
                    inserted=True,
                    notes=[
                        f"sent before QUIT so the {self.deletes} deletion(s) are not made "
                        "permanent (--commit-deletes replays them)"
                    ],
                )
            )

    def _line(self, step: Step) -> bytes:
        creds = self.options.credentials
        eol = b"\r\n" if step.line.endswith(b"\r\n") else b"\n"
        verb = credentials.split_command(step.line.rstrip(b"\r\n")).verb_raw
        if step.verb == "USER" and creds.user:
            return verb + b" " + creds.user.encode() + eol
        if step.verb in ("PASS", "RPOP"):
            if creds.password is not None:
                return verb + b" " + creds.password.encode() + eol
            if auth.is_masked(step.args):
                raise ReplayError(
                    f"the capture's {step.verb} argument was redacted: give the "
                    "password (POPPROXY_PASSWORD, --password-file, --password)"
                )
        if step.verb == "APOP":
            return verb + b" " + self._apop_args().encode() + eol
        return step.line

    def _apop_args(self) -> str:
        greeting = self.live.greeting
        timestamp = greeting.apop_timestamp if greeting is not None else None
        if not timestamp:
            raise ReplayError(
                "the server's greeting has no APOP timestamp (RFC 1939 §7): it does not offer APOP"
            )
        user = self._user()
        password = self.options.credentials.password
        if password is None:
            raise ReplayError(
                "APOP needs the password (POPPROXY_PASSWORD, --password-file, --password)"
            )
        return f"{user} {auth.apop_digest(timestamp, password)}"

    def _user(self) -> str:
        user = self.options.credentials.user or self.session.user
        if not user:
            raise ReplayError("the capture does not name the user: give --user")
        return user

    async def _auth(self, step: Step) -> None:
        """SASL (RFC 5034 §4): answer each live challenge as the recorded client did."""
        mech = step.mechanism or ""
        if mech in sasl_client.MODERN_MECHANISMS:
            await self._auth_modern(step, mech)
            return
        password = self.options.credentials.password
        if password is None:
            raise ReplayError(
                f"AUTH {mech} needs the password (POPPROXY_PASSWORD, --password-file, --password)"
            )
        user = self._user()
        ir = step.initial_response
        first = f"AUTH {mech}"
        answered = 0
        if ir is not None:
            if ir == "=":
                first += " ="
            elif mech == "PLAIN":
                first += " " + auth.plain_response(user, password)
            elif mech == "LOGIN":
                first += " " + auth.login_response(None, 0, user, password)
                answered = 1
            else:
                first += " " + ir
        seqs = await self.live.send(first.encode() + b"\r\n")
        if not seqs:
            raise ReplayError("the AUTH command could not be framed")
        seq = self.seqs[step.seq] = seqs[0]
        recorded = [raw for kind, raw in step.sasl if kind == "c"]
        queue = self.live.challenges.setdefault(seq, deque())
        turn = 0
        while True:
            await self.live.wait(lambda: bool(queue) or seq in self.live.done, step.command_text)
            if seq in self.live.done:
                break
            challenge = queue.popleft()
            wanted = recorded[turn].rstrip(b"\r\n") if turn < len(recorded) else b"*"
            if wanted in (b"*", b""):
                answer = wanted.decode()
            elif mech == "PLAIN":
                answer = auth.plain_response(user, password)
            elif mech == "LOGIN":
                answer = auth.login_response(challenge, answered, user, password)
                answered += 1
            else:
                answer = auth.cram_md5_response(user, password, challenge or b"")
            turn += 1
            await self.live.send(answer.encode() + b"\r\n")
        self._check_login(step)

    async def _auth_modern(self, step: Step, mech: str) -> None:
        """SCRAM and OAuth: the same shape as recorded (initial response or not), fresh data."""
        host, port = self.options.server
        try:
            client = sasl_client.client_mechanism(
                mech,
                user=self._user(),
                password=self.options.credentials.password,
                token=self.options.token,
                host=host,
                port=port,
            )
        except ValueError as exc:
            raise ReplayError(str(exc)) from None
        one_line = step.initial_response not in (None, "=")
        first = f"AUTH {mech}".encode()
        if one_line:
            first += b" " + sasl_codec.b64(client.initial()).encode()
        seqs = await self.live.send(first + b"\r\n")
        if not seqs:
            raise ReplayError("the AUTH command could not be framed")
        seq = self.seqs[step.seq] = seqs[0]
        queue = self.live.challenges.setdefault(seq, deque())
        sent_initial = one_line
        while True:
            await self.live.wait(lambda: bool(queue) or seq in self.live.done, step.command_text)
            if seq in self.live.done:
                break
            challenge = queue.popleft()
            if not sent_initial:
                # RFC 5034 §4: the empty challenge asks for the initial response.
                answer: bytes | None = client.initial()
                sent_initial = True
            else:
                answer = client.answer(challenge)
            if answer == b"*":
                line = b"*"
            else:
                line = b"" if answer is None else sasl_codec.b64(answer).encode()
            await self.live.send(line + b"\r\n")
        live = self.live.done.get(seq)
        client.finished(live is not None and live.status == "+OK")
        if client.problems:
            self.auth_problems[step.seq] = client.problems
        else:
            self._check_login(step)

    async def _own_stls(self, host: str) -> None:
        seqs = await self.live.send(b"STLS\r\n")
        seq = seqs[0]
        try:
            await self.live.wait(lambda: seq in self.live.done, "STLS")
        except _ServerGone as exc:
            raise ReplayError(exc.why) from None
        ex = self.live.done[seq]
        if ex.status != "+OK":
            raise ReplayError(f"the server refused STLS: {ex.status} {ex.text or ''}".strip())
        self.report.outcomes.append(
            Outcome("STLS", None, ex, inserted=True, notes=["sent by --stls"])
        )
        await self.live.start_tls(host, self._context())

    def _context(self) -> ssl.SSLContext:
        if self.options.context is None:
            from popproxy.tls.contexts import client_context

            self.options.context = client_context()
        return self.options.context

    # ------------------------------------------------------------------ judging

    def _live_ok(self, step: Step) -> bool:
        seq = self.seqs.get(step.seq)
        ex = self.live.done.get(seq) if seq is not None else None
        return ex is not None and ex.status == "+OK"

    def _check_login(self, step: Step) -> None:
        if step.verb not in LOGIN_VERBS or step.status != "+OK":
            return
        seq = self.seqs.get(step.seq)
        ex = self.live.done.get(seq) if seq is not None else None
        if ex is None or ex.status == "+OK":
            self.logged_in = self.logged_in or ex is not None
            return
        reply = " ".join(x for x in (ex.status, f"[{ex.code}]" if ex.code else None, ex.text) if x)
        raise ReplayError(f"login refused: {step.verb} was answered {reply}")

    def _compare_step(self, step: Step, missing: str | None = None) -> None:
        seq = self.seqs.get(step.seq)
        live = self.live.done.get(seq) if seq is not None else None
        outcome = self._outcome(step.command_text, step.exchange, live)
        for problem in self.auth_problems.get(step.seq, ()):
            outcome.differences.append(
                Difference(step.seq, "sasl.server-signature", "verified", "not verified", problem)
            )
        self.step_outcomes[step.seq] = outcome
        if live is None and missing is not None and step.status is not None:
            outcome.notes.append("not replayed: " + missing)

    def _outcome(self, label: str, recorded: Exchange | None, live: Exchange | None) -> Outcome:
        found = compare(recorded, live, strict=self.options.strict)
        outcome = Outcome(label, recorded, live, found)
        self.report.outcomes.append(outcome)
        return outcome

    def _number_notes(self) -> None:
        """When message numbers moved (RFC 1939 §7: UIDs are stable), say so using UIDL."""
        recorded_uids = _uid_map(s.exchange for s in self.session.steps)
        live_uids = _uid_map(self.live.done.values())
        if not recorded_uids or not live_uids:
            return
        where_now = {uid: n for n, uid in live_uids.items()}
        moved = [
            (uid, n, where_now.get(uid))
            for n, uid in sorted(recorded_uids.items())
            if where_now.get(uid) != n
        ]
        new = [uid for uid in where_now if uid not in set(recorded_uids.values())]
        for uid, was, now in moved:
            if now is None:
                self.report.notes.append(f"message {was} (UID {uid}) is gone from the server")
            else:
                self.report.notes.append(
                    f"message numbers moved: UID {uid} was message {was}, now {now}"
                )
        if new:
            self.report.notes.append(
                f"{len(new)} message(s) not in the recording: UID " + ", ".join(new[:10])
            )
        for step in self.session.steps:
            outcome = self.step_outcomes.get(step.seq)
            first = (step.args or "").split(" ")[0]
            if outcome is not None and step.verb in NUMBERED_VERBS and first.isdigit():
                number = int(first)
                known = recorded_uids.get(number)
                if known is not None and where_now.get(known) != number:
                    at = where_now.get(known)
                    outcome.notes.append(
                        f"recorded message {number} (UID {known}) is "
                        + (f"message {at} now" if at is not None else "gone")
                    )


def compare(
    recorded: Exchange | None, live: Exchange | None, *, strict: bool = False
) -> list[Difference]:
    """``compare_exchanges``, plus the cases where one side never answered."""
    if live is None:
        if recorded is None or recorded.status is None:
            return []
        return [
            Difference(
                recorded.seq, "exchange", label(recorded), None, "no answer from the live server"
            )
        ]
    if recorded is None:
        return [Difference(None, "exchange", None, label(live), "not in the recording")]
    return compare_exchanges(recorded, live, strict=strict)


def _uid_map(exchanges: Any) -> dict[int, str]:
    """Message number → UID from the first full UIDL listing among ``exchanges``."""
    for ex in exchanges:
        if ex is None or ex.command != "UIDL" or ex.args or ex.status != "+OK":
            continue
        out: dict[int, str] = {}
        for fields in ex.listing or ():
            if len(fields) >= 2 and str(fields[0]).isdigit():
                out[int(fields[0])] = str(fields[1])
        return out
    return {}
