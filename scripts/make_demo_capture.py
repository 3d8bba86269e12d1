"""Record popproxy/data/demo.popcap: a real Dovecot session, scrubbed, password redacted.

Run from the repository root (needs Dovecot, as the tests do)::

    .venv/bin/python scripts/make_demo_capture.py

A private Dovecot (tests/support/dovecot.py) with one account, demo/demo, holding three
of the test messages; popproxy's recording proxy in front of it, in-process; the demo's
poplib client (CAPA, USER/PASS, STAT, LIST, UIDL, TOP, RETR, DELE, QUIT).  Then host
names, ports and dates are scrubbed; the password is redacted by the recorder itself.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from popproxy.capture import format as fmt  # noqa: E402
from popproxy.capture.reader import CaptureReader  # noqa: E402
from popproxy.cli.demo import DEMO_PASSWORD, DEMO_USER, demo_client  # noqa: E402
from popproxy.core import Direction  # noqa: E402
from tests.support.dovecot import STANDARD_MESSAGES, DovecotServer  # noqa: E402
from tests.support.recorder import record  # noqa: E402

OUT = ROOT / "popproxy" / "data" / "demo.popcap"
HOST = "pop.example.net"
START = "2024-01-01T10:20:00Z"
T0 = 1704104400.0
_APOP_HOST = re.compile(rb"(<[^<>\s@]*@)[^<>\s]*>")


def scrub(src: Path, dst: Path) -> None:
    """Rewrite a capture with host names, ports and dates replaced; the rest kept as is."""
    pieces: list[bytes] = []
    with CaptureReader(src) as reader:
        header = dict(reader.header)
        header.update(
            start=START,
            t0=T0,
            client="127.0.0.1:50000",
            listen="127.0.0.1:1110",
            upstream=f"{HOST}:110",
            session=1,
        )
        pieces.append(fmt.encode_meta(header))
        greeting_done = False
        for record_ in reader.records():
            fields = dict(record_.fields)
            direction = record_.direction
            if record_.kind == fmt.DATA and record_.data is not None and direction is not None:
                data = record_.data
                if direction is Direction.SERVER and not greeting_done:
                    # The APOP timestamp (RFC 1939 §7) names the host: keep its shape.
                    data = _APOP_HOST.sub(rb"\1" + HOST.encode() + b">", data)
                    greeting_done = True
                pieces.extend(fmt.encode_data(direction, record_.t, data, proxy=record_.proxy))
                continue
            if record_.kind == fmt.EVENT and "addr" in fields:
                fields["addr"] = f"{HOST}:110"
            if record_.kind == fmt.END:
                fields["octets"] = None  # the greeting's length changed
            pieces.append(fmt.encode_meta(fields))
    dst.write_bytes(b"".join(pieces))


def main() -> int:
    server = DovecotServer(users={DEMO_USER: DEMO_PASSWORD})
    try:
        server.reset_mailbox(DEMO_USER, STANDARD_MESSAGES[:3])
        server.start()
        with tempfile.TemporaryDirectory() as tmp:
            path, _ = record(
                (server.host, server.port), Path(tmp), lambda host, port: demo_client(host, port)
            )
            OUT.parent.mkdir(exist_ok=True)
            scrub(path, OUT)
    finally:
        server.cleanup()
    data = OUT.read_bytes()
    assert DEMO_PASSWORD.encode() + b"\r\n" not in data.split(b"PASS ", 1)[1][:8], "not redacted"
    print(f"wrote {OUT} ({len(data)} octets)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
