"""POP3 fault injection: rules (docs/faults.md), their parser, matcher and reply shaper."""

from popproxy.faults.grammar import (
    FaultFileError,
    FaultSyntaxError,
    load_rules,
    parse_all,
    parse_rule,
    parse_rules,
)
from popproxy.faults.matcher import FaultSet, Injection, SessionFaults
from popproxy.faults.rules import Rule, format_rule
from popproxy.faults.shape import ReplyShaper, Step, shape_whole

__all__ = [
    "FaultFileError",
    "FaultSet",
    "FaultSyntaxError",
    "Injection",
    "ReplyShaper",
    "Rule",
    "SessionFaults",
    "Step",
    "format_rule",
    "load_rules",
    "parse_all",
    "parse_rule",
    "parse_rules",
    "shape_whole",
]
