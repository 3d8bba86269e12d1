"""The server side of SCRAM and OAuth for ``serve``: dialogs that check a password or a token."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass

import scramp

from popproxy.core import sasl, values
from popproxy.replay.mailbox_auth import Login, SaslDialog

SCRAM_SERVER_MECHANISMS = ("SCRAM-SHA-1", "SCRAM-SHA-256")
OAUTH_SERVER_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")
DEFAULT_ITERATIONS = 4096  # RFC 7677 §4: at least 4096 for SCRAM-SHA-256
GMAIL_ERROR = {"status": "400", "schemes": "Bearer", "scope": "https://mail.google.com/"}

UserCheck = Callable[[str | None], bool]


@dataclass(frozen=True)
class OAuthRules:
    """How a server treats bearer tokens: where they may go and how a refusal looks."""

    error_json: dict[str, str] | None = None  # RFC 7628 §3.2.2 error challenge, or a plain -ERR
    two_step_only: bool = False  # the token must follow a '+' (Microsoft)


#: A server that follows RFC 7628 §3.2.2: a refused token gets a JSON error challenge.
RFC7628_RULES = OAuthRules(error_json={"status": "invalid_token", "schemes": "bearer"})


def oauth_rules(persona: str | None) -> OAuthRules:
    """The OAuth rules of ``serve --persona NAME`` (popproxy/replay/personas.py)."""
    if persona is None:
        return RFC7628_RULES
    from popproxy.replay.personas import PERSONAS

    return PERSONAS[persona].oauth


def scram_parameters(challenges: list[bytes]) -> tuple[bytes | None, int | None]:
    """The salt and iteration count of a recorded server-first (RFC 5802 §5.1 ``s=``, ``i=``)."""
    for raw in challenges:
        data = values.b64decode(raw.rstrip(b"\r\n")[2:].strip())
        msg = sasl.parse_scram(data, from_client=False) if data else None
        if msg is not None and msg.step == "server-first":
            salt = values.b64decode(msg.attrs["s"].encode())
            iterations = msg.attrs["i"]
            return salt, int(iterations) if iterations.isdigit() else None
    return None, None


def scram_dialog(
    mechanism: str,
    initial: str | None,
    password: str | None,
    user_ok: UserCheck,
    *,
    salt: bytes | None = None,
    iterations: int | None = None,
) -> SaslDialog:
    """RFC 5802 §5 server side: recorded (or fresh) salt and count, a fresh server nonce."""
    response = initial if initial is not None else (yield b"")
    if password is None:
        return Login(None, False, f"{mechanism} needs the password (serve --check-password)")
    first = values.b64decode(response.encode())
    binding = sasl.channel_binding(mechanism, first)
    if binding is not None:
        return Login(None, False, binding)
    mech = scramp.ScramMechanism(mechanism)
    count = iterations or DEFAULT_ITERATIONS
    try:
        info = mech.make_auth_info(password, iteration_count=count, salt=salt)
    except scramp.ScramException:  # a recorded count below scramp's floor
        info = mech.make_auth_info(password, salt=salt)
    seen: list[str] = []

    def lookup(username: str) -> tuple[bytes, bytes, bytes, int]:
        seen.append(username)
        return info  # type: ignore[no-any-return]

    server = mech.make_server(lookup)
    try:
        server.set_client_first((first or b"").decode("utf-8"))
        final = yield str(server.get_server_first()).encode()
        user = seen[0] if seen else None
        if not user_ok(user):
            return Login(user, False, f"unknown user {user!r}")
        server.set_client_final((values.b64decode(final.encode()) or b"").decode("utf-8"))
    except (scramp.ScramException, UnicodeDecodeError) as exc:
        return Login(seen[0] if seen else None, False, f"SCRAM refused: {exc}")
    yield str(server.get_server_final()).encode()  # v=: the client checks it, answers ""
    return Login(seen[0], True)


def oauth_dialog(
    mechanism: str,
    initial: str | None,
    token: str | None,
    user_ok: UserCheck,
    rules: OAuthRules,
) -> SaslDialog:
    """XOAUTH2 / OAUTHBEARER: any token is accepted unless ``token`` is set."""
    response = initial if initial is not None else (yield b"")
    data = values.b64decode(response.encode()) or b""
    parse = sasl.parse_xoauth2 if mechanism == "XOAUTH2" else sasl.parse_oauthbearer
    req = parse(data)
    if req is None or req.token is None:
        return Login(None, False, f"malformed {mechanism} message")
    if not user_ok(req.user):
        return Login(req.user, False, f"unknown user {req.user!r}")
    if token is None or hmac.compare_digest(req.token, token.encode()):
        return Login(req.user, True)
    if rules.error_json is None:
        return Login(req.user, False, "bearer token refused")
    ack = yield json.dumps(rules.error_json, separators=(",", ":")).encode()
    # RFC 7628 §3.2.3: OAUTHBEARER's client answers 0x01; XOAUTH2's an empty line.
    wanted = sasl.OAUTHBEARER_ACK.decode() if mechanism == "OAUTHBEARER" else ""
    if ack != wanted:
        return Login(req.user, False, f"the error was answered {ack!r}, not {wanted!r}")
    return Login(req.user, False, "bearer token refused")


def recorded_dialog(
    mechanism: str,
    initial: str | None,
    password: str | None,
    token: str | None,
    challenges: list[bytes],
) -> SaslDialog:
    """``serve`` of a recorded AUTH: SCRAM with the recorded salt and iteration count, OAuth
    with a JSON error challenge when the recording had one (RFC 7628 §3.2.2)."""
    if mechanism in SCRAM_SERVER_MECHANISMS:
        salt, iterations = scram_parameters(challenges)
        return scram_dialog(mechanism, initial, password, _anyone, salt=salt, iterations=iterations)
    rules = RFC7628_RULES
    for raw in challenges:
        error = sasl.oauth_error(values.b64decode(raw.rstrip(b"\r\n")[2:].strip()))
        if error is not None:
            rules = OAuthRules(error_json={str(k): str(v) for k, v in error.items()})
    return oauth_dialog(mechanism, initial, token, _anyone, rules)


def _anyone(user: str | None) -> bool:
    return True
