"""The live proxy's fault path: whatever the server's segmentation, the client gets the same."""

from __future__ import annotations

import itertools

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popproxy.capture.writer import CaptureWriter
from popproxy.core import Direction
from popproxy.faults import FaultSet, parse_rule
from popproxy.faults.shape import Forward, Originate, shape_whole
from popproxy.proxy.faults import ProxyFaults
from popproxy.proxy.tap import Tap

C, S = Direction.CLIENT, Direction.SERVER
GREETING = b"+OK ready\r\n"
BODY = b"+OK 30 octets\r\nSubject: x\r\n..dotted\r\n\r\n" + b"y" * 40 + b"\r\n.\r\n"
NEXT = b"+OK 2 100\r\n"

RULES = [
    "RETR 1: cut after 20",
    "RETR 1: cut after",
    "RETR 1: stall after 30",
    "RETR 1: delay 1ms after 5",
    "RETR 1: throttle 64KiB/s after 7",
    "RETR 1: corrupt bare-lf",
    "RETR 1: corrupt unstuffed",
    "RETR 1: corrupt no-terminator",
    "RETR 2: cut",  # never matches: every byte goes through
]


def run(rule: str, splits: list[int]) -> tuple[bytes, bool]:
    """Greeting, RETR 1's reply and STAT's, cut at ``splits``; what the client got."""
    tap = Tap(CaptureWriter({}), None)
    faults = ProxyFaults(FaultSet([parse_rule(rule)]).session(1), tap)
    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(bytes(data))

    async def main() -> None:
        faults.observe(tap.data(S, 0.0, GREETING))
        faults.observe(tap.data(C, 0.0, b"RETR 1\r\nSTAT\r\n"))
        server = BODY + NEXT
        bounds = sorted({0, len(server), *(min(s, len(server)) for s in splits)})
        for lo, hi in itertools.pairwise(bounds):
            start = tap.offsets[S]
            events = tap.data(S, 0.0, server[lo:hi])
            faults.observe(events)
            await faults.server_chunk(server[lo:hi], events, start, send, lambda: 0.0)
            if faults.ended is not None:
                return
        await faults.flush(send)

    trio.run(main)
    return b"".join(sent), faults.ended is not None


@given(st.sampled_from(RULES), st.lists(st.integers(0, len(BODY) + len(NEXT)), max_size=8))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_client_gets_the_same_bytes_whatever_the_reads(rule: str, splits: list[int]) -> None:
    got, ended = run(rule, splits)
    inj = FaultSet([parse_rule(rule)]).session(1).command("RETR", "1", None, None)
    if inj is None:
        assert got == BODY + NEXT and not ended
        return
    steps = shape_whole(inj, BODY, multiline=True)
    shaped = b"".join(s.data for s in steps if isinstance(s, Forward | Originate))
    stopped = any(type(s).__name__ in ("Close", "Hang") for s in steps)
    assert got == shaped + (b"" if stopped else NEXT)
    assert ended == any(type(s).__name__ == "Close" for s in steps)
