"""Filter expressions over sessions (docs/browse.md): tokenizer, parser, printer, evaluator."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from popproxy.capture import format as fmt
from popproxy.capture.format import Record
from popproxy.capture.via import via_text
from popproxy.core import Event
from popproxy.core.transcript import Exchange, TranscriptBuilder

MAX_DEPTH = 64  # nesting of (), {} and !: deeper is refused, not a RecursionError
MAX_LINE = 64 * 1024  # ~b searches body lines; a longer line is searched in pieces

Scope = Literal["session", "exchange"]


@dataclass(frozen=True)
class Operator:
    """One ``~name``: whether it takes a pattern, and which level it describes."""

    name: str
    takes_arg: bool
    scope: Scope
    help: str


OPERATORS: dict[str, Operator] = {
    op.name: op
    for op in (
        Operator("all", False, "session", "every session"),
        Operator("u", True, "session", "user name (USER, APOP or the SASL identity)"),
        Operator("h", True, "session", "upstream host:port"),
        Operator("via", True, "session", "how the upstream was chosen (fixed, route, socks5)"),
        Operator("src", True, "session", "client address host:port"),
        Operator("m", True, "session", "SASL mechanism (PLAIN, LOGIN, CRAM-MD5, ...)"),
        Operator("end", True, "session", "how the session ended (quit, server-closed, ...)"),
        Operator("p", True, "session", "capture file path"),
        Operator("a", True, "session", "an anomaly of this kind (e.g. bare-lf)"),
        Operator("tls", False, "session", "TLS on either leg"),
        Operator("tlsc", False, "session", "TLS on the client leg"),
        Operator("tlsu", False, "session", "TLS on the upstream leg"),
        Operator("c", True, "exchange", "a command with this verb (whole verb)"),
        Operator("e", False, "exchange", "an -ERR reply, or the session ended on an error"),
        Operator("t", True, "exchange", "text in a command line (credentials masked)"),
        Operator("r", True, "exchange", "text in a reply's status line"),
        Operator("b", True, "exchange", "text in a body line (dot-unstuffed)"),
    )
}


class FilterError(ValueError):
    """A filter expression that does not parse; ``column`` is 1-based."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__(f"{message} (at column {column})")
        self.message = message
        self.column = column


# --------------------------------------------------------------------- syntax tree


@dataclass(frozen=True)
class Pred:
    """``~op`` or ``~op PATTERN``; the pattern is a case-insensitive regular expression."""

    op: str
    arg: str | None = None
    regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"~{self.op}" if self.arg is None else f"~{self.op} {quote(self.arg)}"


@dataclass(frozen=True)
class Not:
    expr: Expr

    def __str__(self) -> str:
        return f"!{_wrap(self.expr, 3)}"


@dataclass(frozen=True)
class And:
    left: Expr
    right: Expr

    def __str__(self) -> str:
        return f"{_wrap(self.left, 2)} & {_wrap(self.right, 3)}"


@dataclass(frozen=True)
class Or:
    left: Expr
    right: Expr

    def __str__(self) -> str:
        return f"{_wrap(self.left, 1)} | {_wrap(self.right, 2)}"


@dataclass(frozen=True)
class Each:
    """``{...}``: one exchange must satisfy the whole inner expression."""

    expr: Expr

    def __str__(self) -> str:
        return "{" + str(self.expr) + "}"


Expr = Pred | Not | And | Or | Each


def _precedence(expr: Expr) -> int:
    return 1 if isinstance(expr, Or) else 2 if isinstance(expr, And) else 4


def _wrap(expr: Expr, needed: int) -> str:
    return str(expr) if _precedence(expr) >= needed else f"({expr})"


_SPECIAL = frozenset("()&|!{}\"'")


def _bare_char(ch: str) -> bool:
    return not ch.isspace() and ch not in _SPECIAL


def quote(arg: str) -> str:
    """``arg`` as the tokenizer reads it back: bare when it can be, else double-quoted."""
    if arg and not arg.startswith("~") and all(_bare_char(ch) for ch in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ----------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class Token:
    kind: str  # "op" | "word" | "string" | "(" | ")" | "{" | "}" | "&" | "|" | "!" | "end"
    text: str
    column: int


_KEYWORDS = {"and": "&", "or": "|", "not": "!"}


def tokenize(text: str) -> Iterator[Token]:
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        column = i + 1
        if ch.isspace():
            i += 1
        elif ch in "&|" and text[i : i + 2] == ch * 2:  # Wireshark's && and ||
            yield Token(ch, ch, column)
            i += 2
        elif ch in "()&|!{}":
            yield Token(ch, ch, column)
            i += 1
        elif ch == "~":
            j = i + 1
            while j < n and text[j].isascii() and text[j].isalpha():
                j += 1
            name = text[i + 1 : j].lower()
            if not name:
                raise FilterError("'~' must be followed by an operator name, as in ~c", column)
            if name not in OPERATORS:
                known = " ".join(f"~{k}" for k in OPERATORS)
                raise FilterError(f"unknown operator ~{name} (known: {known})", column)
            yield Token("op", name, column)
            i = j
        elif ch in "\"'":
            j, out = i + 1, []
            while j < n and text[j] != ch:
                if text[j] == "\\" and j + 1 < n and text[j + 1] in (ch, "\\"):
                    j += 1
                out.append(text[j])
                j += 1
            if j >= n:
                raise FilterError("unterminated quoted string", column)
            yield Token("string", "".join(out), column)
            i = j + 1
        else:
            j = i
            while j < n and _bare_char(text[j]):
                j += 1
            yield Token("word", text[i:j], column)
            i = j
    yield Token("end", "", n + 1)


# -------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = list(tokenize(text))
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def kind(self) -> str:
        """The current token's kind, with the words and/or/not read as operators."""
        tok = self.tok
        if tok.kind == "word" and tok.text.lower() in _KEYWORDS:
            return _KEYWORDS[tok.text.lower()]
        return tok.kind

    def parse(self) -> Expr:
        if self.tok.kind == "end":
            raise FilterError("empty filter (try ~all)", 1)
        expr = self.disjunction()
        if self.tok.kind != "end":
            raise FilterError(f"unexpected {self.describe()}", self.tok.column)
        return expr

    def describe(self) -> str:
        tok = self.tok
        return "end of filter" if tok.kind == "end" else f"'{tok.text}'"

    def disjunction(self) -> Expr:
        expr = self.conjunction()
        while self.kind() == "|":
            self.i += 1
            expr = Or(expr, self.conjunction())
        return expr

    def conjunction(self) -> Expr:
        expr = self.unary()
        while True:
            kind = self.kind()
            if kind == "&":
                self.i += 1
            elif kind not in ("op", "(", "{", "!"):  # juxtaposition means "and"
                return expr
            expr = And(expr, self.unary())

    def unary(self) -> Expr:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterError(f"filter nested deeper than {MAX_DEPTH} levels", self.tok.column)
        try:
            if self.kind() == "!":
                self.i += 1
                return Not(self.unary())
            return self.primary()
        finally:
            self.depth -= 1

    def primary(self) -> Expr:
        tok, kind = self.tok, self.kind()
        if kind in ("(", "{"):
            self.i += 1
            inner = self.disjunction()
            close = ")" if kind == "(" else "}"
            if self.tok.kind != close:
                raise FilterError(
                    f"expected '{close}' to close the '{kind}' at column {tok.column}, "
                    f"found {self.describe()}",
                    self.tok.column,
                )
            self.i += 1
            return inner if kind == "(" else Each(inner)
        if kind == "op":
            self.i += 1
            return self.predicate(tok)
        if kind == "word":
            raise FilterError(
                f"'{tok.text}' is not a filter term; terms start with '~' (as in ~t {tok.text})",
                tok.column,
            )
        raise FilterError(f"expected a filter term, found {self.describe()}", tok.column)

    def predicate(self, tok: Token) -> Pred:
        op = OPERATORS[tok.text]
        if not op.takes_arg:
            return Pred(op.name)
        arg = self.tok
        if arg.kind not in ("word", "string"):
            raise FilterError(
                f"~{op.name} needs a pattern ({op.help}), found {self.describe()}", arg.column
            )
        self.i += 1
        try:
            regex = re.compile(arg.text, re.IGNORECASE)
        except (re.error, OverflowError, RecursionError) as exc:
            raise FilterError(f"bad pattern for ~{op.name}: {exc}", arg.column) from None
        return Pred(op.name, arg.text, regex)


def parse(text: str) -> Expr:
    """Parse a filter expression; raises ``FilterError`` (one line, with the column)."""
    return _Parser(text).parse()


def walk(expr: Expr) -> Iterator[Expr]:
    yield expr
    if isinstance(expr, Not | Each):
        yield from walk(expr.expr)
    elif isinstance(expr, And | Or):
        yield from walk(expr.left)
        yield from walk(expr.right)


def needs_bodies(expr: Expr) -> bool:
    return any(isinstance(e, Pred) and e.op == "b" for e in walk(expr))


# ------------------------------------------------------------------ session facts


@dataclass
class SessionFacts:
    """What is known about a session; ``None`` fields are unknown (read the whole capture)."""

    path: str = ""
    client: str | None = None
    upstream: str | None = None
    via: str = "fixed"  # the header's "via" as text: "socks5 target=h:995 user=alice"
    user: str | None = None
    mechanism: str | None = None
    how: str | None = None
    error: str | None = None
    commands: int | None = None
    anomalies: int | None = None
    anomaly_kinds: dict[str, int] | None = None
    errors: int | None = None
    verbs: dict[str, int] | None = None
    tls: frozenset[str] | None = None
    complete: bool = False  # every field known (from a full read)


def facts_from_end(path: str, header: dict[str, Any], end: dict[str, Any] | None) -> SessionFacts:
    """The cheap facts: a capture's header and its end record (``None`` when unfinished)."""
    facts = SessionFacts(
        path=path,
        client=_str(header.get("client")),
        upstream=_str(header.get("upstream")),
        via=via_text(header),
    )
    if end is None:
        facts.how = "unfinished"
        return facts
    facts.user, facts.mechanism = _str(end.get("user")), _str(end.get("mechanism"))
    facts.how, facts.error = _str(end.get("how")), _str(end.get("error"))
    facts.commands = _int(end.get("commands"))
    facts.anomalies = _int(end.get("anomalies"))
    facts.errors = _int(end.get("errors"))
    kinds, verbs, tls = end.get("anomaly_kinds"), end.get("verbs"), end.get("tls")
    if isinstance(kinds, dict):
        facts.anomaly_kinds = {str(k): _int(v) or 0 for k, v in kinds.items()}
    if isinstance(verbs, dict):
        facts.verbs = {str(k): _int(v) or 0 for k, v in verbs.items()}
    if isinstance(tls, list):
        facts.tls = frozenset(str(leg) for leg in tls)
    return facts


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _search(pred: Pred, value: str | None) -> bool:
    return value is not None and pred.regex is not None and pred.regex.search(value) is not None


def _leg(facts: SessionFacts, op: str) -> bool | None:
    if facts.tls is None:
        return None
    want = {"tls": ("client", "upstream", "both"), "tlsc": ("client", "both")}.get(
        op, ("upstream", "both")
    )
    return any(leg in facts.tls for leg in want)


def session_value(pred: Pred, facts: SessionFacts) -> bool | None:
    """A session-scope term from the facts; ``None`` when the facts cannot tell."""
    op = pred.op
    if op == "all":
        return True
    if op == "h":
        return _search(pred, facts.upstream)
    if op == "via":
        return _search(pred, facts.via)
    if op == "src":
        return _search(pred, facts.client)
    if op == "p":
        return _search(pred, facts.path)
    if op in ("tls", "tlsc", "tlsu"):
        return _leg(facts, op)
    if facts.how == "unfinished" and not facts.complete:
        return None  # the rest comes from the end record
    if op == "u":
        return _search(pred, facts.user)
    if op == "m":
        return _search(pred, facts.mechanism)
    if op == "end":
        return _search(pred, facts.how)
    if op == "a":
        if facts.anomaly_kinds is not None:
            return any(_search(pred, kind) for kind in facts.anomaly_kinds)
        return False if facts.anomalies == 0 else None
    return None


def quick(expr: Expr, facts: SessionFacts) -> bool | None:
    """Evaluate from the facts alone (three-valued): ``None`` means read the capture."""
    if isinstance(expr, Pred):
        if OPERATORS[expr.op].scope == "session":
            return session_value(expr, facts)
        return _exchange_summary(expr, facts)
    if isinstance(expr, Not):
        value = quick(expr.expr, facts)
        return None if value is None else not value
    if isinstance(expr, And | Or):
        left, right = quick(expr.left, facts), quick(expr.right, facts)
        decisive = isinstance(expr, Or)  # True decides an Or, False an And
        if decisive in (left, right):
            return decisive
        return None if None in (left, right) else not decisive
    return None  # {...} needs the exchanges themselves


def _exchange_summary(pred: Pred, facts: SessionFacts) -> bool | None:
    if pred.op == "e":
        if facts.error:
            return True
        return None if facts.errors is None else facts.errors > 0
    if facts.commands == 0 and facts.how != "unfinished" and pred.op in ("c", "t"):
        return False
    if pred.op == "c" and facts.verbs is not None and pred.regex is not None:
        return any(pred.regex.fullmatch(verb) for verb in facts.verbs)
    return None


# -------------------------------------------------------------- full evaluation


def exchange_value(pred: Pred, ex: Exchange, bodies: set[Pred]) -> bool:
    """An exchange-scope term on one exchange; ``bodies``: the ~b terms its body matched."""
    op = pred.op
    if op == "e":
        return ex.status == "-ERR"
    if op == "c":
        return (
            ex.command is not None
            and pred.regex is not None
            and bool(pred.regex.fullmatch(ex.command))
        )
    if op == "t":
        if ex.command is None:
            return False
        return _search(pred, ex.command if ex.args is None else f"{ex.command} {ex.args}")
    if op == "r":
        if ex.status is None:
            return False
        parts = [ex.status, f"[{ex.code}]" if ex.code else "", ex.text or ""]
        return _search(pred, " ".join(p for p in parts if p))
    if op == "b":
        return pred in bodies
    return False


def _evaluate(
    expr: Expr,
    facts: SessionFacts,
    exchange: dict[Pred, bool] | None,
    units: dict[int, bool],
) -> bool:
    """Full evaluation: ``exchange`` holds one exchange's term values inside ``{...}``."""
    if isinstance(expr, Pred):
        if OPERATORS[expr.op].scope == "session":
            return bool(session_value(expr, facts))
        if exchange is not None:
            return exchange.get(expr, False)
        if expr.op == "e" and facts.error:
            return True
        return units.get(id(expr), False)
    if isinstance(expr, Not):
        return not _evaluate(expr.expr, facts, exchange, units)
    if isinstance(expr, And):
        return _evaluate(expr.left, facts, exchange, units) and _evaluate(
            expr.right, facts, exchange, units
        )
    if isinstance(expr, Or):
        return _evaluate(expr.left, facts, exchange, units) or _evaluate(
            expr.right, facts, exchange, units
        )
    if exchange is not None:  # {...} inside {...}: the same exchange
        return _evaluate(expr.expr, facts, exchange, units)
    return units.get(id(expr), False)


class Scan:
    """Evaluates a filter while a whole capture streams past: bounded memory at any size.

    Exchange terms outside braces are existential (some exchange matches); a ``{...}``
    group must hold for one exchange.  Each unit keeps the distinct truth vectors of its
    exchange terms, so session terms inside braces use the session's final facts.
    """

    def __init__(self, expr: Expr, facts: SessionFacts) -> None:
        self.expr = expr
        self.facts = facts
        self.builder = TranscriptBuilder(
            hash_bodies=False,
            keep_listings=False,
            scan_attachments=False,
            summarise_messages=False,
            body_items=(1 << 62) if needs_bodies(expr) else 0,
        )
        self._units: list[tuple[Expr, list[Pred]]] = []
        self._collect(expr, inside=False)
        self._seen: dict[int, set[tuple[bool, ...]]] = {id(u): set() for u, _ in self._units}
        self._body_preds = [p for e in walk(expr) if isinstance(p := e, Pred) and p.op == "b"]
        self._bodies: dict[int, set[Pred]] = {}
        self._partial: dict[int, bytearray] = {}
        self._tls: set[str] = set()
        self._end: dict[str, Any] | None = None

    def _collect(self, expr: Expr, *, inside: bool) -> None:
        if isinstance(expr, Each) and not inside:
            terms = [e for e in walk(expr.expr) if isinstance(e, Pred) and _is_exchange(e)]
            self._units.append((expr, list(dict.fromkeys(terms))))
        elif isinstance(expr, Pred) and _is_exchange(expr) and not inside:
            self._units.append((expr, [expr]))
        elif isinstance(expr, Not):
            self._collect(expr.expr, inside=inside)
        elif isinstance(expr, And | Or):
            self._collect(expr.left, inside=inside)
            self._collect(expr.right, inside=inside)

    def feed(self, record: Record | None, t: float, events: list[Event]) -> None:
        if record is not None:
            if record.kind == fmt.TLS:
                self._tls.add(str(record.fields.get("leg", "")))
            elif record.kind == fmt.END:
                self._end = record.fields
        for item in self.builder.feed(t, events):
            ex = item.exchange
            if ex is None:
                continue
            if item.what == "body" and self._body_preds:
                self._body(ex, bytes(item.detail))
            elif item.what == "done":
                self._done(ex)

    def _body(self, ex: Exchange, data: bytes) -> None:
        key = id(ex)
        partial = self._partial.setdefault(key, bytearray())
        partial += data
        start = 0
        while True:
            nl = partial.find(b"\n", start)
            if nl < 0:
                break
            self._line(key, bytes(partial[start:nl]))
            start = nl + 1
        del partial[:start]
        if len(partial) > MAX_LINE:
            self._line(key, bytes(partial))
            partial.clear()

    def _line(self, key: int, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        matched = self._bodies.setdefault(key, set())
        for pred in self._body_preds:
            if pred not in matched and _search(pred, text):
                matched.add(pred)

    def _done(self, ex: Exchange) -> None:
        key = id(ex)
        if key in self._partial:
            rest = self._partial.pop(key)
            if rest:
                self._line(key, bytes(rest))
        bodies = self._bodies.pop(key, set())
        for unit, terms in self._units:
            self._seen[id(unit)].add(tuple(exchange_value(p, ex, bodies) for p in terms))

    def result(self) -> bool:
        """Call once the capture is read: the filter's verdict on the session."""
        for ex in self.builder.unfinished():
            self._done(ex)
        session = self.builder.session
        facts = self.facts
        end = self._end or {}
        facts.user = facts.user or session.user
        facts.mechanism = facts.mechanism or session.mechanism
        facts.how = _str(end.get("how")) or facts.how or "unfinished"
        facts.error = _str(end.get("error")) or facts.error
        kinds: dict[str, int] = {}
        for anomaly in session.anomalies:
            kinds[str(anomaly["kind"])] = kinds.get(str(anomaly["kind"]), 0) + 1
        facts.anomaly_kinds, facts.anomalies = kinds, len(session.anomalies)
        facts.verbs, facts.errors, facts.commands = session.verbs, session.errors, session.commands
        facts.tls = frozenset(self._tls)
        facts.complete = True
        units: dict[int, bool] = {}
        for unit, terms in self._units:
            inner = unit.expr if isinstance(unit, Each) else unit
            units[id(unit)] = any(
                _evaluate(inner, facts, dict(zip(terms, vector, strict=True)), units)
                for vector in self._seen[id(unit)]
            )
        return _evaluate(self.expr, facts, None, units)


def _is_exchange(pred: Pred) -> bool:
    return OPERATORS[pred.op].scope == "exchange"
