"""Three actors in the transcript: where each exchange's bytes lie, and popproxy's drops on them."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from popproxy.core.events import Direction, RawEvent
from popproxy.core.values import classify_status, split_code, strip_eol

MAX_RECENT = 256  # exchanges a drop record written after their bytes can still reach
MAX_AHEAD = 1024  # dropped spans kept for bytes the observer has not placed yet
MAX_DROPPED = 20  # distinct (side, why) entries kept per exchange
S = Direction.SERVER


@dataclass(frozen=True, slots=True)
class Hit:
    """Part of a drop that fell on one exchange's bytes."""

    direction: Direction
    octets: int
    why: str
    whole_status: bool  # this hit completed the drop of the exchange's whole status line


class Placed(Protocol):
    """What the tracker reads and writes of an exchange (core/transcript.py's ``Exchange``).

    Where its bytes lie: ``[lo, hi)`` in each direction's stream, -1 while it has none
    there, and its status line in the server's (docs/capture-format.md, "Streams and
    offsets"); plain fields, as one exchange is made per command on the relay's path.
    """

    status: str | None
    code: str | None
    text: str | None
    multiline: bool
    reply_by: str
    reply_why: str | None
    withheld: dict[str, Any] | None
    dropped: list[dict[str, Any]]
    t_reply: float | None
    t_end: float | None
    _c_lo: int
    _c_hi: int
    _s_lo: int
    _s_hi: int
    _status_lo: int
    _status_hi: int
    _status_dropped: int  # octets of the status line popproxy did not forward


E = TypeVar("E", bound=Placed)


@dataclass(slots=True)
class OwnLine:
    """popproxy's own line in the server's stream: the reply the client got when it starts
    where a withheld server reply ended."""

    offset: int
    status: str | None
    code: str | None
    text: str | None
    t: float
    why: str | None
    exchange: Any = None  # the unsolicited exchange made of it, if any
    batch: int = 0


class Actors(Generic[E]):
    """popproxy's drops placed on the exchanges whose bytes they cover (docs/show.schema.json).

    A drop record follows the data record holding its bytes, but the observer may place
    those bytes only later (a line split across chunks): a drop applies to the exchanges
    already placed over it and is kept for the bytes still to come. A server status line
    popproxy withheld whole is shown as withheld, and popproxy's line right where it ended
    as the reply the client got; either may come first, so what waits for the other is
    announced after the next batch of events that is not only drops. ``out`` collects
    ("withheld" | "done", exchange, time) for the views.
    """

    def __init__(self) -> None:
        self.dropped: list[dict[str, Any]] = []  # every drop of the session
        self.out: list[tuple[str, E, float]] = []
        self.batch = 0
        self.last_server: E | None = None  # the exchange the latest server bytes belong to
        self.recent: deque[E] = deque(maxlen=MAX_RECENT)  # later drops may reach these
        self.waiting = False  # something waits for the next batch (a drop, popproxy's line)
        self._ahead: list[list[tuple[int, int, str]]] = [[], []]  # spans not placed yet
        self._seen = [0, 0]  # each stream (client, server) placed up to here
        self._awaiting: E | None = None  # withheld; popproxy's line may take its place
        self._announce: tuple[E, int] | None = None  # its "withheld" item, and batch
        self._held: OwnLine | None = None  # popproxy's line right after a server reply

    def place(self, ex: E, event: RawEvent, t: float, status: bool = False) -> None:
        """``event``'s bytes belong to ``ex``: drops recorded before them now apply."""
        offset = event.offset
        end = offset + len(event.raw)
        seen = self._seen
        if event.direction is S:
            if ex._s_hi < 0:
                ex._s_lo = offset
            ex._s_hi = end
            self.last_server = ex
            if status:
                ex._status_lo, ex._status_hi = offset, end
            if end > seen[1]:
                seen[1] = end
        else:
            if ex._c_hi < 0:
                ex._c_lo = offset
            ex._c_hi = end
            if end > seen[0]:
                seen[0] = end
        if self._ahead[0] or self._ahead[1]:
            self._catch_up(ex, event.direction, offset, end, t)

    def _catch_up(self, ex: E, direction: Direction, offset: int, end: int, t: float) -> None:
        """Drops recorded before the observer placed these bytes."""
        i = direction is S
        ahead = self._ahead[i]
        for lo, hi, why in ahead:
            hit = _hit(ex, direction, max(lo, offset), min(hi, end), why)
            if hit is not None:
                self._apply(ex, hit, t)
        if ahead and ahead[0][1] <= end:
            self._ahead[i] = [s for s in ahead if s[1] > end]

    def drop(self, direction: Direction, offset: int, length: int, why: str, t: float) -> None:
        """A drop record: ``length`` bytes of ``direction``'s stream were not forwarded."""
        add_dropped(self.dropped, Hit(direction, length, why, False))
        i = direction is S
        end, seen = offset + length, self._seen[i]
        hits: list[tuple[E, Hit]] = []
        for ex in reversed(self.recent) if offset < seen else ():
            lo, hi = (ex._s_lo, ex._s_hi) if i else (ex._c_lo, ex._c_hi)
            if hi < 0:
                continue  # nothing of it in this stream yet (a command not answered)
            if hi <= offset:
                break  # exchanges lie in stream order: the rest end earlier still
            hit = _hit(ex, direction, max(offset, lo), min(end, seen, hi), why)
            if hit is not None:
                hits.append((ex, hit))
        for ex, hit in reversed(hits):
            self._apply(ex, hit, t)
        if end > seen:
            self._keep(i, max(offset, seen), end, why)

    def own_line(self, line: OwnLine, before: E | None) -> bool:
        """popproxy's line: True when it is the reply to a withheld exchange (now, or once
        a drop record says so), and so no line of its own in the transcript. ``before``:
        the exchange the server bytes before it belong to."""
        if self._replaces(line):
            return True
        if before is not None and before.withheld is None and before._s_hi == line.offset:
            line.batch = self.batch
            self._held, self.waiting = line, True  # a drop of ``before`` may follow
            return True
        return False

    @staticmethod
    def parse(offset: int, raw: bytes, t: float, why: str | None) -> OwnLine:
        """popproxy's bytes the observer did not read as a line (plaintext after STLS's
        ``+OK``, when the upstream handshake then failed): their first line."""
        status, _, rest = classify_status(strip_eol(raw.partition(b"\n")[0] + b"\n"))
        code, text = split_code(rest)
        return OwnLine(offset, status, code, text, t, why)

    def release(self, t: float) -> list[tuple[str, E, float]]:
        """A batch that is not only drops went by: what waited for one, to show first."""
        out: list[tuple[str, E, float]] = []
        held = self._held
        if held is not None and held.batch < self.batch:
            self._held = None
            if held.exchange is not None:
                out.append(("done", held.exchange, held.t))
        if self._announce is not None and self._announce[1] < self.batch:
            out.append(("withheld", self._announce[0], t))
            self._announce = None
        self.waiting = self._announce is not None or self._held is not None
        return out

    def held(self) -> list[E]:
        """popproxy's line still waiting for a drop (the capture ended there)."""
        held = self._held
        return [] if held is None or held.exchange is None else [held.exchange]

    def _replaces(self, line: OwnLine) -> bool:
        """popproxy's ``line`` is the reply the client got for the withheld exchange."""
        ex = self._awaiting
        if ex is None or ex._s_hi != line.offset:
            return False
        ex.status, ex.code, ex.text = line.status, line.code, line.text
        ex.reply_by, ex.reply_why, ex.t_reply = "popproxy", line.why, line.t
        self._awaiting = None
        if self._announce is not None and self._announce[0] is ex:
            self._announce = None
        self.waiting = self._announce is not None or self._held is not None
        self.out.append(("withheld", ex, line.t))
        return True

    def _apply(self, ex: E, hit: Hit, t: float) -> None:
        add_dropped(ex.dropped, hit)
        if hit.whole_status and ex.withheld is None and ex.reply_by == "server":
            self._withhold(ex, hit.why, t)

    def _withhold(self, ex: E, why: str, t: float) -> None:
        """popproxy kept ``ex``'s whole status line from the client."""
        ex.withheld = {
            "status": ex.status,
            "code": ex.code,
            "text": ex.text,
            "multiline": ex.multiline,
            "t": ex.t_reply,
            "why": why,
        }
        ex.status = ex.code = ex.text = None
        ex.reply_by, ex.reply_why = "popproxy", why
        self._awaiting, self._announce = ex, (ex, self.batch)
        self.waiting = True
        held, self._held = self._held, None
        if held is not None and not self._replaces(held) and held.exchange is not None:
            self.out.append(("done", held.exchange, held.t))

    def _keep(self, i: bool, lo: int, hi: int, why: str) -> None:
        ahead = self._ahead[i]
        if ahead and ahead[-1][1] == lo and ahead[-1][2] == why:
            ahead[-1] = (ahead[-1][0], hi, why)
            return
        if len(ahead) >= MAX_AHEAD:
            del ahead[0]  # a hostile capture's far-off drops: forget the oldest
        ahead.append((lo, hi, why))


def _hit(ex: Placed, direction: Direction, lo: int, hi: int, why: str) -> Hit | None:
    if hi <= lo:
        return None
    whole = False
    if direction is S and ex._status_hi >= 0:
        s_lo, s_hi = ex._status_lo, ex._status_hi
        overlap = min(hi, s_hi) - max(lo, s_lo)
        if overlap > 0:
            before = ex._status_dropped
            ex._status_dropped += overlap
            whole = before < s_hi - s_lo <= ex._status_dropped
    return Hit(direction, hi - lo, why, whole)


def add_dropped(dropped: list[dict[str, Any]], hit: Hit) -> None:
    """Count a hit in an exchange's ``dropped`` list: one entry per side and why."""
    side = "client" if hit.direction is Direction.CLIENT else "server"
    for entry in dropped:
        if entry["from"] == side and entry["why"] == hit.why:
            entry["octets"] += hit.octets
            return
    if len(dropped) < MAX_DROPPED:
        dropped.append({"from": side, "octets": hit.octets, "why": hit.why})
