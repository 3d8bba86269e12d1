"""serve and replay hold recordings in memory: past their bound they refuse in one line."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from popproxy.replay.script import MAX_HELD
from tests.support.captures import make_capture

BIG = MAX_HELD + (4 << 20)


def _big_capture(path: Path) -> Path:
    body = (b"x" * 1022 + b"\r\n") * (BIG // 1024)
    chunk = 1 << 20
    steps = [("s", 0.0, b"+OK ready\r\n"), ("c", 0.1, b"RETR 1\r\n")]
    steps.append(("s", 0.2, b"+OK %d octets\r\n" % len(body)))
    steps += [("s", 0.3, body[i : i + chunk]) for i in range(0, len(body), chunk)]
    steps += [("s", 0.4, b".\r\n"), ("c", 0.5, b"QUIT\r\n"), ("s", 0.6, b"+OK bye\r\n")]
    return make_capture(path, steps)


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (400 << 20, 400 << 20))


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "CAPTURE", "--listen", "127.0.0.1:0"],
        ["serve", "--mailbox", "CAPTURE", "--listen", "127.0.0.1:0"],
        ["replay", "CAPTURE", "--server", "127.0.0.1:9"],
    ],
)
def test_a_recording_too_large_to_hold_is_refused_in_one_line(
    tmp_path: Path, args: list[str]
) -> None:
    capture = _big_capture(tmp_path / "big.popcap")
    argv = [str(capture) if a == "CAPTURE" else a for a in args]
    code = (
        "import sys\n"
        "from popproxy.cli.main import main\n"
        "rc = main(sys.argv[1:])\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent.
        "status = open('/proc/self/status').read()\n"
        "peak = next(l.split()[1] for l in status.splitlines() if l.startswith('VmHWM'))\n"
        "print(f'peak {peak}', file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limited,
        env={"POPPROXY_PASSWORD": "x", "PATH": "/usr/bin:/bin", "NO_COLOR": "1"},
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("peak ")]
    assert len(lines) == 1 and "more than 48 MiB of recorded mail" in lines[0], lines
    peak_kib = int(done.stderr.rsplit("peak ", 1)[1].split()[0])
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib} KiB"
