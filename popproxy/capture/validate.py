"""What a capture's record lines may hold: strict, bounded JSON, typed per record kind."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from popproxy.capture import format as fmt

MAX_DEPTH = 8  # no record popproxy writes nests beyond 2
MAX_DIGITS = 20  # an integer in a record fits in 64 bits
MAX_DATA = 1 << 22  # 4 MiB: popproxy writes at most 1 MiB per data record
MAX_TIME = 1e10  # seconds; well beyond any session, far below what a float loses digits at
DIRECTIONS = frozenset({"c", "s"})

# The exact line encode_data writes: parsed without the JSON decoder (one per chunk).
_DATA_LINE = re.compile(rb'\{"r":"d","d":"([cs])","t":(\d{1,10}\.\d{6}),"n":(\d{1,8})(,"p":1)?\}\n')


class Invalid(ValueError):
    """A record line that is not what the format allows; the message says what is wrong."""


def _reject_constant(name: str) -> Any:
    raise Invalid(f"{name} is not a number a capture may hold")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Invalid(f"the number {text[:20]} is out of range")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise Invalid(f"an integer of {len(text):,} digits")
    return int(text)


_DECODER = json.JSONDecoder(
    parse_float=_float, parse_int=_int, parse_constant=_reject_constant, strict=True
)


def parse_record(line: bytes) -> tuple[str, dict[str, Any]]:
    """A record line as (kind, fields), every field the format knows checked; ``Invalid``."""
    fast = _DATA_LINE.fullmatch(line)
    if fast is not None:  # the writer's own data line: its fields are valid by the pattern
        n = int(fast[3])
        if n > MAX_DATA:
            raise Invalid(f"a data record of {n:,} octets (the most is {MAX_DATA:,})")
        fields: dict[str, Any] = {"r": fmt.DATA, "d": fast[1].decode(), "t": float(fast[2]), "n": n}
        if fast[4]:
            fields["p"] = 1
        return fmt.DATA, fields
    fields = decode_line(line)
    return check_record(fields), fields


def decode_line(line: bytes) -> dict[str, Any]:
    """One record line (with or without its LF) as a dict; raises ``Invalid``."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("not UTF-8 text") from None
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise Invalid("JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise Invalid(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise Invalid("not a JSON object")
    cleaned: dict[str, Any] = _clean(value, 1)
    return cleaned


def _text(value: str) -> str:
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (JSON "\ud800") cannot be printed or encoded: keep it visible.
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _clean(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        if depth > MAX_DEPTH:
            raise Invalid("JSON nested too deeply")
        return {_text(k): _clean(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        if depth > MAX_DEPTH:
            raise Invalid("JSON nested too deeply")
        return [_clean(v, depth + 1) for v in value]
    return value


# ---------------------------------------------------------------------- field types

Check = Callable[[Any], bool]


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63


def _time(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= MAX_TIME


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _opt_count(v: Any) -> bool:
    return v is None or _count(v)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _flag(v: Any) -> bool:
    return isinstance(v, bool) or (isinstance(v, int) and v in (0, 1))


def _direction(v: Any) -> bool:
    return isinstance(v, str) and v in DIRECTIONS


def _octets(v: Any) -> bool:
    return v is None or (isinstance(v, dict) and all(_opt_count(v.get(d)) for d in DIRECTIONS))


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# kind -> field -> (check, required).  Fields not listed are free (a minor version may add
# them); kinds not listed are skipped by readers, so only their "t" is checked.
_D = (_direction, True)
SCHEMA: dict[str, dict[str, tuple[Check, bool]]] = {
    fmt.DATA: {"d": _D, "n": (_count, True), "p": (_flag, False), "why": (_opt_str, False)},
    fmt.REDACT: {
        "d": _D,
        "off": (_count, True),
        "len": (_count, True),
        "kind": (_str, False),
        "masked": (_bool, False),
    },
    fmt.TLS: {
        "d": _D,
        "off": (_count, False),
        "decrypted": (_bool, False),
        **{k: (_opt_str, False) for k in ("leg", "mode", "version", "cipher", "sni")},
        **{k: (_opt_str, False) for k in ("peer_subject", "peer_sha256")},
    },
    fmt.DROP: {"d": _D, "off": (_count, True), "len": (_count, True), "why": (_opt_str, False)},
    fmt.EOF: {"d": _D, "by": (_opt_str, False), "why": (_opt_str, False)},
    fmt.OPAQUE: {"d": _D, "off": (_count, False), "why": (_opt_str, False)},
    fmt.IDENTITY: {
        "seq": (_count, False),
        "mech": (_opt_str, False),
        "identity": (_opt_str, False),
    },
    fmt.EVENT: {"kind": (_opt_str, False), "detail": (_opt_str, False), "addr": (_opt_str, False)},
    fmt.END: {
        "how": (_opt_str, False),
        "error": (_opt_str, False),
        "octets": (_octets, False),
        "user": (_opt_str, False),
        "mechanism": (_opt_str, False),
        **{k: (_opt_count, False) for k in ("commands", "anomalies", "redactions")},
        "observer_error": (_opt_str, False),
    },
}
HEADER_SCHEMA: dict[str, tuple[Check, bool]] = {
    "v": (_str, True),
    "t0": (_finite, False),
    "session": (_opt_count, False),
    **{k: (_opt_str, False) for k in ("popproxy", "start", "client", "listen", "upstream", "stls")},
    **{k: (_bool, False) for k in ("keep_secrets", "listen_tls", "upstream_tls")},
    **{k: (_bool, False) for k in ("upstream_stls", "insecure", "hide_plus")},
}


def check_fields(fields: dict[str, Any], schema: dict[str, tuple[Check, bool]]) -> None:
    """Raise ``Invalid`` naming the first field that is missing or of the wrong type."""
    for name, (check, required) in schema.items():
        if name not in fields:
            if required:
                raise Invalid(f'no "{name}" field')
            continue
        if not check(fields[name]):
            raise Invalid(f'bad "{name}" field: {_shown(fields[name])}')


def check_record(fields: dict[str, Any]) -> str:
    """The record's kind, once its fields have the types the format gives them."""
    kind = fields.get("r")
    if not isinstance(kind, str):
        raise Invalid('no "r" field naming the record kind')
    if "t" in fields and not _time(fields["t"]):
        raise Invalid(f'bad "t" field: {_shown(fields["t"])}')
    schema = SCHEMA.get(kind)
    if schema is not None:
        check_fields(fields, schema)
    if kind == fmt.DATA and fields["n"] > MAX_DATA:
        raise Invalid(f"a data record of {fields['n']:,} octets (the most is {MAX_DATA:,})")
    return kind


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 40 else text[:37] + "..."
