"""Logins the fake mailbox checks: USER/PASS, APOP and SASL dialogs against one password."""

from __future__ import annotations

import hmac
import os
import socket
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from popproxy.replay import auth

if TYPE_CHECKING:
    from popproxy.replay.sasl_server import OAuthRules

#: A SASL dialog: yields each challenge (decoded, the server base64-encodes it), is sent
#: each client response (still base64), and returns the login's outcome (RFC 5034 §4).
SaslDialog = Generator[bytes, str, "Login"]


@dataclass(frozen=True)
class Login:
    """The outcome of one login attempt: who, and whether the credentials held."""

    user: str | None
    ok: bool
    why: str = ""


def fresh_msg_id(host: str | None = None) -> str:
    """A fresh ``<random.time@host>`` for APOP timestamps and CRAM-MD5 challenges (RFC 1939 §7)."""
    return (
        f"<{os.urandom(8).hex()}.{int(time.time())}@{host or socket.gethostname() or 'popproxy'}>"
    )


@dataclass(frozen=True)
class LoginPolicy:
    """Which logins succeed: any, unless a password (and optionally a user name) is set."""

    password: str | None = None
    user: str | None = None
    token: str | None = None  # XOAUTH2 / OAUTHBEARER: the one bearer token accepted

    def user_ok(self, user: str | None) -> bool:
        return self.user is None or user == self.user


class Authenticator:
    """Every credential check of the fake mailbox: one place to add a mechanism."""

    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN", "CRAM-MD5")

    def __init__(
        self, policy: LoginPolicy, host: str | None = None, oauth: OAuthRules | None = None
    ) -> None:
        from popproxy.replay.sasl_server import RFC7628_RULES, SCRAM_SERVER_MECHANISMS

        self.policy = policy
        self.host = host
        self.oauth = oauth or RFC7628_RULES
        # SCRAM's server signature needs the password: offered only when it is known.
        scram = SCRAM_SERVER_MECHANISMS if policy.password is not None else ()
        self.mechanisms = (*type(self).mechanisms, *scram, "XOAUTH2", "OAUTHBEARER")

    def user_pass(self, user: str | None, password: str) -> Login:
        """USER then PASS (RFC 1939 §7)."""
        return self._result(user, lambda secret: hmac.compare_digest(password, secret))

    def apop(self, user: str, timestamp: str | None, digest: str) -> Login:
        """APOP against this connection's greeting timestamp (RFC 1939 §7)."""
        if timestamp is None:
            return Login(user, False, "the greeting offered no APOP timestamp")
        return self._result(user, lambda secret: auth.check_apop(timestamp, secret, digest))

    def sasl(self, mechanism: str, initial: str | None) -> SaslDialog | None:
        """The dialog for ``AUTH mechanism [initial-response]``; None if not supported."""
        dialogs: dict[str, Callable[[str | None], SaslDialog]] = {
            "PLAIN": self._plain,
            "LOGIN": self._login,
            "CRAM-MD5": self._cram_md5,
        }
        make = dialogs.get(mechanism.upper())
        if make is None:
            return self._modern(mechanism.upper(), initial)
        return make(initial)

    def _modern(self, mechanism: str, initial: str | None) -> SaslDialog | None:
        """SCRAM and OAuth (popproxy/replay/sasl_server.py)."""
        from popproxy.replay import sasl_server

        if mechanism in sasl_server.SCRAM_SERVER_MECHANISMS:
            return sasl_server.scram_dialog(
                mechanism, initial, self.policy.password, self.policy.user_ok
            )
        if mechanism in sasl_server.OAUTH_SERVER_MECHANISMS:
            return sasl_server.oauth_dialog(
                mechanism, initial, self.policy.token, self.policy.user_ok, self.oauth
            )
        return None

    # ------------------------------------------------------------------ mechanisms

    def _plain(self, initial: str | None) -> SaslDialog:
        # RFC 4616 §2: authzid NUL authcid NUL passwd; "=" is an empty initial response.
        response = initial if initial is not None else (yield b"")
        raw = auth.b64("" if response == "=" else response)
        parts = raw.split(b"\x00") if raw is not None else []
        if len(parts) != 3:
            return Login(None, False, "malformed PLAIN response")
        user = parts[1].decode("utf-8", "replace")
        return self._result(user, lambda secret: auth.check_plain(response, secret))

    def _login(self, initial: str | None) -> SaslDialog:
        name = initial if initial is not None else (yield b"Username:")
        secret_b64 = yield b"Password:"
        raw_user = auth.b64(name)
        if raw_user is None:
            return Login(None, False, "malformed LOGIN user name")
        user = raw_user.decode("utf-8", "replace")
        return self._result(user, lambda secret: auth.check_login_password(secret_b64, secret))

    def _cram_md5(self, initial: str | None) -> SaslDialog:
        if initial is not None:
            return Login(None, False, "CRAM-MD5 takes no initial response")
        challenge = fresh_msg_id(self.host).encode()  # RFC 2195 §2: fresh each time
        response = yield challenge
        raw = auth.b64(response)
        if raw is None or b" " not in raw:
            return Login(None, False, "malformed CRAM-MD5 response")
        user = raw.rpartition(b" ")[0].decode("utf-8", "replace")
        return self._result(user, lambda secret: auth.check_cram_md5(challenge, response, secret))

    def _result(self, user: str | None, check: Callable[[str], bool]) -> Login:
        if not self.policy.user_ok(user):
            return Login(user, False, f"unknown user {user!r}")
        if self.policy.password is None:
            return Login(user, True)
        if check(self.policy.password):
            return Login(user, True)
        return Login(user, False, "wrong password")
