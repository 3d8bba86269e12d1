"""``popproxy export --eml/--text/--html/--pcap`` on captures made from recorded sessions."""

from __future__ import annotations

import base64
import gc
import json
import shutil
import subprocess
import tracemalloc
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from popproxy.capture import format as fmt
from popproxy.capture.events import replay_events
from popproxy.capture.reader import CaptureReader
from popproxy.cli.main import main
from popproxy.core import Command, Direction, SaslResponse
from popproxy.inspect.eml import export_eml, safe_part
from popproxy.inspect.html import export_html
from popproxy.inspect.pcap import checksum, export_pcap
from popproxy.inspect.text import export_text
from tests.support.captures import HEADER, Step, make_capture
from tests.support.dovecot import STANDARD_MESSAGES, standard_uidls

C, S = Direction.CLIENT, Direction.SERVER
FIXTURES = Path(__file__).parent / "fixtures"


def load(name: str) -> dict[str, Any]:
    path = FIXTURES / f"{name}.json"
    if not path.exists():
        pytest.skip(f"{path.name} not recorded yet")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def fixture_steps(fixture: dict[str, Any]) -> list[Step]:
    return [
        (C if c["dir"] == "c" else S, float(c["t"]), base64.b64decode(c["b64"]))
        for c in fixture["chunks"]
    ]


def fixture_capture(tmp_path: Path, name: str) -> tuple[Path, dict[str, Any]]:
    fixture = load(name)
    return make_capture(tmp_path / f"{name}.popcap", fixture_steps(fixture)), fixture


def verbs_of(path: Path) -> list[str]:
    with CaptureReader(path) as reader:
        return [
            e.verb
            for _, _, events in replay_events(reader)
            for e in events
            if isinstance(e, Command)
        ]


def client_lines_of(path: Path) -> list[str]:
    """The first word of each client line: what tshark calls a request command.

    tshark's POP dissector does not follow AUTH, so SASL responses count as requests.
    """
    with CaptureReader(path) as reader:
        return [
            e.verb if isinstance(e, Command) else e.raw.split()[0].decode()
            for _, _, events in replay_events(reader)
            for e in events
            if isinstance(e, Command | SaslResponse)
        ]


# ------------------------------------------------------------------------------- eml


def test_eml_writes_each_retr_exactly_named_by_uidl(tmp_path: Path) -> None:
    cap, _ = fixture_capture(tmp_path, "poplib_userpass")
    with CaptureReader(cap) as reader:
        result = export_eml(reader, tmp_path / "mail")
    files = sorted((tmp_path / "mail").iterdir())
    assert files == sorted(result.written) and not result.partial and not result.warnings
    assert [f.read_bytes() for f in files] == list(STANDARD_MESSAGES)  # dot lines included
    for f, uid in zip(files, standard_uidls(), strict=True):
        assert f.name.endswith(f"-RETR-{uid}.eml"), f.name
        assert f.name.startswith(f"{cap.stem}-")  # the capture names its exports
    assert any(line.startswith(b".") for line in STANDARD_MESSAGES[1].split(b"\r\n"))


def test_eml_include_top_adds_top_results(tmp_path: Path) -> None:
    cap, _ = fixture_capture(tmp_path, "poplib_userpass")
    with CaptureReader(cap) as reader:
        result = export_eml(reader, tmp_path / "mail", include_top=True)
    tops = [p for p in result.written if p.name.endswith("-top.eml")]
    assert len(result.written) == 5 and len(tops) == 1
    assert f"-TOP-{standard_uidls()[0]}-top.eml" in tops[0].name
    head = tops[0].read_bytes()
    assert head.endswith(b"\r\n\r\n") and STANDARD_MESSAGES[0].startswith(head)  # TOP 1 0
    assert sorted(p.name for p in result.written) == [p.name for p in result.written]


def test_eml_pipelined_uses_uid_from_the_same_batch(tmp_path: Path) -> None:
    cap, _ = fixture_capture(tmp_path, "pipelined")
    with CaptureReader(cap) as reader:
        result = export_eml(reader, tmp_path / "mail")
    [only] = result.written
    assert only.name.endswith(f"-0001-RETR-{standard_uidls()[1]}.eml")
    assert only.read_bytes() == STANDARD_MESSAGES[1]


def test_eml_without_uidl_is_named_by_number(tmp_path: Path) -> None:
    cap, _ = fixture_capture(tmp_path, "curl_plain")
    with CaptureReader(cap) as reader:
        result = export_eml(reader, tmp_path / "mail")
    [only] = result.written
    assert only.name.endswith("-0001-RETR-msg-1.eml")
    assert only.read_bytes() == STANDARD_MESSAGES[0]


def test_eml_cut_off_body_is_partial(tmp_path: Path) -> None:
    steps = fixture_steps(load("poplib_userpass"))
    # Stop in the middle of RETR 4's body: the session's last server chunks never came.
    cut = next(i for i, s in enumerate(steps) if s[2].startswith(b"+OK 205253")) + 1
    cap = make_capture(tmp_path / "cut.popcap", steps[:cut], end=False)
    with CaptureReader(cap) as reader:
        result = export_eml(reader, tmp_path / "mail")
    [partial] = result.partial
    assert partial.name.endswith(f"-RETR-{standard_uidls()[3]}.partial.eml")
    assert "cut off" in result.warnings[0]
    body = partial.read_bytes()
    assert 0 < len(body) < len(STANDARD_MESSAGES[3]) and STANDARD_MESSAGES[3].startswith(body)
    assert not [p for p in (tmp_path / "mail").iterdir() if p.name.endswith(".tmp")]


def test_safe_part_keeps_uids_and_strips_path_tricks() -> None:
    assert safe_part("1704103201.M000001P1.popproxy") == "1704103201.M000001P1.popproxy"
    assert "/" not in safe_part("../../etc/passwd") and not safe_part("..").startswith(".")
    assert len(safe_part("x" * 500)) <= 80


# ------------------------------------------------------------------------- text, html


def sasl_tokens(fixture: dict[str, Any]) -> list[str]:
    """Every base64 token the client sent that carries the password (SASL lines, AUTH IR)."""
    client = b"".join(base64.b64decode(c["b64"]) for c in fixture["chunks"] if c["dir"] == "c")
    password = fixture["password"].encode()
    tokens = []
    for line in client.split(b"\r\n"):
        word = line.rsplit(b" ", 1)[-1]
        try:
            decoded = base64.b64decode(word, validate=True)
        except ValueError:
            continue
        if password in decoded:
            tokens.append(word.decode())
    return tokens


@pytest.mark.parametrize("name", ["poplib_userpass", "curl_plain", "curl_login", "pipelined"])
def test_text_has_both_sides_and_no_password(tmp_path: Path, name: str) -> None:
    cap, fixture = fixture_capture(tmp_path, name)
    out = tmp_path / "t.txt"
    with CaptureReader(cap) as reader:
        export_text(reader, out)
    text = out.read_text()
    assert "C: QUIT" in text and "S: +OK" in text
    assert fixture["password"] not in text
    assert not [token for token in sasl_tokens(fixture) if token in text]
    if name in ("curl_plain", "curl_login"):
        assert sasl_tokens(fixture), "the check above would have nothing to find"
    for line in text.splitlines():
        assert line.startswith(("#", " ")), line
    if name == "poplib_userpass":
        assert "C: USER alice" in text and "C: PASS" in text
        assert f"  1 {standard_uidls()[0]}\n" in text  # the UIDL listing, line by line
        assert "Subject: Lines that need dot-stuffing" in text  # RETR folded to a summary
        assert "To: Alice" not in text  # ... and not written out
    if name.startswith("curl"):
        assert "[SASL response" in text or "AUTH PLAIN •" in text


class _Checker(HTMLParser):
    """Tracks element nesting: every opened element must close in order."""

    VOID = frozenset({"meta", "br", "hr", "img", "input", "link", "col", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.mark.parametrize("name", ["poplib_userpass", "curl_cram_md5", "pipelined"])
def test_html_is_well_formed_self_contained_and_masked(tmp_path: Path, name: str) -> None:
    cap, fixture = fixture_capture(tmp_path, name)
    out = tmp_path / "t.html"
    with CaptureReader(cap) as reader:
        export_html(reader, out)
    page = out.read_text()
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert not checker.errors and not checker.stack
    text = "".join(checker.text)
    assert fixture["password"] not in page
    assert not [token for token in sasl_tokens(fixture) if token in page]
    assert "C: QUIT" in text and "+OK" in text
    for verb in verbs_of(cap):
        assert f"C: {verb}" in text
    assert "src=" not in page and "href=" not in page  # no external assets
    if name == "poplib_userpass":
        assert "<details>" in page and "Lines that need dot-stuffing" in text


def test_errors_and_anomalies_are_marked(tmp_path: Path) -> None:
    steps: list[Step] = [
        (S, 0.01, b"+OK hello\r\n"),
        (C, 0.02, b"USER alice\r\n"),
        (S, 0.03, b"+ok\r\n"),
        (C, 0.04, b"PASS wrong <pw>\r\n"),
        (S, 0.05, b"-ERR [AUTH] Authentication failed.\r\n"),
        (C, 0.06, b"QUIT\r\n"),
        (S, 0.07, b"+OK bye\r\n"),
    ]
    cap = make_capture(tmp_path / "err.popcap", steps)
    with CaptureReader(cap) as reader:
        export_html(reader, tmp_path / "e.html")
        export_text(reader, tmp_path / "e.txt")
    page, text = (tmp_path / "e.html").read_text(), (tmp_path / "e.txt").read_text()
    assert 'class="anomaly"' in page and "status-case" in page
    assert 'class="ex err-row"' in page and '<span class="code">[AUTH]</span>' in page
    assert "wrong" not in page and "&lt;pw&gt;" not in page and "<pw>" not in page
    assert "⚠ status-case" in text and "S: -ERR [AUTH] Authentication failed." in text
    assert "wrong" not in text


# ------------------------------------------------------------------------------ pcap


def _tshark(path: Path, *args: str) -> list[str]:
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark is not installed (scripts/test installs it)")
    done = subprocess.run(
        [tshark, "-r", str(path), *args], capture_output=True, text=True, timeout=120, check=True
    )
    return [line for line in done.stdout.splitlines() if line.strip()]


def test_checksum_matches_rfc1071_example() -> None:
    # RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (checksum 220d).
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert checksum(bytes.fromhex("0001f203f4f5f6"), b"") == 0x2304  # odd length: zero pad


@pytest.mark.parametrize("name", ["poplib_userpass", "curl_plain", "poplib_apop"])
def test_pcap_tshark_sees_every_command(tmp_path: Path, name: str) -> None:
    cap, _ = fixture_capture(tmp_path, name)
    out = tmp_path / "s.pcap"
    with CaptureReader(cap) as reader:
        result = export_pcap(reader, out)
    assert result.connections == 1
    shown = _tshark(out, "-T", "fields", "-e", "pop.request.command")
    assert shown == client_lines_of(cap)
    if name != "curl_plain":
        assert shown == verbs_of(cap)
    bad = _tshark(
        out,
        "-o",
        "tcp.check_checksum:TRUE",
        "-o",
        "ip.check_checksum:TRUE",
        "-Y",
        "tcp.checksum.status == 0 || ip.checksum.status == 0 || tcp.analysis.flags",
    )
    assert bad == []


def test_pcap_splits_big_records_and_keeps_timestamps(tmp_path: Path) -> None:
    cap, _ = fixture_capture(tmp_path, "poplib_userpass")
    out = tmp_path / "s.pcap"
    with CaptureReader(cap) as reader:
        export_pcap(reader, out)
    lens = _tshark(out, "-T", "fields", "-e", "frame.time_epoch", "-e", "ip.len")
    assert all(int(line.split()[1]) <= 65535 for line in lens)
    first = float(lens[0].split()[0])
    assert first == pytest.approx(HEADER["t0"], abs=1e-3)
    payload = sum(int(x) for x in _tshark(out, "-T", "fields", "-e", "tcp.len"))
    with CaptureReader(cap) as reader:
        assert payload == sum(len(r.data or b"") for r in reader.records())


def test_pcap_after_stls_plaintext_is_on_a_second_connection(tmp_path: Path) -> None:
    greeting = b"+OK Dovecot ready.\r\n"
    steps: list[Step] = [
        (S, 0.01, greeting),
        (C, 0.02, b"CAPA\r\n"),
        (S, 0.03, b"+OK\r\nCAPA\r\nSTLS\r\nUSER\r\n.\r\n"),
        (C, 0.04, b"STLS\r\n"),
        (S, 0.05, b"+OK Begin TLS negotiation now.\r\n"),
        ("tls", S, 0.06),
        ("tls", C, 0.07),
        (C, 0.08, b"USER alice\r\n"),
        (S, 0.09, b"+OK\r\n"),
        (C, 0.10, b"PASS alice-secret-pw 1\r\n"),
        (S, 0.11, b"+OK Logged in.\r\n"),
        (C, 0.12, b"STAT\r\n"),
        (S, 0.13, b"+OK 0 0\r\n"),
        (C, 0.14, b"QUIT\r\n"),
        (S, 0.15, b"+OK Logging out.\r\n"),
    ]
    cap = make_capture(tmp_path / "stls.popcap", steps)
    out = tmp_path / "stls.pcap"
    with CaptureReader(cap) as reader:
        result = export_pcap(reader, out)
    assert result.connections == 2
    assert any("after STLS" in line for line in result.endpoints)
    rows = _tshark(
        out,
        "-T",
        "fields",
        "-e",
        "tcp.stream",
        "-e",
        "pop.request.command",
        "-Y",
        "pop.request.command",
    )
    assert [r.split() for r in rows] == [
        ["0", "CAPA"],
        ["0", "STLS"],
        ["1", "USER"],
        ["1", "PASS"],
        ["1", "STAT"],
        ["1", "QUIT"],
    ]
    assert b"alice-secret-pw" not in out.read_bytes()


def test_pcap_passthrough_tls_stays_on_one_connection(tmp_path: Path) -> None:
    tls_bytes = bytes.fromhex("160301002a") + bytes(42)
    steps: list[Step] = [
        (S, 0.01, b"+OK ready\r\n"),
        (C, 0.02, b"STLS\r\n"),
        (S, 0.03, b"+OK Begin TLS negotiation now.\r\n"),
        ("tls", S, 0.04, False),
        ("tls", C, 0.04, False),
        (C, 0.05, tls_bytes),
        (S, 0.06, tls_bytes),
    ]
    cap = make_capture(tmp_path / "pt.popcap", steps)
    out = tmp_path / "pt.pcap"
    with CaptureReader(cap) as reader:
        result = export_pcap(reader, out)
    assert result.connections == 1
    assert _tshark(out, "-T", "fields", "-e", "pop.request.command") == ["STLS"]
    assert len(_tshark(out, "-Y", "tls")) == 2  # tshark reads the rest as TLS records


# ------------------------------------------------------------------------------- CLI


def test_cli_runs_every_exporter_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cap, fixture = fixture_capture(tmp_path, "poplib_userpass")
    code = main(
        [
            "export",
            str(cap),
            "--eml",
            str(tmp_path / "mail"),
            "--include-top",
            "--text",
            str(tmp_path / "t.txt"),
            "--html",
            str(tmp_path / "t.html"),
            "--pcap",
            str(tmp_path / "t.pcap"),
            "--streams",
            str(tmp_path / "raw"),
        ]
    )
    assert code == 0
    assert len(list((tmp_path / "mail").iterdir())) == 5
    for name in ("t.txt", "t.html", "t.pcap", "raw/client.bin"):
        assert (tmp_path / name).stat().st_size > 0
    err = capsys.readouterr().err
    assert "5 message(s) written" in err and "packets" in err
    assert fixture["password"] not in (tmp_path / "t.txt").read_text()


def test_cli_include_top_needs_eml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cap, _ = fixture_capture(tmp_path, "curl_plain")
    assert main(["export", str(cap), "--text", str(tmp_path / "t"), "--include-top"]) == 2
    assert "--include-top" in capsys.readouterr().err


def test_cli_unwritable_target_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cap, _ = fixture_capture(tmp_path, "curl_plain")
    assert main(["export", str(cap), "--text", str(tmp_path / "no" / "such" / "t.txt")]) == 2
    assert "error" in capsys.readouterr().err


# ---------------------------------------------------------------------------- memory

BIG = 50 * 1024 * 1024


def big_capture(path: Path) -> bytes:
    """A session retrieving one ~50 MB message, written chunk by chunk; returns its sha256."""
    import hashlib

    digest = hashlib.sha256()
    line = b"x" * 998 + b"\r\n"
    dotted = b"." + b"y" * 997 + b"\r\n"  # RFC 1939 §3: sent as "..yyy"
    block = (line * 31 + dotted) * 2  # 64,000 octets, unstuffed
    with open(path, "wb") as f:
        f.write(fmt.encode_meta({"r": fmt.HEADER, "v": fmt.VERSION, **HEADER}))

        def data(d: str, t: float, raw: bytes) -> None:
            f.write(b"".join(fmt.encode_data(Direction(d), t, raw)))

        data("s", 0.0, b"+OK ready\r\n")
        data("c", 0.01, b"RETR 1\r\n")
        data("s", 0.02, b"+OK message follows\r\n")
        stuffed = block.replace(b"\r\n.", b"\r\n..")
        assert not block.startswith(b".")
        for i in range(BIG // len(block)):
            digest.update(block)
            data("s", 0.02 + i * 1e-5, stuffed)
        data("s", 1.0, b".\r\n")
        data("c", 1.1, b"QUIT\r\n")
        data("s", 1.2, b"+OK bye\r\n")
        f.write(fmt.encode_meta({"r": fmt.END, "t": 1.2, "how": "quit"}))
    return digest.digest()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("big") / "big.popcap"
    return path, big_capture(path)


@pytest.mark.parametrize("exporter", ["eml", "text", "html", "pcap"])
def test_exports_of_a_50mb_body_use_bounded_memory(
    tmp_path: Path, big: tuple[Path, bytes], exporter: str
) -> None:
    import hashlib

    path, digest = big
    gc.collect()
    tracemalloc.start()
    try:
        with CaptureReader(path) as reader:
            if exporter == "eml":
                result = export_eml(reader, tmp_path / "mail")
            elif exporter == "text":
                export_text(reader, tmp_path / "t.txt")
            elif exporter == "html":
                export_html(reader, tmp_path / "t.html")
            else:
                export_pcap(reader, tmp_path / "t.pcap")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < BIG // 10, f"peak {peak:,} octets for a {BIG:,}-octet body"
    if exporter == "eml":
        [eml] = result.written
        h = hashlib.sha256()
        with open(eml, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        assert h.digest() == digest
    elif exporter == "html":
        assert (tmp_path / "t.html").stat().st_size < 1 << 20  # the body preview is bounded
