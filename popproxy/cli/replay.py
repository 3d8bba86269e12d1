"""``popproxy replay``: play a capture's client side against a live server and diff the answers."""

from __future__ import annotations

import argparse
import math
import os
import ssl
import sys
from typing import Any

import trio
from rich.console import Console
from rich.text import Text

from popproxy import errors
from popproxy.errors import ExitCode
from popproxy.proxy.config import UsageError, parse_hostport
from popproxy.replay.auth import AuthError, Credentials, read_password
from popproxy.replay.client import (
    Outcome,
    ReplayError,
    ReplayOptions,
    ReplayReport,
    check_mechanisms,
    needs_password,
    needs_token,
    replay_session,
)
from popproxy.replay.sasl_client import read_token
from popproxy.replay.script import load_sessions, require_client_side
from popproxy.views import safe
from popproxy.views.theme import make_console

# ------------------------------------------------------------------ options shared with serve


def add_tls_options(p: argparse.ArgumentParser, *, listening: bool) -> None:
    """``--tls``, ``--stls``, ``--ca``, ``--insecure``, ``--ca-dir``: one meaning everywhere."""
    tls = p.add_argument_group("TLS")
    if listening:
        tls.add_argument(
            "--tls",
            action="store_true",
            help="implicit TLS towards clients (pop3s), with popproxy's CA",
        )
        tls.add_argument(
            "--stls", action="store_true", help="offer STLS even where the capture did not use it"
        )
    else:
        tls.add_argument("--tls", action="store_true", help="implicit TLS (pop3s, RFC 8314)")
        tls.add_argument(
            "--stls", action="store_true", help="upgrade with STLS before replaying (RFC 2595 §4)"
        )
    if not listening:  # a fake server verifies nobody: these mean something to replay only
        tls.add_argument("--ca", metavar="FILE", help="also trust this CA for the server")
        tls.add_argument(
            "--insecure", action="store_true", help="do NOT verify the server's certificate"
        )
    tls.add_argument(
        "--ca-dir",
        metavar="DIR",
        help="popproxy's CA folder (default $POPPROXY_CA_DIR or ~/.popproxy)",
    )


def add_password_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(
        "password",
        "taken from --password, --password-file, $POPPROXY_PASSWORD, or a prompt "
        "when stdin is a terminal (in that order)",
    )
    group.add_argument(
        "--password-file", metavar="FILE", help="read the password from the first line of FILE"
    )
    group.add_argument(
        "--password",
        metavar="P",
        help="the password itself (VISIBLE to other users in the process list: "
        "prefer the file or the environment)",
    )


def add_token_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(
        "bearer token (XOAUTH2, OAUTHBEARER)",
        "taken from --token, --token-file, --token-command or $POPPROXY_TOKEN (in that order)",
    )
    group.add_argument(
        "--token-command",
        metavar="CMD",
        help="run CMD once (through /bin/sh) and use its standard output as the token, "
        "e.g. 'oama access user@example.com'",
    )
    group.add_argument(
        "--token-file", metavar="FILE", help="read the token from the first line of FILE"
    )
    group.add_argument(
        "--token",
        metavar="T",
        help="the token itself (VISIBLE in the process list: prefer the others)",
    )


def client_tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The context for TLS towards the server: needed for --tls and --stls, and for a
    recorded STLS, so --ca and --insecure count whenever they are given."""
    if not (args.tls or args.stls or args.ca or args.insecure):
        return None
    from popproxy.tls.contexts import client_context

    if args.ca and not os.path.isfile(args.ca):
        raise UsageError(f"--ca {args.ca}: no such file")
    try:
        return client_context(cafile=args.ca, insecure=args.insecure)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--ca {args.ca}: {exc}") from None


# ------------------------------------------------------------------ the command


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "replay",
        help="replay a capture's client side against a live server and compare",
        description="Send the recorded commands to a live POP3 server in lock-step (pipelined "
        "batches stay together), log in with the password given, and compare "
        "every answer with the recorded one. Deletions are undone with RSET "
        "before QUIT unless --commit-deletes.",
        epilog="Exit codes: 0 equivalent, 1 different, 2 could not run.",
    )
    p.add_argument(
        "captures", nargs="+", metavar="CAPTURE", help="captures whose client side to replay"
    )
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the live server")
    p.add_argument(
        "--user", metavar="U", help="log in as U (default: the user named in the capture)"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="also compare volatile text (banners, +OK texts, SASL challenges)",
    )
    p.add_argument(
        "--commit-deletes",
        action="store_true",
        help="replay DELE then QUIT as recorded: deletions become permanent",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per capture per line")
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for any connect, answer or handshake (default 10)",
    )
    add_password_options(p)
    add_token_options(p)
    add_tls_options(p, listening=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    server = parse_hostport(args.server, default_port=995 if args.tls else 110)
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise UsageError("--timeout must be a positive number of seconds")
    if args.tls and args.stls:
        raise UsageError("--tls and --stls exclude each other")
    sessions = load_sessions(args.captures)
    for session in sessions:
        require_client_side(session)
        try:
            check_mechanisms(session)
        except AuthError as exc:
            raise UsageError(f"{session.path}: {exc}") from None
    password = None
    if any(needs_password(s) for s in sessions) or args.password or args.password_file:
        password = read_password(password=args.password, password_file=args.password_file)
        if password is None:
            raise UsageError(
                "the capture's credentials were redacted: give the password "
                "with POPPROXY_PASSWORD, --password-file or --password"
            )
    token = None
    if any(needs_token(s) for s in sessions):
        token = read_token(
            token=args.token, token_file=args.token_file, token_command=args.token_command
        )
        if token is None:
            raise UsageError(
                "the capture logged in with a bearer token: give a fresh one with "
                "--token-command, --token-file, --token or POPPROXY_TOKEN"
            )
    options = ReplayOptions(
        server=server,
        credentials=Credentials(args.user, password),
        strict=args.strict,
        commit_deletes=args.commit_deletes,
        timeout=args.timeout,
        tls=args.tls,
        stls=args.stls,
        context=client_tls_context(args),
        token=token,
    )
    console = make_console()
    status = ExitCode.OK
    for session in sessions:
        try:
            report = trio.run(replay_session, session, options)
        except (ReplayError, AuthError) as exc:
            errors.report("replay", f"{session.path}: {exc}")
            return ExitCode.ERROR
        if args.json:
            sys.stdout.write(safe.json_dumps(report.to_json(), default=str) + "\n")
        else:
            render_report(console, report)
        if not report.equivalent:
            status = ExitCode.DIFFERENT
    sys.stdout.flush()
    return status


# ------------------------------------------------------------------ rendering


def render_report(console: Console, report: ReplayReport) -> None:
    """The replay exchange by exchange: ✓ for equal answers, ✗ with each difference."""
    head = Text(f"replay {report.capture}", style="bold")
    head.append(f"  → {report.server}", style="pop.muted")
    console.print(head)
    for outcome in report.outcomes:
        console.print(outcome_line(outcome), overflow="fold")
        for diff in outcome.differences:
            line = Text("      ")
            line.append(diff.field, style="pop.code")
            line.append(": recorded ")
            line.append(_shown(diff.expected), style="pop.client")
            line.append(", live ")
            line.append(_shown(diff.actual), style="pop.server")
            if diff.note:
                line.append(f"  ({diff.note})", style="pop.muted")
            console.print(line, overflow="fold")
        for note in outcome.notes:
            console.print(Text(f"      note: {note}", style="pop.warning"), overflow="fold")
    for note in report.notes:
        console.print(Text(f"note: {note}", style="pop.warning"), overflow="fold")
    compared = [o for o in report.outcomes if not o.inserted]
    differing = [o for o in compared if o.differences]
    if not differing:
        console.print(
            Text(f"equivalent: {len(compared)} exchanges answered as recorded", style="pop.ok")
        )
    else:
        names = ", ".join(dict.fromkeys(o.label.split(" ")[0] for o in differing))
        console.print(
            Text(
                f"different: {len(differing)} of {len(compared)} exchanges ({names})",
                style="pop.err",
            )
        )


def outcome_line(outcome: Outcome) -> Text:
    if outcome.inserted:
        text = Text("  + ", style="pop.warning")
    elif outcome.differences:
        text = Text("  ✗ ", style="pop.err")
    else:
        text = Text("  ✓ ", style="pop.ok")
    text.append(outcome.label, style="pop.client")
    live = outcome.live
    if live is not None and live.status:
        text.append("  →  ")
        text.append(live.status, style="pop.ok" if live.status == "+OK" else "pop.err")
        if live.text:
            text.append(" " + live.text[:80], style="pop.text")
    elif live is None and not outcome.inserted:
        text.append("  →  (no live answer)", style="pop.muted")
    return text


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items() if k != "seq")
    return repr(value) if isinstance(value, str) else str(value)
