"""``popproxy serve``: a fake POP3 server that plays recorded sessions to live clients."""

from __future__ import annotations

import argparse
import math
import signal
from pathlib import Path

import trio
from rich.text import Text

from popproxy.cli.common import run_listening
from popproxy.cli.replay import add_password_options, add_tls_options, add_token_options
from popproxy.core.sasl import is_plus, is_scram
from popproxy.faults.options import add_fault_options, faults_from_args
from popproxy.proxy.config import UsageError, capture_dir, parse_hostport
from popproxy.replay.auth import read_password
from popproxy.replay.fake import FakeServer, ServeConfig, serve_replay
from popproxy.replay.sasl_client import read_token
from popproxy.replay.script import load_sessions
from popproxy.tls.ca import default_ca_dir
from popproxy.views.theme import make_console


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="a fake POP3 server playing recorded sessions",
        description="Answer POP3 clients from captures: the recorded greeting, then each "
        "recorded reply, byte for byte, as the client sends the recorded commands. "
        "Successive connections get successive captures. A command the recording "
        "does not have gets -ERR and a near-miss report. With --mailbox, a stateful "
        "mailbox rebuilt from the captures (or a Maildir, an mbox, .eml files) answers "
        "any valid command sequence instead.",
    )
    p.add_argument(
        "captures",
        nargs="+",
        metavar="CAPTURE|DIR",
        help="captures to play (folders: every capture in them); with --mailbox also a "
        "Maildir, an mbox or a folder of .eml files",
    )
    mode = p.add_argument_group("mailbox mode (popproxy docs replay)")
    mode.add_argument(
        "--mailbox",
        action="store_true",
        help="serve a stateful mailbox rebuilt from the captures (or from a Maildir, an "
        "mbox, .eml files) that answers any valid command sequence",
    )
    mode.add_argument(
        "--persist",
        action="store_true",
        help="mailbox: deletions committed by QUIT last for later sessions of this run",
    )
    mode.add_argument("--user", metavar="NAME", help="mailbox: the only user name that may log in")
    mode.add_argument(
        "--persona",
        choices=("gmail", "outlook"),
        help="mailbox (implied): behave like Gmail or Outlook.com (greeting, CAPA before and "
        "after TLS, XOAUTH2/OAUTHBEARER rules and errors)",
    )
    p.add_argument(
        "--match",
        choices=("ordered", "any"),
        default="ordered",
        help="recorded replay: commands in recorded order (default) or in any order, "
        "each recorded exchange played once",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:1110",
        metavar="HOST:PORT",
        help="where clients connect (default 127.0.0.1:1110; port 0 picks one)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="end a session at the first command that differs from the recording "
        "(default: lenient, CAPA and NOOP may be skipped or repeated)",
    )
    p.add_argument(
        "--repeat",
        action="store_true",
        help="start again with the first capture once all were played",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="drop a client silent for S seconds (default 60)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="write a capture of every served session to DIR: the client's bytes, the served "
        "ones and each injected fault as popproxy's action (popproxy show, lint; "
        "popproxy docs faults)",
    )
    p.add_argument(
        "--check-password",
        action="store_true",
        help="check credentials against the password from --password-file, "
        "$POPPROXY_PASSWORD or a prompt (default: accept any)",
    )
    add_password_options(p)
    add_token_options(p)
    add_tls_options(p, listening=True)
    add_fault_options(p)
    p.set_defaults(run=run)


def build_config(args: argparse.Namespace) -> ServeConfig:
    listen = parse_hostport(args.listen, default_port=1110)
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise UsageError("--timeout must be a positive number of seconds")
    mailbox = None
    if args.mailbox or args.persona:
        from popproxy.replay.sources import load_mailbox

        mailbox = load_mailbox(args.captures)
        sessions = []
        if args.persona:
            from popproxy.replay.personas import PERSONAS, recorded_persona

            mailbox.persona = recorded_persona(PERSONAS[args.persona])
    else:
        if args.persist or args.user:
            raise UsageError("--persist and --user need --mailbox")
        sessions = load_sessions(args.captures)
        for session in sessions:
            if session.greeting is None:  # replay refuses such a file too
                raise UsageError(f"{session.path}: nothing to play (no recorded greeting)")
    password = None
    if args.password is not None or args.password_file is not None or args.check_password:
        password = read_password(password=args.password, password_file=args.password_file)
        if password is None:
            raise UsageError(
                "--check-password: no password given (POPPROXY_PASSWORD, "
                "--password-file, --password)"
            )
    scram = sorted({str(s.mechanism) for x in sessions for s in x.steps if is_scram(s.mechanism)})
    if scram and password is None:
        raise UsageError(
            f"the captures log in with {', '.join(scram)}: the server's "
            "signature needs the password (--check-password with POPPROXY_PASSWORD, "
            "--password-file or --password)"
        )
    plus = sorted({str(s.mechanism) for x in sessions for s in x.steps if is_plus(s.mechanism)})
    if plus:
        raise UsageError(
            f"cannot serve {', '.join(plus)}: channel binding needs the recorded server's TLS "
            "channel (RFC 5802 §6)"
        )
    # Like the password, $POPPROXY_TOKEN is consulted only with --check-password.
    token = read_token(
        token=args.token,
        token_file=args.token_file,
        token_command=args.token_command,
        env=None if args.check_password else {},
    )
    config = ServeConfig(
        sessions=sessions,
        listen=listen,
        password=password,
        token=token,
        persona=args.persona,
        strict=args.strict,
        tls=args.tls,
        repeat=args.repeat,
        timeout=args.timeout,
        ca_dir=Path(args.ca_dir) if args.ca_dir else default_ca_dir(),
        mailbox=mailbox,
        persist=args.persist,
        mailbox_user=args.user,
        offer_stls=args.stls,
        match=args.match,
        faults=faults_from_args(args),
        out_dir=_out_dir(args.out, args.captures) if args.out else None,
    )
    uses_tls = (
        args.tls
        or mailbox is not None
        or any(s.steps and any(x.verb == "STLS" for x in s.steps) for s in sessions)
    )
    if uses_tls:
        config.certificate_authority()  # fail at start-up, not at the first client
    return config


def _out_dir(text: str, served: list[str]) -> Path:
    """``--out``: created if needed and writable; never a folder being served (the captures
    of one run would be played by the next)."""
    out = capture_dir(text)
    if any(Path(c).is_dir() and Path(c).resolve() == out.resolve() for c in served):
        raise UsageError(f"--out {text}: that folder is being served; write elsewhere")
    return out


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    console = make_console()
    notes = make_console(stderr=True)  # stdout carries "listening on" first, for scripts
    if config.mailbox is not None:
        for note in config.mailbox.notes:
            notes.print(Text(f"warning: {note}", style="pop.warning"))
        if not config.mailbox.messages:
            notes.print(
                Text(
                    "warning: the mailbox is empty: no message was seen in the sources",
                    style="pop.warning",
                )
            )
        notes.print(
            Text(
                f"mailbox: {len(config.mailbox.messages)} message(s) from "
                f"{len(config.mailbox.origins)} source(s)",
                style="pop.muted",
            )
        )
    for session in config.sessions:
        if session.implicit_tls and not config.tls:
            notes.print(
                Text(
                    f"note: {session.path} was recorded over implicit TLS; "
                    "add --tls to serve it the same way",
                    style="pop.warning",
                )
            )
        for warning in session.warnings:
            notes.print(Text(f"warning: {warning}", style="pop.warning"))
    if config.faults:
        notes.print(
            Text(
                f"fault injection: {len(config.faults)} rule(s), seed {config.faults.seed}",
                style="pop.warning",
            )
        )
    if config.out_dir is not None:
        notes.print(Text(f"recording every served session in {config.out_dir}", style="pop.muted"))
    server = FakeServer(config, console.print)
    run_listening(_main, config, server, listen=args.listen)
    unplayed = server.report.unplayed()
    if unplayed:
        console.print(
            Text(f"{len(unplayed)} recorded exchange(s) were not played:", style="pop.warning")
        )
        for line in unplayed[:20]:
            console.print(Text(f"  {line}", style="pop.muted"))
    return 0


async def _main(config: ServeConfig, server: FakeServer) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(partial_serve, config, server)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


async def partial_serve(
    config: ServeConfig,
    server: FakeServer,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_replay(config, server.log, server=server, task_status=task_status)
