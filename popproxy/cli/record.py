"""``popproxy record``: run the relaying, recording proxy with a live transcript."""

from __future__ import annotations

import argparse
import math
import os
import signal
from functools import partial
from pathlib import Path

import trio

from popproxy.cli.common import run_listening
from popproxy.faults.options import add_fault_options, faults_from_args
from popproxy.proxy import routing
from popproxy.proxy.config import (
    ProxyConfig,
    Security,
    SocksSettings,
    StlsMode,
    UsageError,
    capture_dir,
    format_hostport,
    parse_credentials,
    parse_hostport,
    parse_listen,
    parse_route,
)
from popproxy.proxy.probe import exposed, probe_upstream
from popproxy.proxy.server import Totals, serve_record
from popproxy.tls.ca import default_ca_dir
from popproxy.tls.contexts import client_context
from popproxy.views.live import NORMAL, QUIET, VERBOSE, LiveView


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "record",
        help="relay a mail client to a POP3 server and record it",
        description="Listen for POP3 clients, relay each to the upstream server "
        "byte for byte, show the session live and write a capture.  The upstream is "
        "fixed (--upstream), set per listener (--route), or named by each client "
        "(--socks5); they combine in one process.",
    )
    p.add_argument(
        "--upstream",
        metavar="HOST:PORT",
        help="the real POP3 server (names, IPv4 or [IPv6]:PORT), for clients of --listen",
    )
    p.add_argument(
        "--listen",
        default=None,
        metavar="HOST:PORT",
        help="where clients of --upstream connect (default 127.0.0.1:1110; port 0 picks one)",
    )
    p.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="LISTEN=UPSTREAM[/tls|/stls]",
        help="one more listener with its own upstream (repeatable); LISTEN is [HOST:]PORT; "
        "/tls: implicit TLS on both legs, /stls: popproxy upgrades the upstream with STLS",
    )
    socks = p.add_argument_group("SOCKS5 (each client names its upstream; popproxy docs socks)")
    socks.add_argument(
        "--socks5",
        metavar="[HOST:]PORT",
        help="a SOCKS5 listener (RFC 1928): the client's CONNECT target is the upstream",
    )
    socks.add_argument(
        "--socks-auth",
        metavar="USER:PASS",
        help="require this SOCKS5 username and password (RFC 1929); give USER alone to read "
        "the password from $POPPROXY_SOCKS_PASSWORD instead of the command line",
    )
    socks.add_argument(
        "--tls-port",
        action="append",
        type=int,
        default=[],
        metavar="PORT",
        help="targets on PORT speak implicit TLS, like 995 (repeatable)",
    )
    socks.add_argument(
        "--socks-pop3-only",
        action="store_true",
        help="refuse targets that do not greet like POP3 instead of relaying them opaque",
    )
    socks.add_argument(
        "--sniff-timeout",
        type=float,
        default=3.0,
        metavar="S",
        help="seconds a SOCKS5 target may take to greet before it counts as not POP3 (default 3)",
    )
    p.add_argument(
        "--out",
        default="captures",
        metavar="DIR",
        help="folder for capture files (default captures/)",
    )
    p.add_argument(
        "--keep-secrets",
        action="store_true",
        help="write credentials to the capture instead of redacting them",
    )
    level = p.add_mutually_exclusive_group()
    level.add_argument("--quiet", "-q", action="store_true", help="only session start and end")
    level.add_argument("--verbose", "-v", action="store_true", help="show message bodies too")
    level.add_argument(
        "--browse",
        action="store_true",
        help="the interactive browser as the live view (popproxy docs browse)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to reach the upstream and finish TLS handshakes (default 10)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="close a session after S seconds without traffic (default 600, RFC 1939 §3)",
    )
    tls = p.add_argument_group("TLS")
    tls.add_argument(
        "--listen-tls",
        action="store_true",
        help="implicit TLS towards clients (pop3s), with popproxy's own CA",
    )
    tls.add_argument(
        "--upstream-tls",
        action="store_true",
        help="implicit TLS towards the server, verified against the system store",
    )
    tls.add_argument(
        "--upstream-stls",
        action="store_true",
        help="popproxy upgrades the upstream leg with STLS itself",
    )
    tls.add_argument("--upstream-ca", metavar="FILE", help="also trust this CA for the upstream")
    tls.add_argument(
        "--insecure",
        action="store_true",
        help="do NOT verify the upstream certificate (said loudly everywhere)",
    )
    tls.add_argument(
        "--stls",
        choices=[m.value for m in StlsMode],
        default="intercept",
        help="what to do with a client's STLS (default intercept)",
    )
    tls.add_argument(
        "--hide-plus",
        action="store_true",
        help="hide SASL -PLUS mechanisms (channel binding, which cannot pass popproxy's TLS "
        "interception) from CAPA and AUTH listings; a downgrade a careful server refuses",
    )
    tls.add_argument(
        "--ca-dir",
        metavar="DIR",
        help="popproxy's CA folder (default $POPPROXY_CA_DIR or ~/.popproxy)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the start-up check of the upstream (one connection: greeting, then QUIT)",
    )
    add_fault_options(p)
    p.set_defaults(run=run)


CLOSE_TIMEOUT = 0.6  # for the view's thread, then again for its renderer process


def build_config(args: argparse.Namespace) -> ProxyConfig:
    if not (args.upstream or args.route or args.socks5):
        raise UsageError("say where mail goes: --upstream, --route or --socks5")
    if args.upstream:
        upstream = parse_hostport(args.upstream)
        if upstream[1] == 0:
            raise UsageError("--upstream needs a real port, not 0")
    else:
        for flag in ("listen", "listen_tls", "upstream_tls", "upstream_stls"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')} applies to --upstream: give one")
        upstream = ("", 0)
    listen = parse_hostport(args.listen or "127.0.0.1:1110", default_port=1110)
    for name in ("connect_timeout", "idle_timeout", "sniff_timeout"):
        if not math.isfinite(getattr(args, name)) or getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if args.upstream_tls and args.upstream_stls:
        raise UsageError("--upstream-tls and --upstream-stls exclude each other")
    routes = [parse_route(text) for text in args.route]
    socks = None
    if args.socks5:
        for port in args.tls_port:
            if not 0 < port <= 65535:
                raise UsageError(f"--tls-port {port}: not a port")
        try:
            socks_listen = parse_listen(args.socks5)
        except UsageError as exc:
            raise UsageError(f"--socks5: {exc}") from None
        socks = SocksSettings(
            listen=socks_listen,
            credentials=parse_credentials(args.socks_auth) if args.socks_auth else None,
            tls_ports=frozenset({995, *args.tls_port}),
            pop3_only=args.socks_pop3_only,
            sniff_timeout=args.sniff_timeout,
        )
    elif args.socks_auth or args.tls_port or args.socks_pop3_only:
        raise UsageError("--socks-auth, --tls-port and --socks-pop3-only need --socks5")
    out = capture_dir(args.out)
    if args.upstream_ca and not os.path.isfile(args.upstream_ca):
        raise UsageError(f"--upstream-ca {args.upstream_ca}: no such file")
    config = ProxyConfig(
        upstream=upstream,
        listen=listen,
        out_dir=out,
        keep_secrets=args.keep_secrets,
        connect_timeout=args.connect_timeout,
        idle_timeout=args.idle_timeout,
        listen_tls=args.listen_tls,
        upstream_tls=args.upstream_tls,
        upstream_stls=args.upstream_stls,
        stls=StlsMode(args.stls),
        hide_plus=args.hide_plus,
        insecure=args.insecure,
        upstream_ca=args.upstream_ca,
        verbose=args.verbose,
        check_upstream=not args.no_check,
        faults=faults_from_args(args),
        serve_fixed=bool(args.upstream),
        routes=routes,
        socks=socks,
    )
    try:
        config.upstream_context = client_context(cafile=args.upstream_ca, insecure=args.insecure)
    except OSError as exc:
        raise UsageError(f"--upstream-ca {args.upstream_ca}: {exc}") from None
    config.ca_dir = Path(args.ca_dir) if args.ca_dir else default_ca_dir()
    if args.listen_tls or socks or any(r.security is Security.TLS for r in routes):
        config.certificate_authority()  # fail at start-up, not at the first client
    return config


def listen_text(config: ProxyConfig) -> str:
    """Every address record listens on, for a failure to bind."""
    places = [format_hostport(*config.listen)] if config.serve_fixed else []
    places += [format_hostport(*route.listen) for route in config.routes]
    if config.socks is not None:
        places.append(format_hostport(*config.socks.listen))
    return ", ".join(places)


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    if args.browse:
        from popproxy.browse.live import record_browse  # Textual loads only for --browse

        return record_browse(config)
    mode = QUIET if args.quiet else VERBOSE if args.verbose else NORMAL
    view = LiveView.in_subprocess(mode)
    if config.insecure:
        view.notice("WARNING: --insecure: the upstream certificate is NOT verified", "pop.error")
    if config.faults:
        view.notice(
            f"fault injection: {len(config.faults)} rule(s), seed {config.faults.seed}",
            "pop.warning",
        )
    listens = [config.listen] if config.serve_fixed else []
    listens += [route.listen for route in config.routes]
    for host, port in listens:
        if exposed(host):
            view.notice(
                f"WARNING: listening on {format_hostport(host, port)} accepts clients from "
                "other machines: anyone who reaches it relays through popproxy and lands in "
                "your captures (--listen 127.0.0.1:PORT keeps it on this machine)",
                "pop.error",
            )
    socks = config.socks
    if socks is not None and socks.credentials is None and exposed(socks.listen[0]):
        view.notice(
            "WARNING: --socks5 on a non-loopback address without --socks-auth: anyone "
            "who reaches it can relay anywhere through popproxy",
            "pop.error",
        )
    try:
        run_listening(_main, config, view, listen=listen_text(config))
    finally:
        # SIGINT/SIGTERM end within 2 s even when nobody drains stdout or stderr (a pipe
        # nobody reads): display lines still queued then are dropped; captures are done.
        view.close(timeout=CLOSE_TIMEOUT)
    return 0


async def _check_upstream(config: ProxyConfig, view: LiveView) -> None:
    """The fixed upstream and each route's, checked once at start-up (SOCKS targets are
    only known per connection)."""
    configs = [config] if config.serve_fixed else []
    configs += [routing.route_config(config, route) for route in config.routes]
    for each in configs:
        problem = await probe_upstream(each)
        if problem is not None:
            view.notice(f"WARNING: {problem}", "pop.warning")


async def _main(config: ProxyConfig, view: LiveView) -> None:
    totals = Totals()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_record, config, view, totals=totals))
        if config.check_upstream:
            nursery.start_soon(_check_upstream, config, view)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                view.notice("stopping: finishing open captures…", "pop.muted")
                nursery.cancel_scope.cancel()
                break
    style = "pop.error" if totals.capture_errors or totals.refused else "pop.muted"
    view.notice(f"stopped: {totals.summary()}", style)
