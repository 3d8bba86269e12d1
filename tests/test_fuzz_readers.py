"""Any file in, a clean answer out: every reader of captures, fed mutated real captures.

The contract, for each reader and each mutant: exit 0 (1 where differences or findings
mean 1), or exit 2 with one ``popproxy CMD: error: ...`` line; never an exception, never a
hang.  Memory is checked in subprocesses under RLIMIT_AS (``test_worst_inputs_*``).
``POPPROXY_FUZZ_SEED`` and ``POPPROXY_FUZZ_MUTANTS`` vary the run.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest
import trio

from popproxy.capture import format as fmt
from popproxy.capture.format import CaptureError
from popproxy.cli.main import main
from popproxy.core import Direction
from popproxy.replay.fake import ServeConfig, serve_replay
from popproxy.replay.pytest_plugin import _TrioThread
from popproxy.replay.script import load_sessions
from tests.support.captures import fixture_steps, make_capture
from tests.support.mutants import DEEP, Capture, Mutator, encode, split
from tests.test_export import FIXTURES, fixture_capture

pytest_plugins = ["pytester"]

SEED = int(os.environ.get("POPPROXY_FUZZ_SEED", "20261201"))
MUTANTS = int(os.environ.get("POPPROXY_FUZZ_MUTANTS", "520"))
CALL_TIMEOUT = 10.0  # seconds one reader may take on one small mutant
MEMORY_LIMIT = 100 * 1024 * 1024
DEMO = Path(__file__).parent.parent / "popproxy" / "data" / "demo.popcap"

# Each reader: (name, argv builder, allowed exit codes).  ``work`` is a fresh folder.
Reader = tuple[str, Callable[[Path, Path, Path], list[str]], frozenset[int]]
OK_OR_ERROR = frozenset({0, 2})
READERS: list[Reader] = [
    ("show", lambda p, seed, work: ["show", str(p)], OK_OR_ERROR),
    ("show --json", lambda p, seed, work: ["show", "--json", str(p)], OK_OR_ERROR),
    ("show --raw", lambda p, seed, work: ["show", "--raw", str(p)], OK_OR_ERROR),
    ("show --bodies", lambda p, seed, work: ["show", "--bodies", "--errors", str(p)], OK_OR_ERROR),
    ("list", lambda p, seed, work: ["list", str(p.parent)], OK_OR_ERROR),
    ("list --json", lambda p, seed, work: ["list", "--json", str(p.parent)], OK_OR_ERROR),
    ("stats", lambda p, seed, work: ["stats", str(p)], OK_OR_ERROR),
    ("stats --json", lambda p, seed, work: ["stats", "--json", str(p)], OK_OR_ERROR),
    ("diff", lambda p, seed, work: ["diff", str(seed), str(p)], frozenset({0, 1, 2})),
    ("lint", lambda p, seed, work: ["lint", "--json", str(p)], frozenset({0, 1, 2})),
    (
        "export --eml",
        lambda p, seed, work: ["export", str(p), "--eml", str(work / "m")],
        OK_OR_ERROR,
    ),
    (
        "export --text",
        lambda p, seed, work: ["export", str(p), "--text", str(work / "t")],
        OK_OR_ERROR,
    ),
    (
        "export --html",
        lambda p, seed, work: ["export", str(p), "--html", str(work / "h")],
        OK_OR_ERROR,
    ),
    (
        "export --pcap",
        lambda p, seed, work: ["export", str(p), "--pcap", str(work / "p")],
        OK_OR_ERROR,
    ),
    (
        "export --streams",
        lambda p, seed, work: ["export", str(p), "--streams", str(work / "s")],
        OK_OR_ERROR,
    ),
]


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def alarm(_sig: int, _frame: FrameType | None) -> None:
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check_answer(
    name: str, code: object, out: str, err: str, allowed: frozenset[int], why: str
) -> None:
    """The contract: an allowed exit code; on 2, exactly one error line; no traceback."""
    assert code in allowed, f"{name}: exit {code!r} for {why}\n{err[-2000:]}"
    assert "Traceback" not in err and "Traceback" not in out, f"{name}: traceback for {why}"
    lines = err.splitlines()
    for line in lines:
        assert line.startswith("popproxy "), f"{name}: stray stderr line {line!r} for {why}"
    errors = [line for line in lines if ": error: " in line]
    if code == 2:
        assert len(errors) == 1, f"{name}: exit 2 with {len(errors)} error lines for {why}"
    else:
        assert not errors, f"{name}: exit {code} with an error line for {why}: {errors}"


def run_reader(
    reader: Reader, path: Path, seed: Path, work: Path, capsys: pytest.CaptureFixture[str], why: str
) -> int:
    name, argv, allowed = reader
    work.mkdir(exist_ok=True)
    try:
        with deadline(CALL_TIMEOUT):
            code: object = main(argv(path, seed, work))
    except SystemExit as exc:
        code = exc.code
    except BaseException as exc:
        out, err = capsys.readouterr()
        raise AssertionError(f"{name}: {type(exc).__name__}: {exc} for {why}") from exc
    out, err = capsys.readouterr()
    check_answer(name, code, out, err, allowed, why)
    assert isinstance(code, int)
    return int(code)


# ------------------------------------------------------------------ seed captures


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Capture]]:
    """Real captures: the fixtures' sessions written by the real writer, and the demo's."""
    folder = tmp_path_factory.mktemp("seeds")
    paths = [DEMO, tls_seed(folder / "stls.popcap")]
    for fixture in sorted(FIXTURES.glob("*.json")):
        path, _ = fixture_capture(folder, fixture.stem)
        paths.append(path)
    return [(path, split(path)) for path in paths]


def tls_seed(path: Path) -> Path:
    """A session upgraded by STLS, with the record kinds the other seeds lack: tls, drop,
    and popproxy's own bytes (``p``)."""
    steps = fixture_steps("poplib_userpass")
    greeting, rest = steps[0], steps[1:]
    upgrade = [
        ("c", 0.001, b"STLS\r\n"),
        ("s", 0.002, b"+OK Begin TLS negotiation\r\n"),
        ("tls", "c", 0.003),
        ("tls", "s", 0.003),
    ]
    make_capture(path, [greeting, *upgrade, *rest])
    cap = split(path)
    drop = encode({"r": fmt.DROP, "d": "c", "off": 0, "len": 6, "why": "answered by popproxy"})
    own = b"".join(
        fmt.encode_data(Direction.SERVER, 0.004, b"-ERR [SYS/TEMP] not now\r\n", proxy=True)
    )
    cap.records[3:3] = [drop, own]
    path.write_bytes(cap.bytes())
    return path


def mutants(seeds: list[tuple[Path, Capture]], count: int) -> Iterator[tuple[Path, bytes, str]]:
    rng = random.Random(SEED)
    mutators = [(path, Mutator(cap, rng)) for path, cap in seeds]
    for i in range(count):
        path, mutator = mutators[i % len(mutators)]
        data, done = mutator.mutant()
        yield path, data, f"mutant {i} of {path.name} (seed {SEED}): {'; '.join(done)}"


# ------------------------------------------------------------------ the fuzzer


ALWAYS = ("show --json", "list --json")  # the widest use of every field, and the end walk
ROTATE = 3  # further readers per mutant, in turn: each reader sees over 110 mutants


def test_fuzz_every_reader(
    seeds: list[tuple[Path, Capture]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each mutant goes through the CLI readers, plus the replay/serve/plugin loader."""
    started = time.monotonic()
    codes: dict[str, dict[int, int]] = {name: {} for name, _, _ in READERS}
    always = [r for r in READERS if r[0] in ALWAYS]
    others = [r for r in READERS if r[0] not in ALWAYS]
    loaded = 0
    for i, (seed, data, why) in enumerate(mutants(seeds, MUTANTS)):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        path = folder / "mutant.popcap"
        path.write_bytes(data)
        chosen = always + [others[(i * ROTATE + k) % len(others)] for k in range(ROTATE)]
        try:
            for reader in chosen:
                work = tmp_path / f"w{i}-{reader[0].replace(' ', '')}"
                code = run_reader(reader, path, seed, work, capsys, why)
                codes[reader[0]][code] = codes[reader[0]].get(code, 0) + 1
            with deadline(CALL_TIMEOUT):
                try:
                    load_sessions([str(path)])  # what replay, serve and the plugin read
                    loaded += 1
                except CaptureError as exc:
                    assert "\n" not in str(exc), why
        except BaseException:
            keep = Path(os.environ.get("POPPROXY_FUZZ_KEEP", tmp_path)) / f"failing-{i}.popcap"
            keep.write_bytes(data)
            print(f"failing mutant kept at {keep}", file=sys.__stderr__)
            raise
        finally:
            for leftover in list(folder.parent.glob(f"w{i}-*")):
                _rmtree(leftover)
            _rmtree(folder)
    elapsed = time.monotonic() - started
    summary = ", ".join(f"{name} {sorted(c.items())}" for name, c in codes.items())
    print(f"\n{MUTANTS} mutants in {elapsed:.1f} s; exit codes per reader: {summary}")
    for name, counts in codes.items():
        assert sum(counts.values()) >= MUTANTS * ROTATE // len(others), name
    # Both kinds of answer occur: the fuzzer is not only feeding unreadable junk.
    shown = codes["show --json"]
    assert shown.get(0, 0) > MUTANTS // 5 and shown.get(2, 0) > MUTANTS // 5
    assert loaded > MUTANTS // 5


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            _rmtree(child)
        path.rmdir()
    else:
        path.unlink()


def test_fuzz_replay_against_serve(
    seeds: list[tuple[Path, Capture]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Mutants that still load are served by the fake server and replayed against it."""
    played = 0
    for i, (_seed, data, why) in enumerate(mutants(seeds, MUTANTS // 12)):
        path = tmp_path / f"r{i}.popcap"
        path.write_bytes(data)
        try:
            sessions = load_sessions([str(path)])
        except CaptureError:
            continue
        config = ServeConfig(sessions=sessions, listen=("127.0.0.1", 0), timeout=2.0)

        async def serve(
            task_status: trio.TaskStatus[list[tuple[str, int]]],
            config: ServeConfig = config,
        ) -> None:
            await serve_replay(config, None, announce=False, task_status=task_status)

        thread = _TrioThread(serve)
        host, port = thread.start()[0]
        try:
            argv = ["replay", str(path), "--server", f"{host}:{port}", "--password", "pw"]
            argv += ["--timeout", "2"]
            name = "replay"
            try:
                with deadline(CALL_TIMEOUT):
                    code: object = main(argv)
            except SystemExit as exc:
                code = exc.code
            out, err = capsys.readouterr()
            check_answer(name, code, out, err, frozenset({0, 1, 2}), why)
        finally:
            thread.stop()
        assert thread.error is None, f"serve: {thread.error!r} for {why}"
        played += 1
    assert played > 10


# ------------------------------------------------------------------ targeted cases


def write(path: Path, header: bytes, *records: bytes) -> Path:
    path.write_bytes(header + b"".join(records))
    return path


@pytest.fixture
def demo() -> Capture:
    return split(DEMO)


def every_reader(path: Path, capsys: pytest.CaptureFixture[str], why: str) -> list[int]:
    """Run every reader on ``path`` (checking the contract); their exit codes."""
    codes = []
    for reader in READERS:
        work = path.parent / f"work-{reader[0].replace(' ', '').replace('-', '')}"
        codes.append(run_reader(reader, path, DEMO, work, capsys, why))
    return codes


def test_a_forged_end_record_in_a_server_chunk_is_not_the_summary(
    tmp_path: Path, demo: Capture, capsys: pytest.CaptureFixture[str]
) -> None:
    forged = encode({"r": fmt.END, "t": 9.0, "how": "quit", "user": "forged", "commands": 99})
    records = [r for r in demo.records if not r.startswith(b'{"r":"end"')]
    chunk = b"".join(fmt.encode_data(Direction.SERVER, 0.5, b"+OK hi\r\n" + forged[:-1]))
    path = write(tmp_path / "running.popcap", demo.header, *records, chunk)
    assert path.read_bytes().endswith(b"\n" + forged)  # looks like an end record at the tail
    assert main(["list", "--json", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert '"unfinished": true' in out
    assert '"user": "forged"' not in out and '"commands": 99' not in out


def test_an_over_long_line_mid_file_is_corruption_in_list_and_show(
    tmp_path: Path, demo: Capture, capsys: pytest.CaptureFixture[str]
) -> None:
    long = b'{"r":"event","kind":"x","detail":"' + b"a" * (1 << 20) + b'"}\n'
    at = len(demo.header) + sum(len(r) for r in demo.records[:3])
    path = write(tmp_path / "long.popcap", demo.header, *demo.records[:3], long, *demo.records[3:])
    answers = []
    for argv in (["show", str(path)], ["list", str(tmp_path)], ["stats", str(path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"corrupt record at byte {at:,}" in err
        answers.append(err.split("error: ", 1)[1])
    assert len(set(answers)) == 1  # the same answer, word for word


def test_a_torn_last_record_is_still_a_warning(
    tmp_path: Path, demo: Capture, capsys: pytest.CaptureFixture[str]
) -> None:
    body = demo.records[:-3]
    last = demo.records[-3]
    for cut in (1, len(last) // 2, len(last) - 1):
        path = write(tmp_path / f"torn{cut}.popcap", demo.header, *body, last[:cut])
        assert main(["show", str(path)]) == 0
        err = capsys.readouterr().err
        assert "warning" in err and "error" not in err


@pytest.mark.parametrize(
    ("what", "header", "line"),
    [
        ("100 GiB declared", None, b'{"r":"d","d":"s","t":0.1,"n":107374182400}\n+OK\r\n\n'),
        ("4 MiB + 1 declared", None, b'{"r":"d","d":"s","t":0.1,"n":4194305}\n+OK\r\n\n'),
        ("non-numeric t", None, b'{"r":"d","d":"s","t":"soon","n":3}\n+OK\n'),
        ("unknown direction", None, b'{"r":"d","d":"x","t":0.1,"n":3}\n+OK\n'),
        ("lone surrogate", None, b'{"r":"event","kind":"\\ud800","detail":"\\udfff"}\n'),
        ("NaN t", None, b'{"r":"eof","d":"s","t":NaN}\n'),
        ("Infinity t", None, b'{"r":"eof","d":"s","t":1e999}\n'),
        ("JSON 100,000 deep", None, (DEEP[5:] + "\n").encode()),
        ("5,000-digit version", b'{"r":"popproxy-capture","v":"' + b"9" * 5000 + b'.0"}\n', b""),
        ("5,000-digit number", None, b'{"r":"eof","d":"s","t":' + b"9" * 5000 + b"}\n"),
        ("huge t0", b'{"r":"popproxy-capture","v":"1.0","t0":1e300}\n', b""),
        ("Infinity t0", b'{"r":"popproxy-capture","v":"1.0","t0":Infinity}\n', b""),
        ("deep header", ("{" + '"a":{' * 50 + "}" * 51 + "\n").encode(), b""),
    ],
)
def test_named_hostile_inputs_get_a_clean_answer(
    tmp_path: Path,
    demo: Capture,
    capsys: pytest.CaptureFixture[str],
    what: str,
    header: bytes | None,
    line: bytes,
) -> None:
    path = write(tmp_path / "hostile.popcap", header or demo.header, *demo.records[:4], line)
    path.write_bytes(path.read_bytes() + b"".join(demo.records[4:]))
    every_reader(path, capsys, what)
    with contextlib.suppress(CaptureError):
        load_sessions([str(path)])


# ------------------------------------------------------------------ memory


# Which readers each worst input goes to (the ones that read what it is big in).
WORST_READERS: dict[str, list[list[str]]] = {
    "100 GiB declared": [["show", "--json"], ["list"], ["serve"]],
    "4 MiB record": [["show", "--json"], ["lint"], ["export", "--eml"], ["export", "--pcap"]],
    "4 MiB record, served": [["serve"]],
    "1 MiB line": [["show", "--json"], ["list"]],
    "deep JSON": [["show", "--json"], ["list"]],
}


def worst_inputs(folder: Path, demo: Capture) -> dict[str, Path]:
    big = b"X" * (4 << 20)  # the largest data record a capture may hold, no line end in it
    cases = {
        "100 GiB declared": b'{"r":"d","d":"s","t":0.1,"n":107374182400}\n+OK\r\n\n',
        "4 MiB record": b"".join(fmt.encode_data(Direction.SERVER, 0.1, big)) * 3,
        "1 MiB line": b'{"r":"event","kind":"' + b"k" * ((1 << 20) - 40) + b'"}\n',
        "deep JSON": (DEEP[5:] + "\n").encode(),
    }
    cases["4 MiB record, served"] = cases["4 MiB record"]
    paths = {}
    for name, line in cases.items():
        path = folder / f"{name.replace(' ', '-').replace(',', '')}.popcap"
        write(path, demo.header, *demo.records[:6], line, *demo.records[6:])
        paths[name] = path
    return paths


# Sets the limit, then runs popproxy; at exit it writes its peak RSS (VmHWM, which starts
# afresh at exec, unlike ru_maxrss, which a fork of this big test process would inflate).
LAUNCHER = """
import atexit, os, resource, runpy, sys
def peak():
    with open("/proc/self/status") as status, open(os.environ["POPPROXY_PEAK"], "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
atexit.register(peak)
resource.setrlimit(resource.RLIMIT_AS, (%d, %d))
sys.argv = ["popproxy", *sys.argv[1:]]
runpy.run_module("popproxy", run_name="__main__", alter_sys=True)
"""


def run_measured(args: list[str], timeout: float, scratch: Path) -> tuple[int, float, str]:
    """``python -m popproxy ARGS`` under RLIMIT_AS: (exit code, peak RSS in MiB, stderr).

    A run still going at ``timeout`` (``serve`` serving) is stopped with SIGTERM.
    """
    peak_file = scratch / "peak"
    peak_file.unlink(missing_ok=True)
    env = {**os.environ, "POPPROXY_PEAK": str(peak_file)}
    with subprocess.Popen(
        [sys.executable, "-c", LAUNCHER % (MEMORY_LIMIT, MEMORY_LIMIT), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    ) as proc:
        try:
            _out, err = proc.communicate(timeout=timeout)
            stopped = False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # serve: the way a user stops it
            _out, err = proc.communicate(timeout=20)
            stopped = True
    code = proc.returncode
    if stopped and code == -signal.SIGTERM:
        code = 0
    peak = int(peak_file.read_text()) / 1024 if peak_file.exists() else float("inf")
    return code, peak, err.decode(errors="replace")


@pytest.mark.slow
def test_worst_inputs_stay_under_100_mb(tmp_path: Path, demo: Capture) -> None:
    """Each reader in a subprocess under RLIMIT_AS 100 MiB, on the largest hostile inputs."""
    peaks: dict[str, float] = {}
    for name, path in worst_inputs(tmp_path, demo).items():
        for argv in WORST_READERS[name]:
            args = [*argv, str(path)]
            if argv[0] == "list":
                args = ["list", str(path.parent)]
            elif argv[0] == "export":
                target = tmp_path / f"out-{path.stem}-{argv[1][2:]}"
                args = ["export", str(path), argv[1], str(target), "--force"]
            elif argv[0] == "serve":
                args = ["serve", str(path), "--listen", "127.0.0.1:0"]
            code, peak, err = run_measured(args, 5.0 if argv[0] == "serve" else 60.0, tmp_path)
            peaks[f"{name}: {' '.join(argv)}"] = peak
            assert code in (0, 1, 2), f"{args}: exit {code}\n{err[-2000:]}"
            assert "Traceback" not in err and "MemoryError" not in err, f"{args}:\n{err[-2000:]}"
    worst = max(peaks, key=lambda k: peaks[k])
    print(f"\npeak RSS of readers: worst {peaks[worst]:.0f} MiB ({worst})")
    assert peaks[worst] < MEMORY_LIMIT / (1 << 20)


# ------------------------------------------------------------------ the pytest plugin

PLUGIN_TEST = """
import poplib, pytest

@pytest.mark.pop3_capture("caps/m{i}.popcap", allow_unplayed=True)
def test_m{i}(pop3_server):
    try:
        pop = poplib.POP3(pop3_server.host, pop3_server.port, timeout=5)
        pop.quit()
    except (poplib.error_proto, OSError):
        pass  # a mangled greeting or goodbye: the client's business, not the plugin's
"""


def test_fuzz_the_pytest_plugin(
    seeds: list[tuple[Path, Capture]], pytester: pytest.Pytester
) -> None:
    """Mutated captures behind ``pop3_server``: each test runs, or its setup fails in one line."""
    (pytester.path / "caps").mkdir()
    count = 30
    for i, (_seed, data, _why) in enumerate(mutants(seeds, count)):
        (pytester.path / "caps" / f"m{i}.popcap").write_bytes(data)
    pytester.makepyfile(test_inner="".join(PLUGIN_TEST.format(i=i) for i in range(count)))
    result = pytester.runpytest("-p", "no:cacheprovider", "-q")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("errors", 0) == count, outcomes
    assert outcomes.get("passed", 0) > 0 and outcomes.get("errors", 0) > 0
    text = result.stdout.str()
    assert "Traceback" not in text and "popproxy/" not in text
    assert text.count("Failed: cannot play") == outcomes["errors"]
