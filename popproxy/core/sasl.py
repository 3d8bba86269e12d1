"""Decoding of the SASL mechanisms beyond PLAIN/LOGIN/CRAM-MD5: XOAUTH2, OAUTHBEARER and SCRAM."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from popproxy.core import values

OAUTH_MECHANISMS = frozenset({"XOAUTH2", "OAUTHBEARER"})
SCRAM_MECHANISMS = frozenset(
    {"SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-512"}
)
OAUTHBEARER_ACK = b"AQ=="  # RFC 7628 §3.2.3: the client answers an error with one 0x01 byte
MAX_SHOWN = 200  # characters of a decoded value shown


def is_scram(mechanism: str | None) -> bool:
    return bool(mechanism) and str(mechanism).startswith("SCRAM-")


def is_plus(mechanism: str | None) -> bool:
    """RFC 5802 §4: a ``-PLUS`` mechanism binds the authentication to the TLS channel."""
    return bool(mechanism) and str(mechanism).endswith("-PLUS")


def _short(text: str) -> str:
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "…"


# ------------------------------------------------------------------ OAuth


@dataclass(frozen=True, slots=True)
class OAuthRequest:
    """The client's XOAUTH2 or OAUTHBEARER message; ``token`` is the credential."""

    user: str | None
    host: str | None
    port: str | None
    scheme: str | None
    token: bytes | None


def parse_xoauth2(data: bytes) -> OAuthRequest | None:
    """XOAUTH2 (Google, Microsoft; no RFC): ``user=U ^A auth=Bearer T ^A ^A``."""
    if not data.startswith(b"user="):
        return None
    fields = _kvpairs(data.split(b"\x01"))
    return _oauth(fields, fields.get("user"))


def parse_oauthbearer(data: bytes) -> OAuthRequest | None:
    """RFC 7628 §3.1: a GS2 header ``n,a=U,`` then ``^A``-separated key=value pairs."""
    head, sep, rest = data.partition(b"\x01")
    if not sep or head[:2] not in (b"n,", b"y,", b"p="):
        return None
    user: str | None = None
    parts = head.split(b",")
    if len(parts) >= 2 and parts[1].startswith(b"a="):
        user = _saslname(parts[1][2:])
    fields = _kvpairs(rest.split(b"\x01"))
    return _oauth(fields, user)


def _kvpairs(parts: list[bytes]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for part in parts:
        key, eq, value = part.partition(b"=")
        if eq and key and key.decode("ascii", "replace") not in out:
            out[key.decode("ascii", "replace")] = value
    return out


def _oauth(fields: dict[str, bytes], user: bytes | str | None) -> OAuthRequest:
    auth = fields.get("auth", b"")
    scheme, _, token = auth.partition(b" ")
    if isinstance(user, bytes):
        user = values.decode_text(user)
    host, port = fields.get("host"), fields.get("port")
    return OAuthRequest(
        user or None,
        values.decode_text(host) if host else None,
        values.decode_text(port) if port else None,
        values.decode_text(scheme) if scheme else None,
        token or None,
    )


def oauth_error(data: bytes | None) -> dict[str, object] | None:
    """RFC 7628 §3.2.2: a failed bearer token gets a JSON object as the server's challenge."""
    if not data or not data.lstrip().startswith(b"{"):
        return None
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def xoauth2_message(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer_message(
    user: str | None, token: str, host: str | None = None, port: str | None = None
) -> bytes:
    """RFC 7628 §3.1: ``n,a=user,^Ahost=..^Aport=..^Aauth=Bearer token^A^A``."""
    gs2 = f"n,a={_saslname_encode(user)}," if user else "n,,"
    kv = "".join(f"{k}={v}\x01" for k, v in (("host", host), ("port", port)) if v is not None)
    return f"{gs2}\x01{kv}auth=Bearer {token}\x01\x01".encode()


# ------------------------------------------------------------------ SCRAM


@dataclass(frozen=True, slots=True)
class ScramMessage:
    """One SCRAM message (RFC 5802 §5.1 attributes); ``step`` names which one it is."""

    step: str  # client-first, server-first, client-final, server-final, unknown
    attrs: dict[str, str]
    gs2_flag: str | None = None  # "n", "y", or "p=<cb-name>"
    authzid: str | None = None


def parse_scram(data: bytes, from_client: bool) -> ScramMessage | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    gs2_flag = authzid = None
    if from_client and (text[:2] in ("n,", "y,") or text.startswith("p=")):
        # RFC 5802 §7: gs2-header = gs2-cbind-flag "," [ authzid ] ","
        flag, _, rest = text.partition(",")
        az, _, bare = rest.partition(",")
        gs2_flag, authzid, text = flag, (_saslname(az[2:].encode()) if az else None), bare
    attrs: dict[str, str] = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        if not eq or len(key) != 1:
            return None
        attrs.setdefault(key, value)
    if from_client:
        step = "client-first" if "n" in attrs else "client-final" if "c" in attrs else "unknown"
    elif "v" in attrs or "e" in attrs:
        step = "server-final"
    else:
        step = "server-first" if {"r", "s", "i"} <= attrs.keys() else "unknown"
    return ScramMessage(step, attrs, gs2_flag, authzid)


def _saslname(raw: bytes) -> str:
    # RFC 5802 §5.1: "=2C" is a comma and "=3D" an equals sign inside a name.
    return values.decode_text(raw).replace("=2C", ",").replace("=3D", "=")


def _saslname_encode(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


def describe_scram(msg: ScramMessage) -> str:
    """The message's fields for a person; the proof and the signature are never shown."""
    a = msg.attrs
    if msg.step == "client-first":
        parts = [f"user={_short(_saslname(a['n'].encode()))}", f"nonce={_short(a.get('r', ''))}"]
        if msg.authzid:
            parts.insert(1, f"authzid={_short(msg.authzid)}")
        parts.append(_gs2_note(msg.gs2_flag))
        return "client-first: " + ", ".join(parts)
    if msg.step == "server-first":
        salt = values.b64decode(a["s"].encode())
        salt_text = f"{len(salt)} octets" if salt is not None else "not base64"
        return (
            f"server-first: nonce={_short(a['r'])}, salt={_short(a['s'])} ({salt_text}), "
            f"iterations={_short(a['i'])}"
        )
    if msg.step == "client-final":
        binding = values.b64decode(a["c"].encode())
        cb = "none" if binding in (b"n,,", b"y,,") else "channel binding data"
        return (
            f"client-final: nonce={_short(a.get('r', ''))}, c={cb}, "
            f"proof {'present (secret)' if 'p' in a else 'missing'}"
        )
    if msg.step == "server-final":
        if "e" in a:
            return f"server-final: error {_short(a['e'])}"
        return "server-final: verifier v= present (secret)"
    return "SCRAM message not understood"


def _gs2_note(flag: str | None) -> str:
    if flag == "n":
        return "no channel binding"
    if flag == "y":
        return "channel binding supported by the client, not offered by the server"
    if flag and flag.startswith("p="):
        return f"CHANNEL BINDING {flag[2:]} (cannot pass a man in the middle)"
    return "no GS2 header"


# ------------------------------------------------------------------ per mechanism


def identity(
    mechanism: str, responses: list[bytes]
) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """The identity (and host, port for OAuth) from a mechanism's client data: no secret."""
    if not responses:
        return None
    if mechanism in ("PLAIN", "LOGIN", "CRAM-MD5"):
        name = values.sasl_identity(mechanism, responses)
        return None if name is None else (name, ())
    first = values.b64decode(responses[0])
    if not first:
        return None
    if mechanism in OAUTH_MECHANISMS:
        req = parse_xoauth2(first) if mechanism == "XOAUTH2" else parse_oauthbearer(first)
        if req is None or req.user is None:
            return None
        extra = tuple((k, v) for k, v in (("host", req.host), ("port", req.port)) if v)
        return req.user, extra
    if is_scram(mechanism):
        msg = parse_scram(first, from_client=True)
        if msg is None or msg.step != "client-first":
            return None
        extra = (("authzid", msg.authzid),) if msg.authzid else ()
        return _saslname(msg.attrs["n"].encode()), extra
    return None


def client_data_is_secret(mechanism: str | None, step: int, data: bytes) -> bool:
    """Whether client SASL data (base64, as sent) is a credential, by mechanism and step.

    Conservative: only what cannot carry a credential is in clear, namely a SCRAM
    client-first (RFC 5802 §5.1: user name and nonce) and OAUTHBEARER's ``AQ==``
    acknowledgement of an error (RFC 7628 §3.2.3).  Everything else is secret.
    """
    if mechanism is None:
        return True
    if mechanism == "OAUTHBEARER" and step > 0 and data == OAUTHBEARER_ACK:
        return False
    if is_scram(mechanism) and step == 0:
        decoded = values.b64decode(data)
        msg = None if decoded is None else parse_scram(decoded, from_client=True)
        return msg is None or msg.step != "client-first" or "p" in msg.attrs
    return True


def server_data_is_secret(mechanism: str | None, data: bytes | None) -> bool:
    """A SCRAM server-final's ``v=`` is a password verifier (RFC 5802 §9): secret."""
    if not is_scram(mechanism) or not data:
        return False
    msg = parse_scram(data, from_client=False)
    return msg is not None and msg.step == "server-final" and "v" in msg.attrs


def describe_server(mechanism: str | None, data: bytes | None) -> str | None:
    """A server challenge for a person: JSON errors and SCRAM fields decoded."""
    if data is None:
        return None
    if not data:
        return "empty challenge: send the client data"
    if mechanism in OAUTH_MECHANISMS:
        err = oauth_error(data)
        if err is not None:
            fields = ", ".join(f"{k}={_short(str(v))}" for k, v in err.items())
            answer = "AQ==" if mechanism == "OAUTHBEARER" else "an empty line"
            return f"token refused: {fields} (the client must answer {answer})"
    if is_scram(mechanism):
        msg = parse_scram(data, from_client=False)
        if msg is not None:
            return describe_scram(msg)
    return None


def describe_client(mechanism: str | None, step: int, line: bytes) -> str | None:
    """A client response (base64, as sent; ``#`` when redacted) for a person, no secret in it."""
    if not line:
        if mechanism in OAUTH_MECHANISMS:
            return "empty line (acknowledges the error)"
        return "empty line (answers the server-final)" if is_scram(mechanism) else "empty"
    if mechanism == "OAUTHBEARER" and line == OAUTHBEARER_ACK:
        return "AQ== (0x01: acknowledges the error)"
    decoded = values.b64decode(line)
    if decoded is None or mechanism is None:
        return None
    if is_scram(mechanism):
        msg = parse_scram(decoded, from_client=True)
        return None if msg is None else describe_scram(msg)
    if mechanism in OAUTH_MECHANISMS:
        req = parse_xoauth2(decoded) if mechanism == "XOAUTH2" else parse_oauthbearer(decoded)
        if req is None:
            return None
        parts = [f"user={_short(req.user or '')}"]
        parts += [f"{k}={_short(v)}" for k, v in (("host", req.host), ("port", req.port)) if v]
        parts.append(f"{req.scheme or 'no'} token ({len(req.token or b'')} octets, secret)")
        return ", ".join(parts)
    return None


def channel_binding(mechanism: str | None, client_first: bytes | None = None) -> str | None:
    """Why this AUTH cannot succeed through popproxy's TLS interception, or None."""
    if is_plus(mechanism):
        return (
            f"{mechanism} binds the login to the TLS channel (RFC 5802 §6): it fails through "
            "TLS interception (record with --stls passthrough, or --hide-plus)"
        )
    if client_first is not None:
        msg = parse_scram(client_first, from_client=True)
        if msg is not None and msg.gs2_flag and msg.gs2_flag.startswith("p="):
            return f"the client asks for channel binding {msg.gs2_flag[2:]} (RFC 5802 §6)"
    return None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ------------------------------------------------------------------ transcript entries


def _describe_redacted(mechanism: str | None, step: int) -> str | None:
    """What a redacted client line was, from the mechanism and its place in the exchange."""
    if is_scram(mechanism):
        return "client-final: proof present (secret, redacted)" if step >= 1 else None
    if mechanism in OAUTH_MECHANISMS:
        return "bearer token message (secret, redacted)" if step == 0 else None
    return None


def mechanism_of(args: str | None) -> tuple[str | None, bool]:
    """The mechanism named by AUTH's arguments, and whether an initial response was sent."""
    words = (args or "").split(" ")
    mech = words[0].upper() or None
    return mech, len(words) > 1 and words[1] not in ("", "=")


def server_entry(args: str | None, raw: bytes, data: bytes | None) -> dict[str, object]:
    """A transcript entry for a ``+`` challenge: the line (masked if it holds a verifier)."""
    mech, _ = mechanism_of(args)
    line = values.decode_text(raw.rstrip(b"\r\n"))
    entry: dict[str, object] = {"from": "server", "line": line}
    if server_data_is_secret(mech, data):
        entry["line"] = "+ " + "#" * len(line[2:])
        entry["secret"] = True
    body = raw.rstrip(b"\r\n")[2:].strip()
    described = describe_server(mech, data)
    if described is None and body and set(body) == {ord("#")} and is_scram(mech):
        described = "server-final: verifier v= present (secret, redacted)"
    if described is not None:
        entry["decoded"] = described
    elif data:
        entry["decoded"] = _short(values.decode_text(data))
    return entry


def client_entry(
    args: str | None, before: list[dict[str, object]], raw: bytes
) -> dict[str, object]:
    """A transcript entry for a client SASL line: masked unless it can hold no credential."""
    mech, has_ir = mechanism_of(args)
    step = sum(1 for e in before if e.get("from") == "client") + int(has_ir)
    body = raw.rstrip(b"\r\n")
    if body == b"*":
        return {"from": "client", "line": "*", "cancel": True}
    secret = client_data_is_secret(mech, step, body) and bool(body)
    line = "#" * len(body) if secret else values.decode_text(body)
    entry: dict[str, object] = {"from": "client", "line": line, "cancel": False, "secret": secret}
    if body and set(body) == {ord("#")}:
        described = _describe_redacted(mech, step)
    else:
        described = describe_client(mech, step, body)
    if described is not None:
        entry["decoded"] = described
    return entry
