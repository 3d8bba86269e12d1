"""Capture format v1: writer and reader round trips, torn and corrupt files, redaction."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from popproxy.capture import format as fmt
from popproxy.capture.format import CaptureError
from popproxy.capture.reader import CaptureReader
from popproxy.capture.writer import CaptureWriter, create_capture_file
from popproxy.core import Direction, Observer, Secret, SecretKind
from popproxy.inspect.document import capture_json
from popproxy.proxy.tap import Tap

C, S = Direction.CLIENT, Direction.SERVER
HEADER = {"session": 7, "client": "127.0.0.1:1", "upstream": "127.0.0.1:2"}


def write_capture(path: Path, writer: CaptureWriter) -> Path:
    writer.flush_all()
    fd = create_capture_file(path)
    try:
        fmt.write_all(fd, writer.take())
    finally:
        os.close(fd)
    return path


def sample_writer(*, end: bool = True) -> CaptureWriter:
    w = CaptureWriter(HEADER)
    big = bytes(range(256)) * 40 + b'\n\n{"r":"end"}\n'  # binary, with LFs and a fake record
    w.data(S, 0.001, b"+OK ready\r\n")
    w.event(0.002, "upstream-connected", addr="x")
    w.data(C, 0.003, b"STAT\r\n")
    w.data(S, 0.004, b"+OK 1 10240\r\n")
    w.data(S, 0.005, big)
    w.data(S, 0.007, b"-ERR [SYS/TEMP] popproxy made this\r\n", proxy=True)
    w.eof(S, 0.008)
    if end:
        w.meta({"r": fmt.END, "t": 0.009, "how": "quit", "error": None})
    w.advance(1 << 40, 1 << 40)
    return w


def test_round_trip(tmp_path: Path) -> None:
    path = write_capture(tmp_path / "a.popcap", sample_writer())
    with CaptureReader(path) as reader:
        assert reader.header["v"] == fmt.VERSION
        assert reader.header["session"] == 7
        records = list(reader.records())
        assert reader.warnings == []
        assert reader.end() == {"r": "end", "t": 0.009, "how": "quit", "error": None}
    kinds = [r.kind for r in records]
    assert kinds == ["d", "event", "d", "d", "d", "d", "eof", "end"]
    data = [r for r in records if r.kind == fmt.DATA]
    assert data[0].data == b"+OK ready\r\n" and data[0].fields["d"] == "s"
    assert data[1].data == b"STAT\r\n" and data[1].fields["d"] == "c"
    assert [r.direction for r in data] == [S, C, S, S, S]
    assert [r.proxy for r in data] == [False, False, False, False, True]
    assert records[6].kind == fmt.EOF and records[6].direction is S and not records[6].proxy
    assert data[3].data is not None and data[3].data.startswith(bytes(range(256)))
    assert data[4].fields.get("p") == 1 and "p" not in data[0].fields
    assert [r.t for r in data] == [0.001, 0.003, 0.004, 0.005, 0.007]
    assert records[1].fields == {
        "r": "event",
        "t": 0.002,
        "kind": "upstream-connected",
        "addr": "x",
    }


def test_mode_0600_and_exclusive(tmp_path: Path) -> None:
    path = write_capture(tmp_path / "a.popcap", sample_writer())
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        create_capture_file(path)


def _record_starts(blob: bytes) -> list[int]:
    """Byte offsets where each record (after the header) starts."""
    starts = []
    pos = blob.index(b"\n") + 1
    while pos < len(blob):
        starts.append(pos)
        nl = blob.index(b"\n", pos)
        fields = json.loads(blob[pos:nl])
        pos = nl + 1
        if fields["r"] == fmt.DATA:
            pos += fields["n"] + 1
    return starts


@pytest.mark.parametrize("end", [True, False], ids=["last-is-meta", "last-is-data"])
def test_truncated_at_every_offset_of_the_last_record(tmp_path: Path, end: bool) -> None:
    w = sample_writer(end=end)
    if not end:
        w.data(S, 0.01, b"+OK last chunk\r\nwith more\r\n")
        w.advance(1 << 40, 1 << 40)
    full = write_capture(tmp_path / "full.popcap", w).read_bytes()
    with CaptureReader(tmp_path / "full.popcap") as reader:
        complete = list(reader.records())
    last = _record_starts(full)[-1]
    assert complete[-1].kind == (fmt.END if end else fmt.DATA)
    for cut in range(last + 1, len(full)):
        path = tmp_path / f"cut-{cut}.popcap"
        path.write_bytes(full[:cut])
        with CaptureReader(path) as reader:
            records = list(reader.records())
            assert records == complete[:-1], cut
            assert len(reader.warnings) == 1, cut
            assert "last complete record" in reader.warnings[0]
            if end:
                assert reader.end() is None
        path.unlink()


def test_cut_at_a_record_boundary_warns_of_the_missing_end(tmp_path: Path) -> None:
    full = write_capture(tmp_path / "full.popcap", sample_writer()).read_bytes()
    last = _record_starts(full)[-1]
    path = tmp_path / "cut.popcap"
    path.write_bytes(full[:last])
    with CaptureReader(path) as reader:
        assert len(list(reader.records())) == 7
        assert len(reader.warnings) == 1 and "no end record" in reader.warnings[0]
        assert reader.end() is None


@pytest.mark.parametrize("which", ["meta-line", "data-length", "data-terminator"])
def test_corruption_in_the_middle_raises(tmp_path: Path, which: str) -> None:
    full = bytearray(write_capture(tmp_path / "full.popcap", sample_writer()).read_bytes())
    starts = _record_starts(bytes(full))
    if which == "meta-line":
        pos = starts[1]  # the event record
        full[pos : pos + 5] = b"xxxxx"
    elif which == "data-length":
        pos = starts[2]  # STAT's data record: claims one octet more than it has
        full[pos : pos + full.index(b"\n", pos) - pos] = b'{"r":"d","d":"c","t":0.003,"n":7}'
    else:
        pos = starts[3]
        nl = full.index(b"\n", pos)
        n = json.loads(full[pos:nl])["n"]
        full[nl + 1 + n] = ord("X")  # the LF after the data
    path = tmp_path / "bad.popcap"
    path.write_bytes(bytes(full))
    with CaptureReader(path) as reader, pytest.raises(CaptureError) as info:
        list(reader.records())
    assert str(path) in str(info.value)


def test_newer_major_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v2.popcap"
    path.write_bytes(fmt.encode_meta({"r": fmt.FORMAT_NAME, "v": "2.0"}))
    with pytest.raises(CaptureError) as info:
        CaptureReader(path)
    message = str(info.value)
    assert "2.0" in message and "newer" in message and "upgrade" in message
    assert "\n" not in message


def test_newer_minor_version_is_read(tmp_path: Path) -> None:
    path = tmp_path / "v1.9.popcap"
    path.write_bytes(
        fmt.encode_meta({"r": fmt.FORMAT_NAME, "v": "1.9"})
        + b'{"r":"d","d":"s","t":0.1,"n":4}\n+OK\n\n'
    )
    with CaptureReader(path) as reader:
        assert [r.data for r in reader.records()] == [b"+OK\n"]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello\n",
        b"[1, 2]\n",
        b'{"r":"other"}\n',
        b'{"r":"popproxy-capture"}\n',
        b"\x00\xff\n",
    ],
)
def test_not_a_capture(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.popcap"
    path.write_bytes(content)
    with pytest.raises(CaptureError):
        CaptureReader(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(CaptureError):
        CaptureReader(tmp_path / "nope.popcap")
    with pytest.raises(CaptureError):
        CaptureReader(tmp_path)


def test_unknown_record_kinds_are_skipped(tmp_path: Path) -> None:
    w = CaptureWriter(HEADER)
    w.data(S, 0.1, b"+OK hi\r\n")
    w.meta({"r": "hologram", "t": 0.15, "colour": "teal"})
    w.data(C, 0.2, b"NOOP\r\n")
    w.meta({"r": "future-kind"})
    w.data(S, 0.3, b"+OK\r\n")
    w.meta({"r": fmt.END, "t": 0.4, "how": "closed"})
    path = write_capture(tmp_path / "u.popcap", w)
    with CaptureReader(path) as reader:
        kinds = [r.kind for r in reader.records()]
    assert "hologram" in kinds and "future-kind" in kinds
    with CaptureReader(path) as reader:
        doc = capture_json(reader)
    assert [(ex["kind"], ex["command"], ex["status"]) for ex in doc["exchanges"]] == [
        ("greeting", None, "+OK"),
        ("command", "NOOP", "+OK"),
    ]
    assert doc["session"]["end"]["how"] == "closed"


class _CountingFile:
    """Wraps a binary file and counts the bytes read through it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.bytes_read += len(data)
        return bytes(data)

    def readline(self, n: int | None = -1) -> bytes:
        data = self.inner.readline(n)
        self.bytes_read += len(data)
        return bytes(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        return int(self.inner.seek(pos, whence))

    def tell(self) -> int:
        return int(self.inner.tell())

    def fileno(self) -> int:
        return int(self.inner.fileno())

    def close(self) -> None:
        self.inner.close()


def test_end_reads_only_record_lines(tmp_path: Path) -> None:
    w = CaptureWriter(HEADER)
    chunk = b"x" * 65536
    for i in range(320):  # ~20 MB
        w.data(S, i / 1000, chunk)
    w.meta({"r": fmt.END, "t": 1.0, "how": "quit"})
    path = write_capture(tmp_path / "big.popcap", w)
    assert path.stat().st_size > 20_000_000
    with CaptureReader(path) as reader:
        counting = _CountingFile(reader._file)
        reader._file = counting  # type: ignore[assignment]
        assert reader.end() == {"r": "end", "t": 1.0, "how": "quit"}
        assert counting.bytes_read <= 65536  # data is seeked over, never read


def test_a_record_after_the_end_record_is_corruption(tmp_path: Path) -> None:
    w = CaptureWriter(HEADER)
    w.meta({"r": fmt.END, "t": 1.0, "how": "quit"})
    w.data(S, 1.1, b"+OK late\r\n")
    path = write_capture(tmp_path / "e.popcap", w)
    for read in (lambda r: r.end(), lambda r: list(r.records())):
        with CaptureReader(path) as reader, pytest.raises(CaptureError, match="after the end"):
            read(reader)


# --------------------------------------------------------------------------- redaction


def test_redaction_same_length_filler_and_offsets(tmp_path: Path) -> None:
    w = CaptureWriter(HEADER)
    first, second = b"USER bob\r\nPASS hun", b"ter2\r\nSTAT\r\n"
    w.data(C, 0.1, first)
    w.data(C, 0.2, second)
    w.observe([Secret(C, 15, 7, SecretKind.PASS)])  # "hunter2" spans both chunks
    w.advance(len(first) + len(second), 0)
    path = write_capture(tmp_path / "r.popcap", w)
    with CaptureReader(path) as reader:
        records = list(reader.records())
    data = [r.data for r in records if r.kind == fmt.DATA]
    assert data == [b"USER bob\r\nPASS ###", b"####\r\nSTAT\r\n"]
    assert [len(d or b"") for d in data] == [len(first), len(second)]
    (redact,) = [r.fields for r in records if r.kind == fmt.REDACT]
    assert redact == {"r": "redact", "d": "c", "off": 15, "len": 7, "kind": "PASS", "masked": True}
    assert b"hunter2" not in path.read_bytes()


def test_secret_spanning_chunks_is_not_a_late_redaction() -> None:
    w = CaptureWriter(HEADER)
    w.data(C, 0.1, b"PASS hun")
    w.data(C, 0.2, b"ter2\r\n")
    w.observe([Secret(C, 5, 7, SecretKind.PASS)])  # known before any byte of it is written
    w.advance(14, 0)
    assert w.stats.redactions == 1
    assert w.stats.late_redactions == 0


def test_keep_secrets_records_the_span_unmasked(tmp_path: Path) -> None:
    w = CaptureWriter(HEADER, keep_secrets=True)
    w.data(C, 0.1, b"PASS hunter2\r\n")
    w.observe([Secret(C, 5, 7, SecretKind.PASS)])
    w.advance(14, 0)
    path = write_capture(tmp_path / "k.popcap", w)
    with CaptureReader(path) as reader:
        records = list(reader.records())
    assert [r.data for r in records if r.kind == fmt.DATA] == [b"PASS hunter2\r\n"]
    (redact,) = [r.fields for r in records if r.kind == fmt.REDACT]
    assert redact["masked"] is False and redact["off"] == 5 and redact["len"] == 7


def test_writer_holds_data_until_settled() -> None:
    w = CaptureWriter(HEADER)
    w.take()
    w.data(C, 0.1, b"AUTH PLAIN\r\n")
    w.advance(0, 0)
    assert b"".join(w.take()) == b""  # not settled: nothing released
    w.advance(12, 0)
    assert b"AUTH PLAIN\r\n" in b"".join(w.take())


def test_tap_redacts_through_the_real_observer(tmp_path: Path) -> None:
    """Secrets found by the observer are masked even when split over many tiny chunks."""
    writer = CaptureWriter(HEADER)
    tap = Tap(writer, None)
    server = b"+OK <1.2@host>\r\n+OK\r\n+OK\r\n+ \r\n+OK\r\n+OK bye\r\n"
    client = b"USER alice\r\nPASS s3cr3t-pass\r\nAUTH PLAIN\r\nAGFsaWNlAHMzY3IzdC1wYXNz\r\nQUIT\r\n"
    tap.data(S, 0.0, server[:16])
    for i, b in enumerate(client):  # one byte at a time
        tap.data(C, 0.001 * i, bytes([b]))
    tap.data(S, 0.5, server[16:])
    tap.data(C, 0.6, b"")
    tap.data(S, 0.6, b"")
    writer.flush_all()
    path = tmp_path / "t.popcap"
    fd = create_capture_file(path)
    fmt.write_all(fd, writer.take())
    os.close(fd)
    raw = path.read_bytes()
    assert b"s3cr3t-pass" not in raw
    assert b"AGFsaWNlAHMzY3IzdC1wYXNz" not in raw
    with CaptureReader(path) as reader:
        c = b"".join(
            r.data or b"" for r in reader.records() if r.kind == fmt.DATA and r.fields["d"] == "c"
        )
    assert len(c) == len(client)
    assert c.replace(b"#", b"") == client.replace(b"s3cr3t-pass", b"").replace(
        b"AGFsaWNlAHMzY3IzdC1wYXNz", b""
    )
    assert tap.broken is None
    assert writer.stats.redactions == 2


def test_observer_is_fed_real_bytes() -> None:
    """Sanity: the observer really emits the PASS secret the writer relies on."""
    obs = Observer()
    obs.receive_data(S, b"+OK hi\r\n")
    events = obs.receive_data(C, b"PASS abc\r\n")
    assert any(isinstance(e, Secret) and e.offset == 5 and e.length == 3 for e in events)
