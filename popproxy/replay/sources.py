"""Where a fake mailbox's messages come from: recorded sessions, a Maildir, an mbox, .eml files."""

from __future__ import annotations

import hashlib
import mailbox as stdlib_mailbox
import re
from dataclasses import dataclass, field
from pathlib import Path

from popproxy.capture import format as fmt
from popproxy.capture.format import CaptureError
from popproxy.replay.script import HeldBytes, RecordedSession, Step, load_session

# RFC 1939 §7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
_UID_RE = re.compile(r"^[\x21-\x7e]{1,70}$")
KNOWN_VERBS = frozenset(
    [
        "USER",
        "PASS",
        "APOP",
        "AUTH",
        "CAPA",
        "STLS",
        "QUIT",
        "STAT",
        "LIST",
        "UIDL",
        "RETR",
        "TOP",
        "DELE",
        "RSET",
        "NOOP",
        "RPOP",
        "LANG",
        "UTF8",
    ]
)
MESSAGE_VERBS = frozenset({"LIST", "UIDL", "RETR", "TOP", "DELE"})


@dataclass
class StoredMessage:
    """One message as the recordings (or files) know it; any part may be unknown."""

    uid: str | None = None
    size: int | None = None
    data: bytes | None = None  # the exact octets, dot-unstuffed, CRLF line ends
    tops: dict[int, bytes] = field(default_factory=dict)  # TOP n m: m -> unstuffed reply
    origin: str = ""  # where it was seen, for near-miss reports
    seen_in: set[str] = field(default_factory=set)  # verbs that showed this message

    @property
    def octets(self) -> int | None:
        """The size a server reports: the recorded one, else the octets' length."""
        if self.size is not None:
            return self.size
        return None if self.data is None else len(self.data)


@dataclass
class Persona:
    """The recorded server's personality: greeting, capabilities and reply texts."""

    greeting: bytes | None = None
    capa_authorization: bytes | None = None  # the raw recorded CAPA reply before login
    capa_transaction: bytes | None = None
    texts: dict[str, str] = field(default_factory=dict)  # reply key -> status line template
    user: str | None = None


@dataclass
class MailboxSource:
    """Everything ``serve --mailbox`` rebuilt: messages in maildrop order and the persona."""

    messages: list[StoredMessage] = field(default_factory=list)
    persona: Persona = field(default_factory=Persona)
    origins: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # inconsistencies found while loading
    initial_stat: tuple[int, int] | None = None  # a recorded STAT before any deletion


def template(line: str, values: dict[str, int | str]) -> str:
    """A recorded status line with the values it carried replaced by ``{name}`` fields.

    ``"+OK 4 messages:"`` with ``count=4`` becomes ``"+OK {count} messages:"``; each value
    replaces its first free-standing occurrence, so the server's own wording is kept.
    """
    text = line.replace("{", "{{").replace("}", "}}")
    for name, value in values.items():
        pattern = rf"(?<![A-Za-z0-9{{]){re.escape(str(value))}(?![A-Za-z0-9}}])"
        text = re.sub(pattern, "{" + name + "}", text, count=1)
    return text


def unstuff(body: bytes) -> bytes:
    """A multi-line reply's body (after the status line) without the "." line, unstuffed."""
    lines = body.splitlines(keepends=True)
    if lines and lines[-1].rstrip(b"\r\n") == b".":
        lines.pop()
    # RFC 1939 §3: a line starting with the termination octet had one more prepended.
    return b"".join(line[1:] if line.startswith(b".") else line for line in lines)


def _status_and_body(reply: bytes) -> tuple[str, bytes]:
    first, _, rest = reply.partition(b"\n")
    return first.rstrip(b"\r").decode("utf-8", "backslashreplace"), rest


def _listing(body: bytes) -> dict[int, str]:
    out: dict[int, str] = {}
    for line in unstuff(body).splitlines():
        parts = line.decode("utf-8", "backslashreplace").split()
        if len(parts) >= 2 and parts[0].isdigit():
            out[int(parts[0])] = parts[1]
    return out


def _number(args: str | None, index: int = 0) -> int | None:
    parts = (args or "").split()
    if len(parts) > index and parts[index].isdigit():
        return int(parts[index])
    return None


class _SessionReader:
    """Walks one recorded session and collects what it showed about each message number."""

    def __init__(self, session: RecordedSession) -> None:
        self.session = session
        self.by_number: dict[int, StoredMessage] = {}
        self.texts: dict[str, str] = {}
        self.stat: tuple[int, int] | None = None
        self.logged_in = False
        self.capa_authorization: bytes | None = None
        self.capa_transaction: bytes | None = None
        self.deleted: set[int] = set()
        self.committed = False
        self.count: int | None = None  # messages in the maildrop, once STAT or LIST said
        for step in session.steps:
            if step.status == "+OK":
                self._step(step)
            elif step.status == "-ERR":
                self._error(step)

    def _error(self, step: Step) -> None:
        """Recorded -ERR wordings the mailbox can reuse (RFC 1939 §5 leaves the text free)."""
        status, _ = _status_and_body(step.reply)
        n = _number(step.args)
        if step.verb in ("PASS", "APOP"):
            self.texts.setdefault("ERR-AUTH", status)
        elif step.verb not in KNOWN_VERBS and step.verb:
            self.texts.setdefault("ERR-UNKNOWN", template(status, {"verb": step.verb}))
        elif step.verb in MESSAGE_VERBS and n is not None:
            if n in self.deleted:
                self.texts.setdefault("ERR-DELETED", template(status, {"msg": n}))
            elif self.count is not None and (n < 1 or n > self.count):
                self.texts.setdefault("ERR-NOMSG", template(status, {"msg": n}))

    def _message(self, n: int, verb: str) -> StoredMessage:
        message = self.by_number.setdefault(n, StoredMessage(origin=f"{self.session.path}"))
        message.seen_in.add(verb)
        return message

    def _step(self, step: Step) -> None:
        verb, args = step.verb, step.args
        status, body = _status_and_body(step.reply)
        n = _number(args)
        if verb in ("PASS", "APOP", "AUTH"):
            self.logged_in = True
            self.texts.setdefault("LOGIN", status)
        elif verb == "CAPA":
            if self.logged_in:
                self.capa_transaction = step.reply
            else:
                self.capa_authorization = step.reply
        elif verb == "STAT":
            parts = status.split()
            if len(parts) >= 3 and parts[1].isdigit() and parts[2].isdigit():
                count, total = int(parts[1]), int(parts[2])
                if not self.deleted and self.stat is None:
                    self.stat = (count, total)
                self.count = count
                self.texts.setdefault("STAT", template(status, {"count": count, "size": total}))
        elif verb in ("LIST", "UIDL") and n is None:
            listing = _listing(body)
            self.count = max(listing, default=0) if verb == "LIST" else self.count
            for number, value in listing.items():
                message = self._message(number, verb)
                if verb == "LIST" and value.isdigit():
                    message.size = int(value)
                elif verb == "UIDL":
                    message.uid = value
            if verb == "LIST" and not self.deleted:
                total = sum(int(v) for v in listing.values() if v.isdigit())
                self.texts.setdefault(
                    "LIST", template(status, {"count": len(listing), "size": total})
                )
            elif verb == "UIDL":
                self.texts.setdefault("UIDL", status)
        elif verb in ("LIST", "UIDL") and n is not None:
            parts = status.split()
            if len(parts) >= 3:
                message = self._message(n, verb)
                if verb == "LIST" and parts[2].isdigit():
                    message.size = int(parts[2])
                    self.texts.setdefault(
                        "LIST1", template(status, {"msg": n, "size": message.size})
                    )
                elif verb == "UIDL":
                    message.uid = parts[2]
                    self.texts.setdefault("UIDL1", template(status, {"msg": n, "uid": parts[2]}))
        elif verb == "RETR" and n is not None:
            message = self._message(n, verb)
            message.data = unstuff(body)
            self.texts.setdefault("RETR", template(status, {"size": len(message.data)}))
        elif verb == "TOP" and n is not None:
            lines = _number(args, 1)
            if lines is not None:
                self._message(n, verb).tops[lines] = unstuff(body)
                self.texts.setdefault("TOP", status)
        elif verb == "DELE" and n is not None:
            self.deleted.add(n)
            self.texts.setdefault("DELE", template(status, {"msg": n}))
        elif verb == "QUIT":
            key = "QUIT" if self.logged_in else "QUIT-AUTHORIZATION"
            if self.logged_in and self.deleted:
                key = "QUIT-DELETED"
                self.committed = True
            self.texts.setdefault(key, status)
        elif verb in ("USER", "RSET", "NOOP", "STLS"):
            self.texts.setdefault(verb, status)


def from_sessions(sessions: list[RecordedSession]) -> MailboxSource:
    """Rebuild one mailbox from recorded sessions (messages merged by UID, in first-seen order)."""
    source = MailboxSource()
    by_uid: dict[str, StoredMessage] = {}
    persona = source.persona
    for session in sessions:
        source.origins.append(str(session.path))
        reader = _SessionReader(session)
        if persona.greeting is None:
            persona.greeting = session.greeting
        persona.capa_authorization = persona.capa_authorization or reader.capa_authorization
        persona.capa_transaction = persona.capa_transaction or reader.capa_transaction
        persona.user = persona.user or session.user
        for key, text in reader.texts.items():
            persona.texts.setdefault(key, text)
        if source.initial_stat is None and not source.messages:
            source.initial_stat = reader.stat
        for n in sorted(reader.by_number):
            seen = reader.by_number[n]
            seen.origin = f"{session.path} message {n}"
            known = _find(source.messages, by_uid, seen, n)
            if known is None:
                source.messages.append(seen)
                if seen.uid is not None:
                    by_uid[seen.uid] = seen
                continue
            _merge(known, seen, source.notes)
            if known.uid is None and seen.uid is not None:
                known.uid = seen.uid
                by_uid[seen.uid] = known
        if reader.stat is not None and not by_uid and len(source.messages) < reader.stat[0]:
            for _ in range(reader.stat[0] - len(source.messages)):
                source.messages.append(StoredMessage(origin=f"{session.path} STAT"))
    return source


def _find(
    messages: list[StoredMessage],
    by_uid: dict[str, StoredMessage],
    seen: StoredMessage,
    n: int,
) -> StoredMessage | None:
    if seen.uid is not None:
        return by_uid.get(seen.uid)
    if seen.data is not None:
        digest = hashlib.sha256(seen.data).digest()
        for message in messages:
            if message.data is not None and hashlib.sha256(message.data).digest() == digest:
                return message
    # No UID, no octets to compare: the same message number in an unchanged maildrop.
    if n <= len(messages):
        candidate = messages[n - 1]
        if candidate.octets is None or seen.octets is None or candidate.octets == seen.octets:
            return candidate
    return None


def _merge(known: StoredMessage, seen: StoredMessage, notes: list[str]) -> None:
    if seen.data is not None:
        if known.data is None:
            known.data = seen.data
        elif known.data != seen.data:
            notes.append(
                f"{seen.origin}: octets differ from {known.origin} (uid {known.uid}); "
                "the first recording wins"
            )
    if known.size is None:
        known.size = seen.size
    for lines, data in seen.tops.items():
        known.tops.setdefault(lines, data)
    known.seen_in |= seen.seen_in


# ------------------------------------------------------------------ mail files


def crlf(data: bytes) -> bytes:
    """RFC 1939 §3: octets on the wire end lines in CRLF (a bare LF becomes CRLF)."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", data)


def _uid_for(name: str, data: bytes) -> str:
    if _UID_RE.match(name):
        return name
    return hashlib.sha256(data).hexdigest()[:40]


def _read(file: Path, held: HeldBytes) -> bytes:
    """A mail file's octets, counted against what the fake mailbox may hold in memory."""
    held.add(file.stat().st_size, file)
    return crlf(file.read_bytes())


def from_maildir(path: Path, held: HeldBytes | None = None) -> MailboxSource:
    """A Maildir's ``new`` and ``cur`` messages by file name; the UID is the base name."""
    held = held or HeldBytes()
    source = MailboxSource(origins=[str(path)])
    files = [p for sub in ("new", "cur") for p in (path / sub).iterdir() if p.is_file()]
    for file in sorted(files, key=lambda p: p.name):
        data = _read(file, held)
        base = file.name.split(":", 1)[0]  # the Maildir info (":2,S") is not part of the name
        source.messages.append(StoredMessage(uid=_uid_for(base, data), data=data, origin=str(file)))
    return source


def from_mbox(path: Path, held: HeldBytes | None = None) -> MailboxSource:
    """An mbox file's messages in file order (stdlib ``mailbox``); the UID is a digest."""
    (held or HeldBytes()).add(path.stat().st_size, path)
    source = MailboxSource(origins=[str(path)])
    box = stdlib_mailbox.mbox(str(path), create=False)
    try:
        for key in box.iterkeys():
            data = crlf(box.get_bytes(key))
            uid = hashlib.sha256(data).hexdigest()[:40]
            source.messages.append(StoredMessage(uid=uid, data=data, origin=f"{path} #{key}"))
    finally:
        box.close()
    return source


def from_eml_folder(path: Path, held: HeldBytes | None = None) -> MailboxSource:
    """Each ``*.eml`` file of a folder, by name; the UID is the file's stem."""
    held = held or HeldBytes()
    source = MailboxSource(origins=[str(path)])
    for file in sorted(path.glob("*.eml")):
        data = _read(file, held)
        source.messages.append(
            StoredMessage(uid=_uid_for(file.stem, data), data=data, origin=str(file))
        )
    return source


def _is_capture(path: Path) -> bool:
    if path.suffix == fmt.SUFFIX:
        return True
    try:
        with path.open("rb") as f:
            return f.read(64).startswith(b'{"r":"' + fmt.HEADER.encode())
    except OSError:
        return False


def load_mailbox(targets: list[str]) -> MailboxSource:
    """``_load_mailbox``, with a file that cannot be read turned into one clear error."""
    try:
        return _load_mailbox(targets)
    except OSError as exc:
        where = exc.filename or " ".join(targets)
        raise CaptureError(f"{where}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, stdlib_mailbox.Error) as exc:  # a damaged mbox
        raise CaptureError(f"{' '.join(targets)}: not a readable mailbox ({exc})") from None


def _load_mailbox(targets: list[str]) -> MailboxSource:
    """One mailbox from captures, capture folders, Maildirs, mbox files and .eml files or folders.

    Recordings are merged first (they also give the persona); mail files follow in the
    order given.  Raises ``CaptureError`` for a target that holds no mail at all.
    """
    sessions: list[RecordedSession] = []
    files: list[MailboxSource] = []
    held = HeldBytes()  # mail files together; each capture has its own bound (load_session)
    for target in targets:
        path = Path(target).expanduser()
        if not path.exists():
            raise CaptureError(f"{target}: no such file or folder")
        if path.is_dir():
            if (path / "cur").is_dir() or (path / "new").is_dir():
                files.append(from_maildir(path, held))
            elif any(path.glob(f"*{fmt.SUFFIX}")):
                sessions.extend(load_session(p) for p in sorted(path.glob(f"*{fmt.SUFFIX}")))
            elif any(path.glob("*.eml")):
                files.append(from_eml_folder(path, held))
            else:
                raise CaptureError(
                    f"{target}: neither a Maildir (cur/, new/) nor a folder of captures or .eml"
                )
        elif _is_capture(path):
            sessions.append(load_session(path))
        elif path.suffix.lower() == ".eml":
            data = _read(path, held)
            files.append(
                MailboxSource(
                    messages=[
                        StoredMessage(uid=_uid_for(path.stem, data), data=data, origin=str(path))
                    ],
                    origins=[str(path)],
                )
            )
        else:
            with path.open("rb") as f:
                if not f.read(5) == b"From ":
                    raise CaptureError(
                        f"{target}: not a capture, an mbox (first line 'From ') or an .eml file"
                    )
            files.append(from_mbox(path, held))
    source = from_sessions(sessions) if sessions else MailboxSource()
    for extra in files:
        source.messages.extend(extra.messages)
        source.origins.extend(extra.origins)
    if files:
        source.initial_stat = None if sessions else source.initial_stat
    return source
