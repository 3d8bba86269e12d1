"""``serve --match any``: each recorded exchange once, in any order; scored near misses."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from popproxy.replay.fake import ServeConfig
from popproxy.replay.matching import closest, find_any, score
from popproxy.replay.script import Step, load_session
from tests.test_mailbox_e2e import start
from tests.test_serve import _client, _simple


def _steps(*commands: str) -> list[Step]:
    out = []
    for i, text in enumerate(commands):
        verb, _, args = text.partition(" ")
        out.append(Step(i, verb, args or None, text.encode() + b"\r\n", i))
    return out


def test_find_any_takes_the_earliest_unplayed_and_scores_the_rest() -> None:
    steps = _steps("STAT", "RETR 1", "DELE 1", "STAT", "RETR 2", "QUIT")

    def same(step: Step, verb: str, args: str | None) -> bool:
        return step.verb == verb and (step.args or "") == (args or "")

    assert find_any(steps, set(), "STAT", None, same) == 0
    assert find_any(steps, {0}, "STAT", None, same) == 3
    assert find_any(steps, {0, 3}, "STAT", None, same) is None
    assert score(steps[1], "RETR", "1") == (1.0, "same command")
    assert score(steps[1], "RETR", "3")[0] == pytest.approx(0.5)
    assert score(steps[1], "TOP", "1 0")[0] < 0.5
    best = closest(steps, {1}, "RETR", "3")
    assert [c.step.command_text for c in best] == ["RETR 2"]
    assert [c.step.command_text for c in closest(steps, set(), "TOP", "1 0")] == [
        "RETR 1",
        "DELE 1",
    ]
    assert "arguments differ" in best[0].describe()


async def test_any_order_plays_each_exchange_once_in_recorded_order(tmp_path: Path) -> None:
    config = ServeConfig([load_session(_simple(tmp_path))], listen=("127.0.0.1", 0), match="any")
    script = [
        b"USER alice\r\n",
        b"PASS x\r\n",
        b"DELE 1\r\n",  # before RETR 1 and the first STAT, unlike the recording
        b"STAT\r\n",
        b"RETR 1\r\n",
        b"STAT\r\n",
        b"RETR 1\r\n",
        b"RETR 3\r\n",
        b"QUIT\r\n",
    ]
    async with trio.open_nursery() as nursery:
        server, port = await start(nursery, config)
        answers = await trio.to_thread.run_sync(lambda: _client(port, script))
        nursery.cancel_scope.cancel()
    assert answers[3] == b"+OK\r\n"
    assert answers[4] == b"+OK 2 300\r\n" and answers[6] == b"+OK 1 200\r\n"  # recorded order
    assert answers[7].startswith(b"-ERR") and answers[8].startswith(b"-ERR")
    assert answers[9] == b"+OK bye\r\n"
    again, other = server.report.near_misses
    assert again.received == "RETR 1" and "played already" in again.differed
    assert other.received == "RETR 3" and other.closest is None
    assert "no unplayed recorded exchange is like it (unplayed: CAPA, QUIT)" in other.differed
    assert server.report.unplayed() == []
