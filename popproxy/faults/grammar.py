"""Parses fault rules (docs/faults.md) into ``Rule`` values, with one-line errors that point."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from popproxy.core.events import State
from popproxy.errors import PopproxyError
from popproxy.faults.rules import (
    ANY,
    FIN,
    GREETING,
    INACTIVITY_REPLY,
    MATCH_OPTIONS,
    OPTIONS,
    REFUSE_REPLY,
    RST,
    Action,
    Advertise,
    Answer,
    Corrupt,
    Corruption,
    Cut,
    Delay,
    Duration,
    Exponential,
    Fixed,
    Idle,
    Inactivity,
    Match,
    Normal,
    Rule,
    Stall,
    Throttle,
    Uniform,
)

MAX_RULE = 4096  # a rule is one line; anything longer is a mistake
MAX_FILE_RULES = 10_000
ACTIONS = ("delay", "stall", "cut", "throttle", "corrupt", "inactivity", "idle", "advertise")
_VERB = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,39}\Z")
_MECH = re.compile(r"[A-Z0-9_-]{1,40}\Z")  # RFC 4422 §3.1 mechanism names
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_SECONDS = re.compile(rf"({_NUMBER})(ms|s|m)\Z")
_SIZE = re.compile(r"(\d+)(B|KB|KiB|MB|MiB|GB|GiB)?\Z")
_UNITS = {None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 10**6, "MiB": 1 << 20}
_UNITS.update({"GB": 10**9, "GiB": 1 << 30})
_SECOND_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}
MAX_SIZE = 1 << 50
MAX_SECONDS = 7 * 86400.0


class FaultSyntaxError(ValueError):
    """A rule that does not parse: ``column`` (1-based) points at the trouble."""

    def __init__(self, message: str, column: int, text: str) -> None:
        super().__init__(message)
        self.message = message
        self.column = column
        self.text = text

    def __str__(self) -> str:
        return f"column {self.column}: {self.message}"


@dataclass(frozen=True, slots=True)
class _Token:
    text: str  # unquoted value for strings
    column: int  # 1-based
    end: int  # 0-based index just past the token in the rule's text
    quoted: bytes | None = None  # the bytes of a quoted string


def parse_rule(text: str) -> Rule:
    """One rule, e.g. ``RETR 2: cut after 1000``; raises ``FaultSyntaxError``."""
    return _Parser(text).rule()


def parse_rules(text: str, source: str = "<faults>") -> list[Rule]:
    """A rules file: one rule a line, ``#`` comments and blank lines ignored.

    Raises ``FaultFileError`` naming ``source``, the line and the column.
    """
    rules: list[Rule] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        offset = len(line) - len(line.lstrip())
        try:
            rules.append(parse_rule(stripped))
        except FaultSyntaxError as exc:
            raise FaultFileError(source, number, exc.column + offset, exc.message) from None
        if len(rules) > MAX_FILE_RULES:
            raise FaultFileError(source, number, 1, f"more than {MAX_FILE_RULES} rules")
    return rules


def load_rules(path: str | Path) -> list[Rule]:
    """Read a ``--faults FILE``; ``OSError`` and ``FaultFileError`` say what went wrong."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise FaultFileError(str(p), None, 0, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise FaultFileError(str(p), line, 1, "not UTF-8 text") from None
    return parse_rules(text, str(p))


def parse_all(rules: Iterable[str], files: Iterable[str | Path] = ()) -> list[Rule]:
    """``--fault RULE`` texts then ``--faults FILE`` contents, in that order."""
    out: list[Rule] = []
    for text in rules:
        try:
            out.append(parse_rule(text))
        except FaultSyntaxError as exc:
            raise FaultFileError(f"--fault {text!r}", None, exc.column, exc.message) from None
    for path in files:
        out.extend(load_rules(path))
    return out


class FaultFileError(PopproxyError, ValueError):
    """A rule file (or ``--fault``) that does not parse: where, and why, in one line."""

    def __init__(self, source: str, line: int | None, column: int, message: str) -> None:
        if line is not None:
            where = f"{source}:{line}:{column}"
        else:
            where = f"{source}, column {column}" if column else source
        super().__init__(f"{where}: {message}")
        self.source, self.line, self.column, self.message = source, line, column, message


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text

    def fail(self, message: str, column: int) -> FaultSyntaxError:
        return FaultSyntaxError(message, max(1, column), self.text)

    def rule(self) -> Rule:
        text = self.text
        if len(text) > MAX_RULE:
            raise self.fail(f"a rule is at most {MAX_RULE} characters", MAX_RULE + 1)
        bad = next((i for i, ch in enumerate(text) if ch in "\r\n\x00"), None)
        if bad is not None:
            raise self.fail("a rule is one line", bad + 1)
        colon = text.find(":")
        if colon < 0:
            raise self.fail("expected 'COMMAND: ACTION' (no ':' found)", len(text) + 1)
        match = self.match(text[:colon])
        tokens = self.tokens(colon + 1)
        if not tokens:
            raise self.fail("expected an action after ':'", colon + 2)
        tokens, options = self.options(tokens)
        first_option = min((t.column for t in options.values()), default=colon + 2)
        action = self.action(tokens, first_option)
        return self.finish(match, action, options)

    # ----------------------------------------------------------------- the match

    def match(self, head: str) -> Match:
        words = [(m.group(), m.start() + 1) for m in re.finditer(r"\S+", head)]
        if not words:
            raise self.fail("expected a command verb, '*' or 'greeting' before ':'", 1)
        verb, column = words[0]
        if verb == ANY or verb.lower() == GREETING:
            if len(words) > 1:
                what = "'*'" if verb == ANY else "'greeting'"
                raise self.fail(f"{what} takes no argument pattern", words[1][1])
            return Match(ANY if verb == ANY else GREETING)
        if not _VERB.match(verb):
            raise self.fail(f"not a POP3 command verb: {verb!r}", column)
        args = " ".join(w for w, _ in words[1:]) or None
        return Match(verb.upper(), args)

    # ----------------------------------------------------------------- tokens

    def tokens(self, start: int) -> list[_Token]:
        text, i, out = self.text, start, []
        while i < len(text):
            ch = text[i]
            if ch in " \t":
                i += 1
                continue
            if ch == '"':
                value, end = self.string(i)
                out.append(_Token(value.decode("latin-1"), i + 1, end, value))
                i = end
                continue
            j, depth = i, 0
            while j < len(text) and (depth or text[j] not in " \t"):
                if text[j] == "(":
                    depth += 1
                elif text[j] == ")":
                    depth = max(0, depth - 1)
                j += 1
            out.append(_Token(text[i:j], i + 1, j))
            i = j
        return out

    def string(self, start: int) -> tuple[bytes, int]:
        text, i, out = self.text, start + 1, bytearray()
        simple = {"r": 13, "n": 10, "t": 9, "\\": 92, '"': 34}
        while i < len(text):
            ch = text[i]
            if ch == '"':
                return bytes(out), i + 1
            if ch == "\\":
                esc = text[i + 1 : i + 2]
                if esc in simple:
                    out.append(simple[esc])
                    i += 2
                    continue
                if esc == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", text[i + 2 : i + 4]):
                    out.append(int(text[i + 2 : i + 4], 16))
                    i += 4
                    continue
                raise self.fail('unknown escape (use \\r \\n \\t \\\\ \\" or \\xHH)', i + 1)
            out.extend(ch.encode("utf-8"))
            i += 1
        raise self.fail("unterminated string (missing closing '\"')", start + 1)

    def options(self, tokens: list[_Token]) -> tuple[list[_Token], dict[str, _Token]]:
        """Trailing ``key=value`` tokens with a known key are options."""
        options: dict[str, _Token] = {}
        while tokens and tokens[-1].quoted is None and "=" in tokens[-1].text:
            tok = tokens[-1]
            key = tok.text.split("=", 1)[0]
            if key not in OPTIONS:
                break  # text of a reply, or a mistake the action's parser names
            if key in options:
                raise self.fail(f"option {key!r} given twice", options[key].column)
            options[key] = tok
            tokens = tokens[:-1]
        return tokens, options

    # ----------------------------------------------------------------- actions

    def action(self, tokens: list[_Token], column: int) -> Action:
        if not tokens:
            raise self.fail("expected an action before the options", column)
        first = tokens[0]
        if first.quoted is not None or first.text[:1] in ("+", "-"):
            return Answer(self.reply(tokens))
        word = first.text.lower()
        rest = tokens[1:]
        if word == "delay":
            duration, rest = self.duration(rest, first)
            return Delay(duration, self.at(rest, first))
        if word == "stall":
            return Stall(self.at(rest, first))
        if word == "cut":
            return self.cut(rest, first)
        if word == "throttle":
            if not rest:
                raise self.fail("throttle needs a rate, e.g. 'throttle 10KiB/s'", self.end(first))
            rate = self.rate(rest[0])
            return Throttle(rate, self.at(rest[1:], rest[0]))
        if word == "corrupt":
            kinds = ", ".join(k.value for k in Corruption)
            if not rest:
                raise self.fail(f"corrupt needs a kind: {kinds}", self.end(first))
            try:
                kind = Corruption(rest[0].text.lower())
            except ValueError:
                raise self.fail(f"unknown corruption (choose {kinds})", rest[0].column) from None
            self.nothing_after(rest[1:])
            return Corrupt(kind)
        if word == "inactivity":
            after = 0.0
            if rest and rest[0].quoted is None and rest[0].text[:1] not in ("+", "-"):
                after = self.seconds(rest[0])
                rest = rest[1:]
            return Inactivity(after, self.reply(rest) if rest else INACTIVITY_REPLY)
        if word == "idle":
            if not rest:
                raise self.fail("idle needs a time, e.g. 'idle 30s'", self.end(first))
            seconds = self.seconds(rest[0])
            self.nothing_after(rest[1:])
            return Idle(seconds)
        if word == "advertise":
            if not rest:
                raise self.fail("advertise needs a SASL mechanism", self.end(first))
            mech = rest[0].text.upper()
            if rest[0].quoted is not None or not _MECH.match(mech):
                raise self.fail(f"not a SASL mechanism name: {rest[0].text!r}", rest[0].column)
            return Advertise(mech, self.reply(rest[1:]) if rest[1:] else REFUSE_REPLY)
        raise self.fail(
            f"unknown action {first.text!r} (expected a reply such as '-ERR ...' or "
            f"one of: {', '.join(ACTIONS)})",
            first.column,
        )

    def end(self, tok: _Token) -> int:
        return tok.end + 1  # the column just after the token

    def nothing_after(self, rest: list[_Token]) -> None:
        if rest:
            raise self.fail(f"unexpected {rest[0].text!r}", rest[0].column)

    def reply(self, tokens: list[_Token]) -> bytes:
        """Bare text up to the options (CRLF added), or one quoted string (exact bytes)."""
        first = tokens[0]
        if first.quoted is not None:
            self.nothing_after(tokens[1:])
            if not first.quoted:
                raise self.fail("an empty reply sends nothing: use 'stall' or 'cut'", first.column)
            return first.quoted
        if first.text[:1] not in ("+", "-"):
            raise self.fail(
                "a reply starts with '+' or '-' (e.g. '-ERR [IN-USE] locked')", first.column
            )
        line = self.text[first.column - 1 : tokens[-1].end]  # quotes inside are text
        try:
            return line.encode("ascii") + b"\r\n"
        except UnicodeEncodeError as exc:
            raise self.fail(
                'non-ASCII in a bare reply: quote it ("..." with \\xHH escapes)',
                first.column + exc.start,
            ) from None

    def cut(self, rest: list[_Token], first: _Token) -> Cut:
        at: int | None = 0
        how = FIN
        if rest and rest[0].text.lower() in ("before", "after"):
            if rest[0].text.lower() == "after":
                at = None
                if len(rest) > 1 and rest[1].text.lower() not in (FIN, RST):
                    at = self.size(rest[1])
                    rest = rest[1:]
            rest = rest[1:]
        elif rest and rest[0].text.lower() not in (FIN, RST):
            raise self.fail("cut: expected 'before', 'after' or 'after N'", rest[0].column)
        if rest and rest[0].text.lower() in (FIN, RST):
            how = rest[0].text.lower()
            rest = rest[1:]
        self.nothing_after(rest)
        return Cut(at, how)

    def at(self, rest: list[_Token], prev: _Token) -> int:
        if not rest:
            return 0
        if rest[0].text.lower() != "after":
            raise self.fail(
                f"expected 'after N' (bytes) or nothing, not {rest[0].text!r}", rest[0].column
            )
        if len(rest) < 2:
            raise self.fail("'after' needs a byte count, e.g. 'after 1000'", self.end(rest[0]))
        self.nothing_after(rest[2:])
        return self.size(rest[1])

    # ----------------------------------------------------------------- values

    def size(self, tok: _Token) -> int:
        m = _SIZE.match(tok.text)
        if m is None or tok.quoted is not None:
            raise self.fail(f"not a byte count: {tok.text!r} (e.g. 1000, 4KiB)", tok.column)
        value = int(m.group(1)) * _UNITS[m.group(2)]
        if value > MAX_SIZE:
            raise self.fail("byte count too large", tok.column)
        return value

    def rate(self, tok: _Token) -> int:
        text = tok.text
        if not text.endswith("/s"):
            raise self.fail(f"not a rate: {text!r} (e.g. 10KiB/s)", tok.column)
        value = self.size(_Token(text[:-2], tok.column, tok.end - 2))
        if value < 1:
            raise self.fail("a rate is at least 1B/s", tok.column)
        return value

    def seconds(self, tok: _Token) -> float:
        m = _SECONDS.match(tok.text)
        if m is None or tok.quoted is not None:
            raise self.fail(f"not a time: {tok.text!r} (e.g. 200ms, 1.5s, 2m)", tok.column)
        value = float(m.group(1)) * _SECOND_UNITS[m.group(3)]
        if not math.isfinite(value) or value > MAX_SECONDS:
            raise self.fail("time too large (at most 7 days)", tok.column)
        # Canonical: milliseconds are exact decimals, so 0.2s and 200ms are the same value.
        return round(value, 9)

    def duration(self, rest: list[_Token], first: _Token) -> tuple[Duration, list[_Token]]:
        if not rest:
            raise self.fail(
                "delay needs a time: 200ms, uniform(100ms,1s), exp(200ms), normal(1s,200ms)",
                self.end(first),
            )
        tok = rest[0]
        m = re.fullmatch(r"([a-z]+)\((.*)\)", tok.text)
        if m is None:
            return Fixed(self.seconds(tok)), rest[1:]
        name, inner = m.group(1), m.group(2)
        args: list[float] = []
        pos = tok.column + len(name) + 1
        for part in inner.split(","):
            lead = len(part) - len(part.lstrip())
            args.append(self.seconds(_Token(part.strip(), pos + lead, pos + len(part))))
            pos += len(part) + 1
        expected = {"uniform": 2, "exp": 1, "normal": 2}
        if name not in expected:
            raise self.fail(f"unknown distribution {name!r} (uniform, exp, normal)", tok.column)
        if len(args) != expected[name]:
            raise self.fail(f"{name}() takes {expected[name]} time(s)", tok.column)
        if name == "uniform":
            if args[0] > args[1]:
                raise self.fail("uniform(low,high): low is above high", tok.column)
            return Uniform(args[0], args[1]), rest[1:]
        if name == "exp":
            return Exponential(args[0]), rest[1:]
        return Normal(args[0], args[1]), rest[1:]

    # ----------------------------------------------------------------- options

    def finish(self, match: Match, action: Action, options: dict[str, _Token]) -> Rule:
        values: dict[str, object] = {}
        for key, tok in options.items():
            raw = tok.text.split("=", 1)[1]
            column = tok.column + len(key) + 1
            values[key] = self.option(key, raw, column)
        if match.verb == GREETING and any(k in values for k in ("nth", "state", "user")):
            key = next(k for k in ("nth", "state", "user") if k in values)
            raise self.fail(
                f"'greeting' takes no {key}= (there is one greeting)", options[key].column
            )
        if isinstance(action, Advertise) and match.verb not in ("CAPA", ANY):
            raise self.fail("advertise applies to CAPA's reply: write 'CAPA: advertise ...'", 1)
        m = Match(
            match.verb,
            match.args,
            **{k: v for k, v in values.items() if k in MATCH_OPTIONS},  # type: ignore[arg-type]
        )
        p = values.get("p")
        seed = values.get("seed")
        assert p is None or isinstance(p, float)
        assert seed is None or isinstance(seed, int)
        return Rule(m, action, p, seed)

    def option(self, key: str, raw: str, column: int) -> object:
        if key in ("nth", "session", "seed"):
            if not re.fullmatch(r"\d{1,18}", raw) or (key != "seed" and int(raw) < 1):
                low = "0" if key == "seed" else "1"
                raise self.fail(f"{key}= takes a whole number from {low}", column)
            return int(raw)
        if key == "state":
            try:
                return State(raw.upper())
            except ValueError:
                raise self.fail(
                    "state= takes AUTHORIZATION, TRANSACTION or UPDATE", column
                ) from None
        if key == "user":
            if not raw:
                raise self.fail("user= needs a name (or a glob)", column)
            return raw
        # p
        try:
            p = float(raw)
        except ValueError:
            p = math.nan
        if not re.fullmatch(_NUMBER, raw) or not 0 < p <= 1:
            raise self.fail("p= takes a probability above 0, at most 1 (e.g. p=0.1)", column)
        return p
