"""Decides, sans IO, which fault (if any) applies to a greeting or a command of one session.

Rules are tried in order; the first whose match holds and whose draw succeeds fires, and only
one fault applies to a reply.  ``nth`` counts, per rule, the commands its match (verb,
argument pattern, state, user) selected in this session, whether or not it then fired.
Draws come from one generator per (seed, session, rule): the same command sequence gives
the same faults, whatever other sessions do at the same time.
"""

from __future__ import annotations

import random
import re
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import translate

from popproxy.core.events import State
from popproxy.faults.rules import (
    ANY,
    GREETING,
    Action,
    Advertise,
    Answer,
    Delay,
    Duration,
    Exponential,
    Fixed,
    Normal,
    Rule,
    Uniform,
)


@dataclass(frozen=True, slots=True)
class Injection:
    """A rule that fired: on which command, the how-manyth time, with what drawn delay."""

    rule: Rule
    index: int  # 1-based position of the rule in the loaded list
    occurrence: int  # how many commands this rule's match selected so far, this one included
    action: Action  # the rule's action, or the Answer refusing an advertised mechanism
    seconds: float | None = None  # a Delay's drawn duration
    verb: str | None = None  # the command's verb (None: the greeting)

    def describe(self) -> str:
        extra = f", delay {self.seconds * 1000:.0f} ms" if self.seconds is not None else ""
        return f"fault rule {self.index} ({self.rule.text}){extra}"


class FaultSet:
    """The rules of one run (``--fault``, ``--faults``, a test's marker) and a run seed.

    Thread-safe for ``add`` (a test adds rules while the server runs in another thread):
    the rule list is replaced, never changed in place.
    """

    def __init__(self, rules: Iterable[Rule] = (), *, seed: int | None = None) -> None:
        self._rules: tuple[Rule, ...] = tuple(rules)
        self.seed = secrets.randbelow(1 << 32) if seed is None else seed
        self._lock = threading.Lock()
        self._candidates: dict[str, tuple[_Compiled, ...]] = {}
        self._count = 0

    def candidates(self, verb: str) -> tuple[_Compiled, ...]:
        """The rules that may select ``verb`` (its own and ``*``), in order, compiled once:
        a command costs the rules about its verb, not all of them."""
        found = self._candidates.get(verb)
        if found is None:
            rules = self._rules
            found = tuple(
                _Compiled(index, rule, _glob(rule.match.args), _glob(rule.match.user))
                for index, rule in enumerate(rules, 1)
                if rule.match.verb == verb or (rule.match.verb == ANY and verb != GREETING)
            )
            # Cached unless add() replaced the rules meanwhile; bounded, as clients name verbs.
            if rules is self._rules and len(self._candidates) < 256:
                self._candidates[verb] = found
        return found

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules

    def __bool__(self) -> bool:
        return bool(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def add(self, rule: Rule) -> None:
        with self._lock:
            self._rules = (*self._rules, rule)
            self._candidates = {}

    def session(self, number: int | None = None) -> SessionFaults:
        """One connection's faults; ``number`` defaults to this rule set's own count of
        connections (1, 2, ...), so runs number their sessions alike."""
        if number is None:
            with self._lock:
                self._count += 1
                number = self._count
        return SessionFaults(self, number)


class SessionFaults:
    """One connection's view of the rules: its counters, its draws, what it advertised."""

    def __init__(self, faults: FaultSet, number: int) -> None:
        self.faults = faults
        self.number = number
        self._counts: dict[int, int] = {}
        self._rngs: dict[int, random.Random] = {}
        self.advertised: dict[str, Injection] = {}  # SASL mechanisms popproxy added to CAPA
        self.injected: list[Injection] = []

    def greeting(self) -> Injection | None:
        """The fault for the server's greeting, if any."""
        return self._first(GREETING, None, None, None)

    def command(
        self, verb: str, args: str | None, state: State | None, user: str | None
    ) -> Injection | None:
        """The fault for this command's reply, if any (``args`` with secrets masked is fine)."""
        verb = verb.upper()
        if verb == "AUTH" and args:
            mech = args.split(" ", 1)[0].upper()
            adv = self.advertised.get(mech)
            if adv is not None and isinstance(adv.action, Advertise):
                refusal = Injection(
                    adv.rule, adv.index, adv.occurrence, Answer(adv.action.reply), None, verb
                )
                self.injected.append(refusal)
                return refusal
        return self._first(verb, " ".join((args or "").split()), state, user)

    def _first(
        self, verb: str, args: str | None, state: State | None, user: str | None
    ) -> Injection | None:
        fired: Injection | None = None
        for c in self.faults.candidates(verb):
            index, rule, m = c.index, c.rule, c.rule.match
            if (
                (c.args is not None and c.args.match(args or "") is None)
                or (m.session is not None and m.session != self.number)
                or (m.state is not None and m.state is not state)
                or (c.user is not None and (user is None or c.user.match(user) is None))
            ):
                continue
            count = self._counts.get(index, 0) + 1
            self._counts[index] = count
            if fired is not None or (rule.match.nth is not None and rule.match.nth != count):
                continue  # later rules still count this command
            rng = self._rng(index, rule)
            if rule.p is not None and rng.random() >= rule.p:
                continue
            seconds = None
            if isinstance(rule.action, Delay):
                seconds = draw(rule.action.duration, rng)
            fired = Injection(
                rule,
                index,
                count,
                rule.action,
                seconds,
                None if verb == GREETING else verb,
            )
        if fired is not None:
            if isinstance(fired.action, Advertise):
                self.advertised[fired.action.mechanism] = fired
            self.injected.append(fired)
        return fired

    def _rng(self, index: int, rule: Rule) -> random.Random:
        rng = self._rngs.get(index)
        if rng is None:
            seed = rule.seed if rule.seed is not None else self.faults.seed
            rng = self._rngs[index] = random.Random(f"{seed}/{self.number}/{index}")
        return rng


@dataclass(frozen=True, slots=True)
class _Compiled:
    index: int
    rule: Rule
    args: re.Pattern[str] | None
    user: re.Pattern[str] | None


def _glob(pattern: str | None) -> re.Pattern[str] | None:
    """A glob (``*``, ``?``, ``[...]``) as a compiled, case-sensitive full match."""
    return None if pattern is None else re.compile(translate(pattern))


def draw(duration: Duration, rng: random.Random) -> float:
    """Seconds for one delay; distributions are clamped to [0, 7 days]."""
    match duration:
        case Fixed(seconds):
            value = seconds
        case Uniform(low, high):
            value = rng.uniform(low, high)
        case Exponential(mean):
            value = rng.expovariate(1 / mean) if mean > 0 else 0.0
        case Normal(mean, sd):
            value = rng.gauss(mean, sd)
    return min(max(value, 0.0), 7 * 86400.0)
