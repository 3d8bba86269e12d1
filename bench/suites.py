"""The benchmarks: variants side by side, interleaved run by run, medians and ratios."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from bench import client, procs
from bench.report import Table, fmt, median, percentile, ratio

HOST = "127.0.0.1"
MIB = 1 << 20
DIRECT = "direct"
BARE = "bare relay"
SOCAT = "socat"
QUIET = "popproxy --quiet"
LIVE = "popproxy live view"
RULES = "popproxy --quiet, 100 fault rules"  # none matches: the cost of loading them
BASELINE = "popproxy --quiet, baseline tree"  # $POPPROXY_BENCH_BASELINE: another checkout


def baseline() -> list[str]:
    """The baseline variant, when ``POPPROXY_BENCH_BASELINE`` names a source tree."""
    return [BASELINE] if os.environ.get("POPPROXY_BENCH_BASELINE") else []


@dataclass
class Lab:
    """Shared settings of one bench invocation: where logs and captures go, output, runs."""

    console: Console
    logdir: Path
    capture_root: Path
    runs: int
    quick: bool
    serial: int = 0

    def capture_dir(self, label: str) -> Path:
        self.serial += 1
        return self.capture_root / f"{label}-{self.serial}"

    def drop_captures(self) -> None:
        """Delete the captures written so far (the folders stay): a 256 MiB RETR per run
        and variant would otherwise pile up gigabytes of dirty page cache, and the kernel's
        writeback would slow the later runs down, not popproxy."""
        for path in self.capture_root.rglob("*.popcap"):
            path.unlink(missing_ok=True)

    def say(self, text: str) -> None:
        self.console.print(f"[dim]{text}[/dim]", highlight=False, soft_wrap=True)

    def start(self, name: str, upstream: int) -> procs.Service:
        """Start the proxy variant ``name`` in front of ``upstream``."""
        if name == BARE:
            return procs.start_relay(self.logdir, upstream)
        if name == SOCAT:
            return procs.start_socat(self.logdir, upstream)
        if name in (QUIET, LIVE):
            out = self.capture_dir("quiet" if name == QUIET else "live")
            return procs.start_popproxy(self.logdir, upstream, out, quiet=name == QUIET)
        if name == BASELINE:
            out = self.capture_dir("baseline")
            tree = os.environ["POPPROXY_BENCH_BASELINE"]
            return procs.start_popproxy(self.logdir, upstream, out, label=BASELINE, tree=tree)
        if name == RULES:
            rules = self.capture_root / "faults.txt"
            # Every rule is looked at for every command: same verbs, arguments never sent.
            verbs = ("RETR", "NOOP", "STAT", "LIST", "USER")
            rules.write_text(
                "".join(f"{verbs[i % 5]} 9{i:04d}: cut after 10\n" for i in range(100))
            )
            out = self.capture_dir("rules")
            extra = ("--faults", str(rules))
            return procs.start_popproxy(self.logdir, upstream, out, extra=extra, label=RULES)
        raise ValueError(name)

    @contextlib.contextmanager
    def variants(
        self, names: list[str], upstream: int, notes: list[str]
    ) -> Iterator[dict[str, int]]:
        """Start each variant once; yield name -> port of those that started."""
        ports: dict[str, int] = {}
        services: list[procs.Service] = []
        try:
            for name in names:
                if name == DIRECT:
                    ports[name] = upstream
                    continue
                try:
                    service = self.start(name, upstream)
                except procs.Unavailable as exc:
                    notes.append(f"{name}: skipped, {exc}")
                    continue
                services.append(service)
                ports[name] = service.port
                client.noop_latency(HOST, service.port, 5, warmup=5)  # warm up
            yield ports
        finally:
            for service in services:
                service.stop()


def interleave(
    lab: Lab,
    ports: dict[str, int],
    measure: Callable[[str, int], float | list[float]],
    notes: list[str],
    label: str,
) -> dict[str, list[float | list[float]]]:
    """Measure A B C, A B C, ... ``lab.runs`` times; a variant that fails is dropped."""
    results: dict[str, list[float | list[float]]] = {name: [] for name in ports}
    active = dict(ports)
    for run in range(lab.runs):
        shown = []
        for name, port in list(active.items()):
            try:
                value = measure(name, port)
            except (OSError, client.ProtocolError) as exc:
                notes.append(f"{name}: failed in run {run + 1}, {exc!r}")
                del active[name]
                continue
            results[name].append(value)
            if isinstance(value, float):
                shown.append(f"{name} {value:,.1f}")
            else:
                shown.append(f"{name} {median(value) * 1e6:,.1f} µs")
        lab.say(f"{label} run {run + 1}/{lab.runs}: " + (", ".join(shown) or "done"))
    return results


def throughput(lab: Lab) -> Table:
    size = (32 if lab.quick else 256) * MIB
    table = Table(
        f"Throughput: one RETR of {size // MIB} MiB, 1 KiB lines ({lab.runs} runs, interleaved)",
        ["variant", "median MB/s", "min MB/s", "max MB/s", "vs bare relay"],
    )
    server = procs.start_server(lab.logdir, size, 1024)
    try:
        names = [DIRECT, BARE, SOCAT, QUIET, RULES, *baseline()]
        with lab.variants(names, server.port, table.notes) as ports:

            def measure(name: str, port: int) -> float:
                seconds = client.retr_throughput(HOST, port, size)
                lab.drop_captures()
                return size / seconds / 1e6

            results = interleave(lab, ports, measure, table.notes, "throughput")
    finally:
        server.stop()
    floats = {k: [float(v) for v in vs if isinstance(v, float)] for k, vs in results.items()}
    base = median(floats[BARE]) if floats.get(BARE) else None
    for name in names:
        values = floats.get(name)
        if not values:
            table.rows.append([name, "not available", "", "", ""])
            continue
        mid = median(values)
        table.rows.append([name, fmt(mid), fmt(min(values)), fmt(max(values)), ratio(mid, base)])
    return table


def noop(lab: Lab) -> Table:
    count = 1000 if lab.quick else 5000
    table = Table(
        f"NOOP round trip: {count:,} NOOPs per run, one session ({lab.runs} runs, interleaved)",
        ["variant", "median µs", "p99 µs", "vs bare relay (median)"],
    )
    server = procs.start_server(lab.logdir, 10 * 1024, 1024)
    try:
        names = [DIRECT, BARE, SOCAT, QUIET, RULES, *baseline(), LIVE]
        with lab.variants(names, server.port, table.notes) as ports:

            def measure(name: str, port: int) -> list[float]:
                return client.noop_latency(HOST, port, count)

            results = interleave(lab, ports, measure, table.notes, "noop")
    finally:
        server.stop()
    stats: dict[str, tuple[float, float]] = {}
    for name, runs in results.items():
        lists = [v for v in runs if isinstance(v, list)]
        if lists:
            stats[name] = (
                median([median(v) * 1e6 for v in lists]),
                median([percentile(v, 99) * 1e6 for v in lists]),
            )
    base = stats[BARE][0] if BARE in stats else None
    for name in names:
        if name not in stats:
            table.rows.append([name, "not available", "", ""])
            continue
        mid, p99 = stats[name]
        table.rows.append([name, fmt(mid), fmt(p99), ratio(mid, base)])
    table.notes.append("p99 column: median over runs of each run's 99th percentile")
    return table


def concurrency(lab: Lab) -> Table:
    count = 200 if lab.quick else 1000
    table = Table(
        f"Concurrency: {count:,} sessions at once (greeting, USER, PASS, STAT, RETR 10 KiB, "
        f"QUIT), {lab.runs} runs, interleaved",
        ["variant", "completed", "errors", "median wall s", "sessions/s", "wall vs socat"],
    )
    server = procs.start_server(lab.logdir, 10 * 1024, 1024)
    outcomes: dict[str, list[tuple[int, int, float]]] = {}
    try:
        names = [DIRECT, BARE, SOCAT, QUIET, *baseline()]
        with lab.variants(names, server.port, table.notes) as ports:
            outcomes = {name: [] for name in ports}
            for run in range(lab.runs):
                shown = []
                for name, port in ports.items():
                    done, errors, wall = client.sessions(HOST, port, count, count)
                    outcomes[name].append((done, errors, wall))
                    shown.append(f"{name} {done}/{count} in {wall:.2f} s")
                lab.say(f"concurrency run {run + 1}/{lab.runs}: " + ", ".join(shown))
    finally:
        server.stop()
    walls = {name: median([o[2] for o in runs]) for name, runs in outcomes.items() if runs}
    base = walls.get(SOCAT)
    for name in names:
        runs = outcomes.get(name, [])
        if not runs:
            table.rows.append([name, "not available", "", "", "", ""])
            continue
        completed = median([float(o[0]) for o in runs])
        errors = sum(o[1] for o in runs)
        wall = walls[name]
        table.rows.append(
            [
                name,
                f"{completed:,.0f}/{count:,}",
                str(errors),
                f"{wall:.3f}",
                fmt(count / wall, 0),
                ratio(wall, base),
            ]
        )
    table.notes.append("completed: median over runs; errors: total over all runs")
    return table


def rss(lab: Lab) -> Table:
    size = (128 if lab.quick else 1024) * MIB
    table = Table(
        f"Peak RSS while one {size // MIB} MiB message passes (fresh process per run, "
        f"{lab.runs} runs, interleaved)",
        ["variant", "median VmHWM MiB", "max VmHWM MiB", "idle RSS MiB", "median MB/s"],
    )
    names = [BARE, QUIET]
    peaks: dict[str, list[float]] = {name: [] for name in names}
    idles: dict[str, list[float]] = {name: [] for name in names}
    speeds: dict[str, list[float]] = {name: [] for name in names}
    dropped: set[str] = set()
    server = procs.start_server(lab.logdir, size, 1024)
    try:
        for run in range(lab.runs):
            shown = []
            for name in names:
                if name in dropped:
                    continue
                try:
                    service = lab.start(name, server.port)
                except procs.Unavailable as exc:
                    table.notes.append(f"{name}: skipped, {exc}")
                    dropped.add(name)
                    continue
                try:
                    idles[name].append(service.status("VmRSS") / 1024)
                    seconds = client.retr_throughput(HOST, service.port, size)
                    peaks[name].append(service.status("VmHWM") / 1024)
                    speeds[name].append(size / seconds / 1e6)
                    shown.append(f"{name} {peaks[name][-1]:,.1f} MiB")
                except (OSError, client.ProtocolError) as exc:
                    table.notes.append(f"{name}: failed in run {run + 1}, {exc!r}")
                    dropped.add(name)
                finally:
                    service.stop()
                    for child in lab.capture_root.iterdir():
                        shutil.rmtree(child, ignore_errors=True)
            lab.say(f"rss run {run + 1}/{lab.runs}: " + (", ".join(shown) or "done"))
    finally:
        server.stop()
    for name in names:
        if not peaks[name]:
            table.rows.append([name, "not available", "", "", ""])
            continue
        table.rows.append(
            [
                name,
                fmt(median(peaks[name])),
                fmt(max(peaks[name])),
                fmt(median(idles[name])),
                fmt(median(speeds[name])),
            ]
        )
    table.notes.append("VmHWM from /proc/PID/status, read after the message has passed")
    return table


def observer(lab: Lab) -> Table:
    from bench import observer_bench

    rows = observer_bench.run(lab.quick)
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    table = Table("Observer (popproxy.core), in process", columns or ["result"])
    table.rows = [[str(row.get(column, "")) for column in columns] for row in rows]
    return table


def startup(lab: Lab) -> Table:
    from bench import startup as startup_bench

    return startup_bench.run(lab.runs)


def fixture(lab: Lab) -> Table:
    from bench import fixture_bench

    return fixture_bench.run(lab.runs)


def socks(lab: Lab) -> Table:
    from bench import socks_bench

    return socks_bench.run(lab)


SUITES: dict[str, Callable[[Lab], Table]] = {
    "throughput": throughput,
    "noop": noop,
    "concurrency": concurrency,
    "rss": rss,
    "observer": observer,
    "startup": startup,
    "fixture": fixture,
    "socks": socks,
}


def make_capture_root(parent: str | None) -> Path:
    return Path(tempfile.mkdtemp(prefix="popproxy-bench-", dir=parent))
