"""The client side of XOAUTH2, OAUTHBEARER and SCRAM for replays, and where tokens come from."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field

import scramp

from popproxy.core import sasl
from popproxy.proxy.config import UsageError

TOKEN_ENV = "POPPROXY_TOKEN"
SCRAM_CLIENT_MECHANISMS = ("SCRAM-SHA-1", "SCRAM-SHA-256")
MODERN_MECHANISMS = (*SCRAM_CLIENT_MECHANISMS, "XOAUTH2", "OAUTHBEARER")
TOKEN_COMMAND_TIMEOUT = 60.0


def read_token(
    *,
    token: str | None,
    token_file: str | None,
    token_command: str | None,
    env: dict[str, str] | None = None,
) -> str | None:
    """The bearer token from ``--token``, ``--token-file``, ``--token-command`` or
    ``$POPPROXY_TOKEN``, the first given in that order; None when there is none.

    The command runs once, through ``/bin/sh -c`` (so pipes work, as in mpop's
    ``passwordeval``); its standard output, without the trailing line end, is the token.
    """
    if token is not None:
        return _not_empty(token.strip(), "--token")
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as f:
                return _not_empty(f.readline().strip(), f"--token-file {token_file}")
        except OSError as exc:
            raise UsageError(f"--token-file {token_file}: {exc.strerror or exc}") from None
    if token_command is not None:
        return _run_token_command(token_command)
    environ = os.environ if env is None else env
    return environ.get(TOKEN_ENV, "").strip() or None  # set but empty counts as unset


def _not_empty(value: str, where: str) -> str:
    if not value:
        raise UsageError(f"{where}: the bearer token is empty")
    return value


def _run_token_command(command: str) -> str:
    try:
        done = subprocess.run(
            ["/bin/sh", "-c", command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=TOKEN_COMMAND_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise UsageError(
            f"--token-command gave no token within {TOKEN_COMMAND_TIMEOUT:g} s"
        ) from None
    except OSError as exc:
        raise UsageError(f"--token-command: {exc.strerror or exc}") from None
    if done.returncode != 0:
        why = done.stderr.decode("utf-8", "replace").strip().splitlines()
        tail = f": {why[-1][:200]}" if why else ""
        raise UsageError(f"--token-command exited with status {done.returncode}{tail}")
    value = done.stdout.decode("utf-8", "replace").strip()
    if not value or "\n" in value:
        raise UsageError("--token-command must print the token alone on one line")
    return value


@dataclass
class ClientMechanism:
    """Answers one AUTH exchange; ``problems`` collects what did not verify."""

    name: str
    problems: list[str] = field(default_factory=list)
    verified: bool = False  # SCRAM: the server proved it knows the password

    def initial(self) -> bytes:
        """The client's first message (sent base64 as initial response or first answer)."""
        raise NotImplementedError

    def answer(self, challenge: bytes | None) -> bytes | None:
        """The raw answer to a later challenge; None means "answer the empty line"."""
        raise NotImplementedError

    def finished(self, ok: bool) -> None:
        """The server's final status line arrived."""


class OAuthClient(ClientMechanism):
    """XOAUTH2 or OAUTHBEARER (RFC 7628 §3.1) with a fresh token."""

    def __init__(self, name: str, user: str, token: str, host: str, port: int) -> None:
        super().__init__(name)
        self.user, self.token, self.host, self.port = user, token, host, port
        self.error: dict[str, object] | None = None

    def initial(self) -> bytes:
        if self.name == "XOAUTH2":
            return sasl.xoauth2_message(self.user, self.token)
        return sasl.oauthbearer_message(self.user, self.token, self.host, str(self.port))

    def answer(self, challenge: bytes | None) -> bytes | None:
        # RFC 7628 §3.2.3: an error challenge gets a 0x01 (OAUTHBEARER) or, by Google's
        # and Microsoft's documentation, an empty line (XOAUTH2); then the server says -ERR.
        self.error = sasl.oauth_error(challenge)
        return b"\x01" if self.name == "OAUTHBEARER" else None


class ScramClient(ClientMechanism):
    """SCRAM-SHA-1 / SCRAM-SHA-256 (RFC 5802 §5, RFC 7677) through ``scramp``, fresh nonce."""

    def __init__(self, name: str, user: str, password: str) -> None:
        super().__init__(name)
        self.client = scramp.ScramClient([name], user, password)
        self.step = 0

    def initial(self) -> bytes:
        return str(self.client.get_client_first()).encode()

    def answer(self, challenge: bytes | None) -> bytes | None:
        text = (challenge or b"").decode("utf-8", "replace")
        self.step += 1
        if self.step == 1:
            try:
                self.client.set_server_first(text)
                return str(self.client.get_client_final()).encode()
            except scramp.ScramException as exc:
                self.problems.append(f"server-first refused: {exc}")
                return b"*"
        if self.step == 2:
            try:
                # RFC 5802 §3: the client verifies ServerSignature before trusting the server.
                self.client.set_server_final(text)
                self.verified = True
            except scramp.ScramException as exc:
                self.problems.append(f"the server's signature v= does not verify: {exc}")
            return None
        self.problems.append("more challenges than SCRAM has")
        return b"*"

    def finished(self, ok: bool) -> None:
        if ok and not self.verified and not self.problems:
            self.problems.append("the server accepted the login without proving its signature")


def client_mechanism(
    name: str, *, user: str, password: str | None, token: str | None, host: str, port: int
) -> ClientMechanism:
    """The answerer for ``name``; a UsageError-like ValueError names what is missing."""
    if name in SCRAM_CLIENT_MECHANISMS:
        if password is None:
            raise ValueError(
                f"AUTH {name} needs the password (POPPROXY_PASSWORD, --password-file, --password)"
            )
        return ScramClient(name, user, password)
    if name in sasl.OAUTH_MECHANISMS:
        if token is None:
            raise ValueError(
                f"AUTH {name} needs a bearer token (--token, --token-file, --token-command "
                "or POPPROXY_TOKEN)"
            )
        return OAuthClient(name, user, token, host, port)
    raise ValueError(f"cannot replay AUTH {name}")


def refusal(mechanism: str) -> str | None:
    """Why a recorded mechanism cannot be replayed at all, or None."""
    if sasl.is_plus(mechanism):
        return (
            f"cannot replay AUTH {mechanism}: channel binding ties the login to one TLS "
            "channel (RFC 5802 §6) and popproxy replay does not bind; record the client "
            "with plain SCRAM (its settings, or popproxy record --hide-plus)"
        )
    return None
