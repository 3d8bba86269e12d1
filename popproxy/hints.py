"""What a failure most likely means and the flag that fixes it, for TLS and connection errors."""

from __future__ import annotations

import enum


class Leg(enum.Enum):
    """Which connection failed: popproxy as the server's client, or as the client's server."""

    UPSTREAM = "upstream"
    CLIENT = "client"


# OpenSSL reasons, as ``ssl.SSLError.reason`` names them.
_PLAINTEXT_ANSWER = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "RECORD_LAYER_FAILURE"}
_PEER_REJECTED_US = {
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "TLSV1_ALERT_ACCESS_DENIED",
}


def tls_hint(
    exc: BaseException,
    leg: Leg,
    *,
    ca_flag: str = "--upstream-ca",
    listen_flag: str = "--listen-tls",
) -> str | None:
    """A hint for a failed TLS handshake on ``leg``; None when nothing better is known.

    ``ca_flag`` names the option that adds a trusted CA for the upstream (``record`` calls
    it ``--upstream-ca``, ``replay`` ``--ca``); ``listen_flag`` the one that makes the
    listener speak TLS (``record``: ``--listen-tls``, ``serve``: ``--tls``).
    """
    import ssl  # here, not at the top: the observer imports this module, and stays light

    if isinstance(exc, ssl.SSLCertVerificationError):
        if leg is Leg.UPSTREAM:
            return (
                f"the server's certificate is not trusted here: give its CA with {ca_flag} "
                "FILE, or skip verification with --insecure (recorded as such)"
            )
        return None
    reason = getattr(exc, "reason", None) if isinstance(exc, ssl.SSLError) else None
    if reason in _PLAINTEXT_ANSWER:
        if leg is Leg.UPSTREAM:
            return (
                "the server answered in plaintext: this port does not speak implicit TLS; "
                "drop --upstream-tls (add --upstream-stls if it offers STLS)"
            )
        return (
            f"the client spoke plaintext to a TLS listener: drop {listen_flag}, or point the "
            "client at pop3s (implicit TLS)"
        )
    if reason in _PEER_REJECTED_US and leg is Leg.CLIENT:
        return (
            "the client does not trust popproxy's CA: `popproxy ca` shows where it is and "
            "how to trust it"
        )
    return None


def looks_like_tls(data: bytes) -> bool:
    """Whether ``data`` starts like a TLS record (handshake or alert, TLS 1.0 to 1.3)."""
    return len(data) >= 3 and data[0] in (0x15, 0x16) and data[1] == 0x03 and data[2] <= 0x04


def first_bytes_hint(data: bytes, *, from_client: bool, leg_tls: bool) -> str | None:
    """A hint when a side's first bytes say it speaks TLS on a leg popproxy runs in plaintext."""
    if leg_tls or not looks_like_tls(data):
        return None
    if from_client:
        return (
            "the client started a TLS handshake on a plaintext listener: it expects pop3s; "
            "add --listen-tls (and let the client trust `popproxy ca`)"
        )
    return "the server speaks TLS on this port: add --upstream-tls"


def client_silent_hint(listen_flag: str = "--listen-tls") -> str:
    """The hint for a TLS listener whose client never started a handshake."""
    return (
        "the client sent no TLS handshake: a plaintext POP3 client waits for the greeting; "
        f"drop {listen_flag}, or point the client at pop3s (implicit TLS)"
    )
