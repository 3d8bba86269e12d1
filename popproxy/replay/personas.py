"""Providers' POP3 behaviour for ``serve --mailbox --persona``: Gmail's and Outlook.com's OAuth."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from popproxy.replay.mailbox import Answer, MailboxSession, State, stuff
from popproxy.replay.sasl_server import GMAIL_ERROR, OAuthRules
from popproxy.replay.sources import Persona


@dataclass(frozen=True)
class ProviderPersona:
    """What a provider documents and sends: greeting, CAPA before and after TLS, OAuth rules."""

    name: str
    greeting: str
    capa_plain: tuple[str, ...]  # CAPA before TLS (the provider requires TLS before login)
    capa_tls: tuple[str, ...]
    mechanisms: tuple[str, ...]
    oauth: OAuthRules
    texts: dict[str, str]
    auth_before_tls: str | None  # the -ERR line for AUTH before TLS, None when allowed
    one_line_refused: str | None  # the -ERR line (then close) for a token on the AUTH line
    failure: str  # the status line for a refused login


_GMAIL_CAPA = (
    "USER",
    "RESP-CODES",
    "EXPIRE 0",
    "LOGIN-DELAY 300",
    "TOP",
    "UIDL",
    "X-GOOGLE-RICO",
    "SASL PLAIN XOAUTH2 OAUTHBEARER",
)

PERSONAS: dict[str, ProviderPersona] = {
    # Gmail: pop.gmail.com:995 (implicit TLS); the token may ride on the AUTH line; a
    # refused token gets a base64 JSON challenge, answered by an empty line, then -ERR.
    "gmail": ProviderPersona(
        name="gmail",
        greeting="+OK Gpop ready for requests from 127.0.0.1 popproxy",
        # Gmail has no plaintext port: served without --tls, the CAPA is the same.
        capa_plain=_GMAIL_CAPA,
        capa_tls=_GMAIL_CAPA,
        mechanisms=("PLAIN", "XOAUTH2", "OAUTHBEARER"),
        oauth=OAuthRules(error_json=GMAIL_ERROR),
        texts={"LOGIN": "+OK Welcome.", "QUIT": "+OK Farewell."},
        auth_before_tls=None,
        one_line_refused=None,
        failure="-ERR [AUTH] Invalid credentials.",
    ),
    # Outlook.com / Microsoft 365: outlook.office365.com:995 or 110 with STLS; no SASL in
    # CAPA before STLS; XOAUTH2 in two steps only (a one-line AUTH closes the connection);
    # a refused token is a plain -ERR, no JSON.
    "outlook": ProviderPersona(
        name="outlook",
        greeting="+OK The Microsoft Exchange POP3 service is ready.",
        capa_plain=("TOP", "UIDL", "USER", "STLS"),
        capa_tls=("TOP", "UIDL", "SASL PLAIN XOAUTH2", "USER"),
        mechanisms=("PLAIN", "XOAUTH2"),
        oauth=OAuthRules(error_json=None, two_step_only=True),
        texts={
            "LOGIN": "+OK User successfully authenticated.",
            "QUIT": "+OK Microsoft Exchange Server POP3 server signing off.",
        },
        auth_before_tls="-ERR Command is not valid in this state.",
        one_line_refused="-ERR Protocol error. Connection is closed. 10",
        failure="-ERR Authentication failure: unknown user name or bad password.",
    ),
}


def recorded_persona(persona: ProviderPersona) -> Persona:
    """The provider's greeting and reply texts, in the form the mailbox replays."""
    return Persona(greeting=persona.greeting.encode() + b"\r\n", texts=dict(persona.texts))


def hook_for(
    persona: ProviderPersona, session: MailboxSession
) -> Callable[[Callable[[bytes], Answer], bytes], Answer]:
    """Wrap ``session``'s reply path with the provider's rules (a mailbox_server hook)."""
    session.max_command = None  # Gmail takes XOAUTH2 lines over RFC 2449's 255 octets

    def hook(answer: Callable[[bytes], Answer], line: bytes) -> Answer:
        if session.in_sasl:
            return _failure(persona, answer(line))
        text = line.rstrip(b"\r\n").decode("utf-8", "replace").strip()
        verb, _, rest = text.partition(" ")
        verb = verb.upper()
        if verb == "CAPA":
            return _capa(persona, session)
        if verb == "AUTH" and session.state is State.AUTHORIZATION:
            words = rest.split()
            if persona.auth_before_tls and not session.tls_active:
                return Answer(persona.auth_before_tls.encode() + b"\r\n")
            if words and words[0].upper() not in persona.mechanisms:
                return Answer(b"-ERR Unsupported authentication mechanism.\r\n")
            if len(words) > 1 and words[0].upper() == "XOAUTH2" and persona.one_line_refused:
                return Answer(persona.one_line_refused.encode() + b"\r\n", then="close")
        return _failure(persona, answer(line))

    return hook


def _capa(persona: ProviderPersona, session: MailboxSession) -> Answer:
    names = persona.capa_tls if session.tls_active else persona.capa_plain
    if session.tls_active or not session.stls:
        names = tuple(n for n in names if n != "STLS")
    body = "\r\n".join(names).encode() + b"\r\n"
    return Answer(b"+OK Capability list follows\r\n" + stuff(body))


def _failure(persona: ProviderPersona, answer: Answer) -> Answer:
    if answer.data.startswith(b"-ERR [AUTH] Authentication failed."):
        return Answer(persona.failure.encode() + b"\r\n", answer.then)
    return answer
