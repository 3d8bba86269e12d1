"""Worked examples shown at the end of each subcommand's ``--help`` (and in docs/cli.md)."""

from __future__ import annotations

import argparse

EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "record": [
        (
            "watch a client against a plaintext server",
            "popproxy record --upstream pop.example.org:110",
        ),
        (
            "pop3s on both legs (clients trust popproxy's CA: popproxy ca)",
            "popproxy record --upstream pop.example.org:995 --upstream-tls --listen-tls "
            "--listen 127.0.0.1:1995",
        ),
        (
            "a test server with its own CA, sessions only on screen",
            "popproxy record --upstream 127.0.0.1:110 --upstream-ca test-ca.pem --quiet",
        ),
        (
            "a SOCKS5 proxy for mail clients: each names its server (995 = pop3s)",
            "popproxy record --socks5 1080",
        ),
        (
            "two accounts in one process",
            "popproxy record --route 1110=pop.a.org:110 --route 1995=pop.b.org:995/tls",
        ),
    ],
    "show": [
        ("every capture in the folder, bodies folded", "popproxy show captures/"),
        ("one capture with the message bodies", "popproxy show --bodies captures/X.popcap"),
        ("only the failures", "popproxy show --errors captures/"),
        ("machine-readable, one object per capture", "popproxy show --json captures/X.popcap"),
        ("follow a capture while it is being written", "popproxy show --follow captures/X.popcap"),
    ],
    "list": [
        ("the default folder", "popproxy list"),
        ("another folder, as JSON", "popproxy list --json fixtures/"),
    ],
    "browse": [
        ("the default folder, watched for new captures", "popproxy browse"),
        ("only failed logins, in two folders", "popproxy browse --filter '{~c PASS & ~e}' a/ b/"),
        (
            "record with the browser as the live view",
            "popproxy record --upstream HOST:110 --browse",
        ),
    ],
    "stats": [
        ("all sessions of a folder", "popproxy stats captures/"),
        ("as JSON for a dashboard", "popproxy stats --json captures/"),
    ],
    "diff": [
        (
            "what changed between two client versions",
            "popproxy diff before.popcap after.popcap",
        ),
    ],
    "lint": [
        ("conformance findings, exit 1 if any", "popproxy lint captures/"),
        ("as JSON", "popproxy lint --json captures/X.popcap"),
    ],
    "export": [
        ("the messages as .eml files", "popproxy export captures/X.popcap --eml mail/"),
        (
            "a transcript for a bug report and a pcap for Wireshark",
            "popproxy export captures/X.popcap --text t.txt --html t.html --pcap t.pcap",
        ),
        ("the raw bytes each side sent", "popproxy export captures/X.popcap --streams raw/"),
    ],
    "replay": [
        (
            "the recorded client against a live server (asks for the password)",
            "popproxy replay captures/X.popcap --server 127.0.0.1:110",
        ),
        (
            "the password from a file, over STLS with a test CA",
            "popproxy replay captures/X.popcap --server 127.0.0.1:110 --password-file pw "
            "--ca test-ca.pem",
        ),
    ],
    "serve": [
        (
            "a fake server playing recordings to your client",
            "popproxy serve captures/ --listen 127.0.0.1:1110",
        ),
        (
            "a stateful mailbox that answers any command order",
            "popproxy serve --mailbox captures/X.popcap --password secret",
        ),
        (
            "cut RETR 1 mid-message; capture what each client got (popproxy show served/)",
            "popproxy serve captures/ --fault 'RETR 1: cut after 500' --out served/",
        ),
    ],
    "docs": [
        ("every document installed", "popproxy docs"),
        ("the fault-rule grammar", "popproxy docs faults"),
        ("the show --json schema, for a validator", "popproxy docs show.schema.json"),
    ],
    "demo": [("record a session offline, in seconds", "popproxy demo")],
    "ca": [
        ("where the CA is and how to trust it", "popproxy ca"),
        ("the certificate's path, for curl --cacert", 'curl --cacert "$(popproxy ca --path)" ...'),
    ],
}


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that the examples block keeps its lines as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        head, marker, examples = text.partition(MARKER)
        filled = super()._fill_text(head, width, indent) if head.strip() else ""
        return (
            f"{filled}\n\n{marker}{examples}" if filled and marker else filled or marker + examples
        )


MARKER = "examples:\n"


def epilog(name: str, existing: str | None = None) -> str | None:
    """The ``--help`` epilog for subcommand ``name``: its examples after any existing text."""
    lines = [existing, ""] if existing else []
    examples = EXAMPLES.get(name, [])
    if examples:
        lines.append(MARKER.rstrip("\n"))
        for what, command in examples:
            lines += [f"  # {what}", f"  {command}"]
    return "\n".join(lines) if lines else existing
