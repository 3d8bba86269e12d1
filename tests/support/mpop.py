"""Run mpop (GNU SASL: SCRAM-SHA-1, SCRAM-SHA-256, XOAUTH2, OAUTHBEARER) against a server."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def have_mpop() -> bool:
    return shutil.which("mpop") is not None


def mpop_fetch(
    host: str,
    port: int,
    user: str,
    password: str,
    work: Path,
    *,
    auth: str = "scram-sha-256",
    tls: str = "off",  # "off", "stls" or "implicit"
    cafile: str | None = None,
    timeout: float = 30.0,
) -> tuple[subprocess.CompletedProcess[str], list[bytes]]:
    """Fetch every message (kept on the server) into a fresh Maildir; return the messages."""
    work.mkdir(parents=True, exist_ok=True)
    maildir = work / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    secret = work / "password"
    secret.write_text(password + "\n")
    os.chmod(secret, 0o600)
    lines = [
        "account default",
        f"host {host}",
        f"port {port}",
        f"user {user}",
        f'passwordeval "head -n1 {secret}"',
        f"auth {auth}",
        f"tls {'off' if tls == 'off' else 'on'}",
        f"tls_starttls {'on' if tls == 'stls' else 'off'}",
        f"delivery maildir {maildir}",
        "keep on",
        "only_new off",
        f"uidls_file {work / 'uidls'}",
        f"timeout {int(timeout)}",
    ]
    if cafile:
        lines.append(f"tls_trust_file {cafile}")
    rc = work / "mpoprc"
    rc.write_text("\n".join(lines) + "\n")
    os.chmod(rc, 0o600)
    done = subprocess.run(
        ["mpop", f"--file={rc}", "--half-quiet"],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        check=False,
    )
    messages = sorted(_without_trace(p.read_bytes()) for p in (maildir / "new").iterdir())
    return done, messages


def _without_trace(message: bytes) -> bytes:
    """Drop the Received: header mpop prepends (it carries the delivery time)."""
    if not message.startswith(b"Received: "):
        return message
    lines = message.split(b"\n")
    rest = 1
    while rest < len(lines) and lines[rest][:1] in (b" ", b"\t"):
        rest += 1
    return b"\n".join(lines[rest:])
