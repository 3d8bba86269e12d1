"""Fault rules at the edges of the relay controller: each case a session once got wrong."""

from __future__ import annotations

import pytest

from popproxy.core import Direction
from popproxy.proxy.controller import Forward, Note, StlsMode, Tick
from tests.test_controller import Case, bytewise, play, whole
from tests.test_controller_faults import FaultRun, to_client
from tests.test_controller_faults_props import LISTINGS, Mode, Outcome, World, check, session

C, S = Direction.CLIENT, Direction.SERVER
GREETING = b"+OK POP3 ready <1.2@x>\r\n"
STLS_OK = b"+OK Begin TLS negotiation now.\r\n"
STRIP_ERR = b"-ERR STLS not available.\r\n"
PLAIN = Mode()


def run(batches: list[bytes], rules: list[str], mode: Mode = PLAIN, **world: object) -> Outcome:
    outcome = session(batches, rules, mode, World(**world))  # type: ignore[arg-type]
    check(outcome)  # every byte once, in the wire's order, nothing wedged
    return outcome


def kinds(outcome: Outcome) -> list[str]:
    return [c.kind for c in outcome.sim.out if isinstance(c, Note)]


@pytest.mark.parametrize("stls", [StlsMode.INTERCEPT, StlsMode.STRIP])
def test_an_stls_behind_an_answered_command_waits_for_its_answer(stls: StlsMode) -> None:
    # It once forwarded everything before it, the answered LIST included.
    got = run([b"LIST\r\nNOOP\r\nSTLS\r\n"], ["LIST: -ERR busy"], Mode(stls))
    if stls is StlsMode.STRIP:
        assert got.to_server == b"NOOP\r\n"
        assert got.to_client == GREETING + b"-ERR busy\r\n+OK\r\n" + STRIP_ERR
    else:
        assert got.to_server == b"NOOP\r\nSTLS\r\n"
        assert got.to_client == GREETING + b"-ERR busy\r\n+OK\r\n" + STLS_OK


@pytest.mark.parametrize("split", [whole, bytewise], ids=["whole", "bytewise"])
def test_a_filtered_listing_before_an_stls_hides_plus_whatever_the_reads(split: object) -> None:
    # While the STLS awaited its reply, unfinished listing lines went on unfiltered.
    listing = b"+OK\r\nPLAIN\r\nSCRAM-SHA-256-PLUS\r\n.\r\n"
    steps = [("s", GREETING), ("c", b"AUTH\r\nSTLS\r\n"), ("s", listing)]
    out = play(Case("plus", steps, [], hide_plus=True), split).out  # type: ignore[arg-type]
    got = b"".join(c.data for c in out if isinstance(c, Forward) and c.direction is S)
    assert got == GREETING + b"+OK\r\nPLAIN\r\n.\r\n"


def test_popproxy_s_bytes_take_their_place_in_the_order_they_go_out() -> None:
    # The refusal's offsets were taken before the rewritten listing's, sent after it.
    got = run([b"CAPA\r\nAUTH XOAUTH2 dG9rZW4=\r\n"], ["CAPA: advertise XOAUTH2"])
    listing = LISTINGS["CAPA"].replace(b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256-PLUS XOAUTH2")
    refusal = b"-ERR Unsupported authentication mechanism.\r\n"
    assert got.to_client == GREETING + listing + refusal
    start = len(GREETING) + len(LISTINGS["CAPA"])
    spans = [(start, start + len(listing)), (start + len(listing), start + len(listing) + 44)]
    assert got.sim.ctl.own_spans(S) == spans
    # The observer takes popproxy's listing for the AUTH's reply: relay control goes off.
    assert "observer-error" in kinds(got)


def test_an_observer_failure_gives_up_an_answer_still_waiting() -> None:
    # The client's reads stayed held and STAT never went: the session hung.
    got = run([b"USER joe\r\nPASS secret\r\nSTAT\r\n"], ["PASS: -ERR locked"], fail_at=3)
    assert got.to_server == b"USER joe\r\nSTAT\r\n"
    assert got.to_client == GREETING + b"+OK\r\n+OK 2 320\r\n"


def test_an_observer_failure_lets_held_bytes_go_on() -> None:
    # The 3 bytes no-terminator kept back were lost: never forwarded, never dropped.
    got = run([b"UIDL\r\n"], ["UIDL: corrupt no-terminator"], cuts=[10], fail_at=6)
    assert got.to_client == GREETING + LISTINGS["UIDL"]
    assert "observer-error" in kinds(got)


@pytest.mark.parametrize("stls", [StlsMode.INTERCEPT, StlsMode.STRIP])
def test_a_bare_ok_to_a_listing_turns_relay_control_off(stls: StlsMode) -> None:
    # The STLS's reply became LIST's body to the observer: the STLS waited for ever.
    got = run([b"LIST\r\nSTLS\r\n"], ["LIST: +OK fine"], Mode(stls))
    assert "observer-error" in kinds(got)
    reply = STRIP_ERR if stls is StlsMode.STRIP else STLS_OK
    assert got.to_client == GREETING + b"+OK fine\r\n" + reply


def test_a_client_close_does_not_let_lines_held_behind_an_auth_go_unplaced() -> None:
    # The STLS went to the server unplaced, in strip mode: the session ended in error.
    sasl = b"AUTH PLAIN\r\nAGpvZQBzZWNyZXQ=\r\nSTLS\r\n"
    got = run([sasl], ["RETR: cut"], Mode(StlsMode.STRIP), eof_early=True)
    assert got.to_server == b"AUTH PLAIN\r\nAGpvZQBzZWNyZXQ=\r\n"
    assert got.to_client == GREETING + b"+ \r\n+OK logged in\r\n" + STRIP_ERR
    assert got.sim.ctl.ended is not None and got.sim.ctl.ended.how == "client-closed"


def test_a_reply_the_observer_reads_on_into_is_relayed_not_a_crash() -> None:
    # A multi-line reply to LIST 1 (the observer resynchronises into a body): KeyError.
    run_ = FaultRun(Case("resync", [], []), rules=["LIST 1: delay 1ms"])
    run_.data(S, GREETING)
    run_.data(C, b"LIST 1\r\n")
    run_.data(S, b"+OK\r\n1 120\r\n.\r\n")
    run_.settle_time()
    assert to_client(run_) == GREETING + b"+OK\r\n1 120\r\n.\r\n"


@pytest.mark.parametrize("cuts", [[], [13], [1, 2, 3, 5, 8, 13, 21]])
def test_a_state_rule_matches_a_pipelined_command_in_the_state_it_runs_in(cuts: list[int]) -> None:
    # STAT was matched when placed, still in AUTHORIZATION unless the reads came apart.
    login = b"USER joe\r\nPASS secret\r\nSTAT\r\n"
    got = run([login], ["STAT: -ERR [SYS/TEMP] later state=TRANSACTION"], cuts=cuts)
    assert got.to_server == b"USER joe\r\nPASS secret\r\n"
    assert got.to_client == GREETING + b"+OK\r\n+OK\r\n-ERR [SYS/TEMP] later\r\n"
    got = run([login], ["STAT: -ERR [SYS/TEMP] later state=AUTHORIZATION"], cuts=cuts)
    assert got.to_client == GREETING + b"+OK\r\n+OK\r\n+OK 2 320\r\n"


def test_early_lines_wait_for_popproxy_s_greeting() -> None:
    # The reply to USER came in the greeting's read: it went after popproxy's greeting on
    # the wire but before it in the record.
    got = run([b"USER joe\r\n"], ["greeting: -ERR [IN-USE] locked"], early_data=True, gulp=True)
    assert got.to_client == b"-ERR [IN-USE] locked\r\n+OK\r\n"
    assert got.to_server == b"USER joe\r\n"


def test_an_answer_to_an_early_command_follows_the_greeting() -> None:
    # popproxy's -ERR went first: the client took it for the greeting.
    got = run([b"LIST\r\n"], ["LIST: -ERR busy"], early_data=True)
    assert got.to_client == GREETING + b"-ERR busy\r\n"


def test_an_early_stls_is_refused_after_the_greeting() -> None:
    # popproxy's -ERR went first, before the server's greeting.
    steps = [("c", b"STLS\r\n"), ("s", GREETING)]
    assert to_client(play(Case("early", steps, [], mode=StlsMode.STRIP), whole)) == (
        GREETING + STRIP_ERR
    )


@pytest.mark.parametrize(
    "rules",
    [["USER: stall", "PASS: -ERR locked"], ["greeting: stall", "USER: -ERR x"]],
    ids=["answer", "greeting"],
)
def test_after_a_stall_popproxy_says_nothing_either(rules: list[str]) -> None:
    got = run([b"USER joe\r\nPASS secret\r\n"], rules)
    stalled = GREETING if rules[0].startswith("USER") else b""
    assert got.to_client == stalled


def test_after_a_stall_no_idle_limit_closes_the_connection() -> None:
    # The idle limit armed before the stall closed the connection 100 s on.
    run_ = FaultRun(Case("idle", [], []), rules=["NOOP: idle 100s", "STAT: stall"])
    run_.data(S, GREETING)
    run_.data(C, b"NOOP\r\nSTAT\r\n")
    run_.data(S, b"+OK\r\n+OK 2 320\r\n")
    assert run_.ctl.deadline > run_.t + 500  # only the idle timeout is left
    run_.feed(Tick(run_.t + 150))
    assert run_.ctl.ended is None
    assert to_client(run_) == GREETING + b"+OK\r\n"
