"""Order-free matching for recorded replay: which exchange a command gets, and near misses."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from popproxy.replay.script import Step

Matches = Callable[[Step, str, str | None], bool]


def find_any(
    steps: list[Step], used: Collection[int], verb: str, args: str | None, matches: Matches
) -> int | None:
    """The earliest recorded exchange not yet played that matches the command.

    Earliest, so repeated identical commands (STAT before and after DELE) get their
    recorded answers in recorded order; each recorded exchange is played once.
    """
    for index, step in enumerate(steps):
        if index not in used and matches(step, verb, args):
            return index
    return None


@dataclass(frozen=True)
class Candidate:
    """A recorded exchange scored against a command that matched none."""

    index: int
    step: Step
    score: float
    why: str

    def describe(self) -> str:
        return f"{self.step.command_text} ({self.why}, score {self.score:.2f})"


def score(step: Step, verb: str, args: str | None) -> tuple[float, str]:
    """How close a recorded command is to a received one: 1.0 would have matched."""
    got = (args or "").split()
    recorded = (step.args or "").split()
    if step.verb != verb:
        shared = len(set(got) & set(recorded))
        return (0.1 * shared / max(len(got), len(recorded), 1), f"command differs: {step.verb}")
    if got == recorded:
        return 1.0, "same command"
    same = sum(1 for a, b in zip(got, recorded, strict=False) if a == b)
    part = same / max(len(got), len(recorded), 1)
    return 0.5 + 0.4 * part, f"arguments differ: recorded {step.args!r}"


def closest(
    steps: list[Step], used: Collection[int], verb: str, args: str | None, count: int = 3
) -> list[Candidate]:
    """The unplayed recorded exchanges like a command, best first (ties: recorded order).

    A recorded command with another verb and no argument in common is not "like" it.
    """
    scored = [
        Candidate(i, step, *score(step, verb, args))
        for i, step in enumerate(steps)
        if i not in used
    ]
    scored = [c for c in scored if c.score > 0]
    scored.sort(key=lambda c: (-c.score, c.index))
    return scored[:count]
