"""Credentials for replays: where the password comes from, and the answers POP3 logins need."""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import hmac
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from popproxy.proxy.config import UsageError

PASSWORD_ENV = "POPPROXY_PASSWORD"
SUPPORTED_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


class AuthError(Exception):
    """A login cannot be replayed (unsupported mechanism, missing timestamp): exit code 2."""


@dataclass(frozen=True)
class Credentials:
    """Who to log in as; ``password`` None means "use what the capture kept, if anything"."""

    user: str | None
    password: str | None


def read_password(
    *,
    password: str | None,
    password_file: str | None,
    env: dict[str, str] | None = None,
    prompt: Callable[[str], str] | None = None,
    interactive: bool | None = None,
    what: str = "password",
) -> str | None:
    """The password from ``--password``, ``--password-file``, ``$POPPROXY_PASSWORD`` or a prompt.

    The first source given wins, in that order; the prompt (getpass, no echo) is used only
    when stdin is a terminal.  None when there is no source at all.
    """
    if password is not None:
        return password
    if password_file is not None:
        try:
            with open(password_file, encoding="utf-8") as f:
                text = f.readline()
        except OSError as exc:
            raise UsageError(f"--password-file {password_file}: {exc.strerror or exc}") from None
        return text.rstrip("\r\n")
    environ = os.environ if env is None else env
    if PASSWORD_ENV in environ:
        return environ[PASSWORD_ENV]
    if interactive is None:
        interactive = sys.stdin.isatty()
    if interactive:
        try:
            return (prompt or getpass.getpass)(f"{what}: ")
        except (EOFError, KeyboardInterrupt):
            raise UsageError("no password given") from None
    return None


def is_masked(text: str | None) -> bool:
    """Whether a recorded credential was redacted (same-length ``#`` filler, capture format)."""
    return bool(text) and set(text or "") == {"#"}


def apop_digest(timestamp: str, password: str) -> str:
    """RFC 1939 §7: the APOP digest is MD5(timestamp + shared secret), in lower-case hex."""
    return hashlib.md5((timestamp + password).encode("utf-8")).hexdigest()


def plain_response(user: str, password: str, authzid: str = "") -> str:
    """RFC 4616 §2: ``authzid NUL authcid NUL passwd``, base64 as RFC 5034 §4 carries it."""
    raw = f"{authzid}\x00{user}\x00{password}".encode()
    return base64.b64encode(raw).decode("ascii")


def login_response(challenge: bytes | None, step: int, user: str, password: str) -> str:
    """LOGIN (draft-murchison-sasl-login): ``Username:`` gets the user, ``Password:`` the secret.

    A challenge that names neither is answered by position: the user first, then the password.
    """
    text = (challenge or b"").lower()
    if text.startswith(b"user"):
        value = user
    elif text.startswith(b"pass"):
        value = password
    else:
        value = user if step == 0 else password
    return base64.b64encode(value.encode()).decode("ascii")


def cram_md5_digest(password: str, challenge: bytes) -> str:
    """RFC 2195 §2: HMAC-MD5 keyed with the password over the server's challenge, in hex."""
    return hmac.new(password.encode("utf-8"), challenge, hashlib.md5).hexdigest()


def cram_md5_response(user: str, password: str, challenge: bytes) -> str:
    """RFC 2195 §2: ``user SP digest``, base64."""
    raw = f"{user} {cram_md5_digest(password, challenge)}".encode()
    return base64.b64encode(raw).decode("ascii")


def b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


# ------------------------------------------------------------------ checks for the fake server


def check_apop(timestamp: str | None, password: str, digest: str) -> bool:
    """Verify an APOP digest against the (replayed) greeting timestamp, RFC 1939 §7."""
    if not timestamp:
        return False
    return hmac.compare_digest(apop_digest(timestamp, password), digest.strip().lower())


def check_plain(response: str, password: str) -> bool:
    """RFC 4616 §2: the third field of the decoded response is the password."""
    raw = b64(response)
    if raw is None:
        return False
    parts = raw.split(b"\x00")
    return len(parts) == 3 and hmac.compare_digest(parts[2], password.encode())


def check_cram_md5(challenge: bytes, response: str, password: str) -> bool:
    """RFC 2195 §2: recompute the HMAC over the challenge this server sent."""
    raw = b64(response)
    if raw is None or b" " not in raw:
        return False
    digest = raw.rpartition(b" ")[2].decode("ascii", "replace").lower()
    return hmac.compare_digest(cram_md5_digest(password, challenge), digest)


def check_login_password(response: str, password: str) -> bool:
    raw = b64(response)
    return raw is not None and hmac.compare_digest(raw, password.encode())
