"""The proxy's two legs: TLS (server contexts, handshakes, what they say), why a connect failed."""

from __future__ import annotations

import ssl
from typing import Any

import trio

from popproxy import hints
from popproxy.netutil import STREAM_ERRORS, describe_error, is_ip
from popproxy.proxy.config import ProxyConfig
from popproxy.proxy.controller import Leg
from popproxy.tls.ca import CAError
from popproxy.tls.contexts import describe_tls, server_context

# Keyed by the CA itself (path and serial): a CA folder may be recreated with a new CA.
_server_contexts: dict[tuple[str, int, str | None, str | None], ssl.SSLContext] = {}


class HandshakeFailed(Exception):
    """A leg's TLS handshake failed; ``reason`` says why in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def handshake(
    config: ProxyConfig, leg: Leg, stream: trio.abc.Stream, local: str, mode: str
) -> tuple[trio.SSLStream[trio.abc.Stream], dict[str, Any]]:
    """TLS on ``leg`` (popproxy is the server towards the client, the verifying client
    towards the upstream); the TLS stream and the facts for the capture's tls record."""
    if leg is Leg.CLIENT:
        try:
            # First use may create the CA (a key, files, a lock): off the event loop.
            ctx = await trio.to_thread.run_sync(_server_context, config, local)
        except (CAError, OSError, ssl.SSLError) as exc:
            raise HandshakeFailed(f"popproxy's CA is unusable: {exc}") from None
        tls = trio.SSLStream(stream, ctx, server_side=True, https_compatible=True)
    else:
        assert config.upstream_context is not None
        host = config.upstream[0]
        tls = trio.SSLStream(
            stream, config.upstream_context, server_hostname=host, https_compatible=True
        )
    try:
        with trio.fail_after(config.connect_timeout):
            await tls.do_handshake()
    except (*STREAM_ERRORS, trio.TooSlowError) as exc:
        if isinstance(exc, trio.TooSlowError):
            silent = leg is Leg.CLIENT
            reason = f"timed out (hint: {hints.client_silent_hint()})" if silent else "timed out"
        else:
            reason = describe_error(exc, hints.Leg(leg.value))
        raise HandshakeFailed(reason) from None
    return tls, tls_info(tls, leg.value, mode)


def tls_info(stream: trio.SSLStream[Any], leg: str, mode: str) -> dict[str, Any]:
    info = describe_tls(stream)
    return {
        "leg": leg,
        "mode": mode,
        "version": info.version,
        "cipher": info.cipher,
        "sni": info.sni,
        "peer_subject": info.peer_subject,
        "peer_issuer": info.peer_issuer,
        "peer_sha256": info.peer_fingerprint_sha256,
        "verified": info.verified,
    }


def _server_context(config: ProxyConfig, local: str) -> ssl.SSLContext:
    ca = config.certificate_authority()
    host = config.upstream[0]
    local_ip = local.rsplit(":", 1)[0].strip("[]")
    name = None if is_ip(host) else host
    key = (str(ca.cert_path), ca.cert.serial_number, name, local_ip)
    ctx = _server_contexts.get(key)
    if ctx is None:
        ctx = _server_contexts[key] = server_context(ca, default_host=name, local_ip=local_ip)
    return ctx


def first_cause(exc: BaseException) -> BaseException:
    """The real cause behind "all attempts to connect failed" (e.g. out of descriptors)."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        return cause.exceptions[0]
    return exc
