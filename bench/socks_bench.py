"""SOCKS5 benchmark: session setup through --socks5 vs a fixed-upstream listener, and load."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench import client, procs
from bench.client import ProtocolError, pop3_session
from bench.pop3server import raise_nofile
from bench.report import Table, fmt, median, percentile

if TYPE_CHECKING:
    from bench.suites import Lab

HOST = "127.0.0.1"
FIXED = "popproxy --upstream (fixed)"
SOCKS = "popproxy --socks5"


def connect_request(port: int) -> bytes:
    """RFC 1928 §4: CONNECT 127.0.0.1:port, by domain name as mail clients with remote DNS
    send it (popproxy resolves it)."""
    name = HOST.encode()
    return b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big")


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ProtocolError(f"closed after {data!r}")
        data += chunk
    return data


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ProtocolError(f"closed after {data!r}")
        data += chunk
    if not data.startswith(b"+OK"):
        raise ProtocolError(f"unexpected reply {data[:80]!r}")
    return data


def setup_time(port: int, upstream: int | None) -> float:
    """Seconds from connect() to the greeting's last byte; through SOCKS5 when
    ``upstream`` is given (greeting, CONNECT, reply, then the server's greeting)."""
    clock = time.perf_counter
    start = clock()
    sock = socket.create_connection((HOST, port), timeout=30)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if upstream is not None:
            sock.sendall(b"\x05\x01\x00")
            if _recv_exact(sock, 2) != b"\x05\x00":
                raise ProtocolError("SOCKS5 method refused")
            sock.sendall(connect_request(upstream))
            reply = _recv_exact(sock, 10)
            if reply[:2] != b"\x05\x00":
                raise ProtocolError(f"SOCKS5 CONNECT failed: {reply!r}")
        _read_line(sock)
        took = clock() - start
        sock.sendall(b"QUIT\r\n")
        _read_line(sock)
        return took
    finally:
        sock.close()


async def _socks_session(port: int, upstream: int, gate: asyncio.Semaphore, timeout: float) -> None:
    async with gate:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, port, limit=1 << 20), timeout
        )
        try:
            async with asyncio.timeout(timeout):
                writer.write(b"\x05\x01\x00")
                if await reader.readexactly(2) != b"\x05\x00":
                    raise ProtocolError("SOCKS5 method refused")
                writer.write(connect_request(upstream))
                reply = await reader.readexactly(10)
                if reply[:2] != b"\x05\x00":
                    raise ProtocolError(f"SOCKS5 CONNECT failed: {reply!r}")
                await pop3_session(reader, writer)
        finally:
            writer.close()


async def _socks_sessions(
    port: int, upstream: int, n: int, timeout: float
) -> tuple[int, int, float, list[str]]:
    gate = asyncio.Semaphore(n)
    start = time.perf_counter()
    results = await asyncio.gather(
        *(_socks_session(port, upstream, gate, timeout) for _ in range(n)),
        return_exceptions=True,
    )
    wall = time.perf_counter() - start
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    return n - len(failures), len(failures), wall, failures[:3]


def socks_sessions(
    port: int, upstream: int, n: int, timeout: float = 120.0
) -> tuple[int, int, float, list[str]]:
    """``n`` SOCKS5 sessions at once (CONNECT, greeting, USER, PASS, STAT, RETR 1, QUIT)."""
    raise_nofile()
    return asyncio.run(_socks_sessions(port, upstream, n, timeout))


def start_popproxy(logdir: Path, args: list[str], name: str) -> procs.Service:
    missing = procs.popproxy_missing()
    if missing:
        raise procs.Unavailable(missing)
    argv = procs.python("popproxy", "record", "--quiet", "--no-check", *args)
    return procs.start(name, argv, logdir)


def run(lab: Lab) -> Table:
    """Setup latency (sessions one at a time, fixed and SOCKS5 alternating) and load."""
    logdir, runs = lab.logdir, lab.runs
    sessions = 200 if lab.quick else 1000
    concurrent = 200 if lab.quick else 1000
    table = Table(
        f"SOCKS5: session setup (connect to greeting, {sessions:,} sessions per variant, one at "
        f"a time, variants alternating) and {concurrent:,} concurrent sessions per variant, "
        f"{runs} runs",
        [
            "variant",
            "median setup ms",
            "p99 setup ms",
            "added ms",
            "concurrent",
            "errors",
            "wall s",
        ],
    )
    server = procs.start_server(logdir, 10 * 1024, 1024)
    services: list[procs.Service] = []
    try:
        out_fixed, out_socks = lab.capture_dir("socks-fixed"), lab.capture_dir("socks")
        out_fixed.mkdir(parents=True)
        out_socks.mkdir(parents=True)
        fixed = start_popproxy(
            logdir,
            [
                "--upstream",
                f"{HOST}:{server.port}",
                "--listen",
                f"{HOST}:0",
                "--out",
                str(out_fixed),
            ],
            "popproxy fixed",
        )
        services.append(fixed)
        socks = start_popproxy(
            logdir, ["--socks5", f"{HOST}:0", "--out", str(out_socks)], "popproxy socks5"
        )
        services.append(socks)
        for _ in range(20):  # warm up both
            setup_time(fixed.port, None)
            setup_time(socks.port, server.port)
        times: dict[str, list[float]] = {FIXED: [], SOCKS: []}
        p99s: dict[str, list[float]] = {FIXED: [], SOCKS: []}
        medians: dict[str, list[float]] = {FIXED: [], SOCKS: []}
        loads: list[tuple[int, int, float, list[str]]] = []
        fixed_loads: list[tuple[int, int, float]] = []
        for run_index in range(runs):
            this: dict[str, list[float]] = {FIXED: [], SOCKS: []}
            for _ in range(sessions):
                this[FIXED].append(setup_time(fixed.port, None))
                this[SOCKS].append(setup_time(socks.port, server.port))
            for name, values in this.items():
                times[name] += values
                medians[name].append(median(values))
                p99s[name].append(percentile(values, 99))
            fixed_loads.append(client.sessions(HOST, fixed.port, concurrent, concurrent))
            loads.append(socks_sessions(socks.port, server.port, concurrent))
            lab.say(
                f"socks run {run_index + 1}/{runs}: setup fixed "
                f"{medians[FIXED][-1] * 1e3:.3f} ms, SOCKS5 {medians[SOCKS][-1] * 1e3:.3f} ms; "
                f"{concurrent} concurrent sessions: fixed {fixed_loads[-1][0]} in "
                f"{fixed_loads[-1][2]:.2f} s, SOCKS5 {loads[-1][0]} in {loads[-1][2]:.2f} s"
            )
    finally:
        for service in services:
            service.stop()
        server.stop()
    base = median(medians[FIXED])
    table.rows.append(
        [
            FIXED,
            fmt(base * 1e3, 3),
            fmt(median(p99s[FIXED]) * 1e3, 3),
            "",
            f"{median([float(load[0]) for load in fixed_loads]):,.0f}/{concurrent:,}",
            str(sum(load[1] for load in fixed_loads)),
            f"{median([load[2] for load in fixed_loads]):.3f}",
        ]
    )
    errors = sum(load[1] for load in loads)
    table.rows.append(
        [
            SOCKS,
            fmt(median(medians[SOCKS]) * 1e3, 3),
            fmt(median(p99s[SOCKS]) * 1e3, 3),
            fmt((median(medians[SOCKS]) - base) * 1e3, 3),
            f"{median([float(load[0]) for load in loads]):,.0f}/{concurrent:,}",
            str(errors),
            f"{median([load[2] for load in loads]):.3f}",
        ]
    )
    table.notes.append(
        "setup: median (and p99) per run of connect → greeting received, then the median "
        "over runs; added: SOCKS5 minus fixed (the budget is 1 ms)"
    )
    table.notes.append(
        "concurrent: sessions started at once (SOCKS5: CONNECT first), completed (median over "
        "runs), errors (total over all runs), median wall time"
    )
    for load in loads:
        for failure in load[3]:
            table.notes.append(f"SOCKS5 session error: {failure}")
    return table
