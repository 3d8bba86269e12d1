"""The ``--fault``, ``--faults`` and ``--fault-seed`` options shared by ``record`` and ``serve``."""

from __future__ import annotations

import argparse

from popproxy.faults.grammar import parse_all
from popproxy.faults.matcher import FaultSet


def add_fault_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fault injection (popproxy docs faults)")
    g.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="RULE",
        help="inject a POP3 fault, e.g. 'RETR 1: cut after 500' or "
        "'AUTH: -ERR [SYS/TEMP] try later' (repeatable; tried in order)",
    )
    g.add_argument(
        "--faults",
        action="append",
        default=[],
        metavar="FILE",
        help="read fault rules from FILE, one a line (# comments); after the --fault rules",
    )
    g.add_argument(
        "--fault-seed",
        type=int,
        default=None,
        metavar="N",
        help="seed for rules with p= or a delay distribution but no seed= "
        "(default: random, shown at start-up and in each capture)",
    )


def faults_from_args(args: argparse.Namespace) -> FaultSet | None:
    """The rules the options name (None without any); raises FaultFileError."""
    rules = parse_all(args.fault, args.faults)
    if not rules:
        return None
    return FaultSet(rules, seed=args.fault_seed)
