"""Hostile captures for fuzzing readers: real captures, mutated record by record."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popproxy.capture import format as fmt
from popproxy.capture.reader import CaptureReader
from popproxy.core import Direction

RAW = "\x00raw\x00"  # stands for a JSON token json.dumps cannot produce

# Values a hostile or damaged capture may hold where a field is expected.  A str starting
# with RAW is written as the raw JSON text after it.
HOSTILE: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    -0.000001,
    2**64,
    1e308,
    "",
    "x",
    "c",
    "s",
    "end",
    "d",
    "\x1b[2J\u202e",
    [],
    {},
    [1, [2, [3]]],
    {"c": "x", "s": -1},
    {"c": 1, "s": 2},
    RAW + "1e999",
    RAW + "-1e999",
    RAW + "Infinity",
    RAW + "NaN",
    RAW + "9" * 5000,
    RAW + '"\\ud800"',
    RAW + '"x\\udfffy"',
    RAW + "[" * 3000 + "]" * 3000,
    RAW + '{"a":' * 3000 + "1" + "}" * 3000,
    107_374_182_400,  # 100 GiB
]
DEEP = RAW + "[" * 100_000 + "]" * 100_000
# Same-type values: a reader must also cope with well-typed nonsense.
SAME_TYPE: dict[type, list[Any]] = {
    str: ["", "x" * 5000, "\x1b]52;c;aGk=\x07", "\u202e\x9b", RAW + '"\ud800"', "c", "s", "*"],
    int: [0, 1, 2**62, 4096, 1 << 22, 7],
    float: [0.0, 1e-9, 9_999_999_999.0, 0.5, 3.0],
    bool: [True, False],
}


@dataclass
class Capture:
    """A capture as raw pieces: the header line and each record's exact bytes."""

    header: bytes
    records: list[bytes]

    def bytes(self) -> bytes:
        return self.header + b"".join(self.records)


def split(path: Path) -> Capture:
    """A valid capture cut at its record boundaries (found by the reader itself)."""
    raw = path.read_bytes()
    with CaptureReader(path) as reader:
        start = reader.position
        header = raw[:start]
        records = []
        for _ in reader.records():
            records.append(raw[start : reader.position])
            start = reader.position
    assert header + b"".join(records) == raw, f"{path} does not split cleanly"
    return Capture(header, records)


def encode(fields: dict[str, Any]) -> bytes:
    """A record line, with RAW values spliced in as raw JSON text."""
    raws: list[str] = []

    def placeholder(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(RAW):
            raws.append(value[len(RAW) :])
            return f"@@RAW{len(raws) - 1}@@"
        return value

    text = json.dumps({k: placeholder(v) for k, v in fields.items()}, separators=(",", ":"))
    for i, token in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', token)
    return text.encode() + b"\n"


def _line_and_rest(record: bytes) -> tuple[dict[str, Any], bytes]:
    line, _, rest = record.partition(b"\n")
    fields: dict[str, Any] = json.loads(line)
    return fields, rest


class Mutator:
    """Makes mutants of one capture; every choice comes from ``rng`` (reproducible)."""

    KINDS = (
        "value",
        "value",
        "value",
        "header",
        "drop-field",
        "kind",
        "flip",
        "flip",
        "truncate",
        "duplicate",
        "reorder",
        "delete",
        "length",
        "forge-end",
        "insert-header",
    )

    def __init__(self, capture: Capture, rng: random.Random) -> None:
        self.capture = capture
        self.rng = rng

    def mutant(self, count: int = 0) -> tuple[bytes, list[str]]:
        """One mutant and the list of mutations that made it."""
        rng = self.rng
        cap = Capture(self.capture.header, list(self.capture.records))
        done = []
        kinds = [rng.choice(self.KINDS) for _ in range(count or rng.choice((1, 1, 1, 2, 3)))]
        # Byte-level damage last: after it the records are no longer known.
        kinds.sort(key=lambda k: k in ("flip", "truncate"))
        for kind in kinds:
            try:
                done.append(getattr(self, "_" + kind.replace("-", "_"))(cap))
            except (ValueError, RecursionError):  # an earlier mutation made it unparsable
                done.append(f"{kind}: skipped")
            if kind in ("flip", "truncate"):
                break
        return cap.bytes(), done

    def _pick(self, cap: Capture) -> int:
        return self.rng.randrange(len(cap.records)) if cap.records else -1

    def _value(self, cap: Capture) -> str:
        i = self._pick(cap)
        if i < 0:
            return "value: no records"
        fields, rest = _line_and_rest(cap.records[i])
        key = self.rng.choice(sorted(fields))
        same = SAME_TYPE.get(type(fields[key]))
        if same and self.rng.random() < 0.5:
            value = self.rng.choice(same)
        else:
            value = self.rng.choice(HOSTILE) if self.rng.random() > 0.02 else DEEP
        fields[key] = value
        cap.records[i] = encode(fields) + rest
        return f"value: record {i} {key}={_short(value)}"

    def _header(self, cap: Capture) -> str:
        fields = json.loads(cap.header)
        key = self.rng.choice(["v", "v", "t0", "t0", "start", "client", "upstream", "session"])
        value = self.rng.choice(
            [*HOSTILE, "1.9", "2.0", "1.", ".1", "1.0.0", "01.0", RAW + '"' + "9" * 5000 + '.0"']
        )
        fields[key] = value
        cap.header = encode(fields)
        return f"header: {key}={_short(value)}"

    def _drop_field(self, cap: Capture) -> str:
        i = self._pick(cap)
        if i < 0:
            return "drop-field: no records"
        fields, rest = _line_and_rest(cap.records[i])
        key = self.rng.choice(sorted(fields))
        del fields[key]
        cap.records[i] = encode(fields) + rest
        return f"drop-field: record {i} {key}"

    def _kind(self, cap: Capture) -> str:
        i = self._pick(cap)
        if i < 0:
            return "kind: no records"
        fields, rest = _line_and_rest(cap.records[i])
        kinds = [fmt.DATA, fmt.REDACT, fmt.TLS, fmt.DROP, fmt.EOF, fmt.END, fmt.EVENT, "x"]
        fields["r"] = self.rng.choice([*kinds, fmt.IDENTITY, fmt.HEADER])
        cap.records[i] = encode(fields) + rest
        return f"kind: record {i} r={fields['r']}"

    def _flip(self, cap: Capture) -> str:
        raw = bytearray(cap.bytes())
        flips = []
        for _ in range(self.rng.randint(1, 8)):
            pos = self.rng.randrange(len(raw))
            raw[pos] ^= 1 << self.rng.randrange(8)
            flips.append(pos)
        cap.header, cap.records = bytes(raw), []
        return f"flip: bytes {flips}"

    def _truncate(self, cap: Capture) -> str:
        raw = cap.bytes()
        cut = self.rng.randrange(len(raw))
        cap.header, cap.records = raw[:cut], []
        return f"truncate: at {cut}"

    def _duplicate(self, cap: Capture) -> str:
        i = self._pick(cap)
        if i < 0:
            return "duplicate: no records"
        j = self.rng.randrange(len(cap.records) + 1)
        cap.records.insert(j, cap.records[i])
        return f"duplicate: record {i} at {j}"

    def _reorder(self, cap: Capture) -> str:
        if len(cap.records) < 2:
            return "reorder: too few records"
        i, j = self.rng.sample(range(len(cap.records)), 2)
        cap.records[i], cap.records[j] = cap.records[j], cap.records[i]
        return f"reorder: {i}<->{j}"

    def _delete(self, cap: Capture) -> str:
        i = self._pick(cap)
        if i < 0:
            return "delete: no records"
        del cap.records[i]
        return f"delete: record {i}"

    def _length(self, cap: Capture) -> str:
        data = [i for i, r in enumerate(cap.records) if r.startswith(b'{"r":"d"')]
        if not data:
            return "length: no data records"
        i = self.rng.choice(data)
        fields, rest = _line_and_rest(cap.records[i])
        n = fields["n"]
        fields["n"] = self.rng.choice([n - 1, n + 1, 0, n * 2, 1 << 22, (1 << 22) + 1, 1 << 36])
        cap.records[i] = encode(fields) + rest
        return f"length: record {i} n {n}->{fields['n']}"

    def _forge_end(self, cap: Capture) -> str:
        """A server chunk ending in an end record, and the real end record gone."""
        forged = encode({"r": fmt.END, "t": 9.0, "how": "quit", "user": "forged", "commands": 99})
        payload = b"+OK ready\r\n" + forged[:-1]
        record = b"".join(fmt.encode_data(Direction.SERVER, 0.5, payload))
        cap.records = [r for r in cap.records if not r.startswith(b'{"r":"end"')]
        cap.records.append(record)
        return "forge-end: a server chunk ends in an end record"

    def _insert_header(self, cap: Capture) -> str:
        j = self.rng.randrange(len(cap.records) + 1)
        cap.records.insert(j, cap.header)
        return f"insert-header: at {j}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
