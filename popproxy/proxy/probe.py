"""A start-up check of the upstream: reachable, greeting, TLS as configured, with the fix named."""

from __future__ import annotations

import ipaddress

import trio

from popproxy.hints import Leg, looks_like_tls
from popproxy.netutil import STREAM_ERRORS, close_quietly, describe_error, is_ip, send_quietly
from popproxy.proxy.config import ProxyConfig

PROBE_TIMEOUT = 3.0  # a start-up check must not delay the listener noticeably


async def probe_upstream(config: ProxyConfig, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when the upstream greets as configured; else one line saying what is wrong.

    Connects once, reads the greeting (after the handshake with ``--upstream-tls``) and
    says QUIT: one short, clean session on the server.
    """
    where = config.upstream_text
    host, _port = config.upstream
    try:
        with trio.fail_after(timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(*config.upstream)
    except trio.TooSlowError:
        return f"cannot reach upstream {where}: no answer within {timeout:g} s"
    except OSError as exc:
        return f"cannot reach upstream {where}: {describe_error(exc)}"
    try:
        if config.upstream_tls and config.upstream_context is not None:
            tls = trio.SSLStream(
                stream,
                config.upstream_context,
                server_hostname=host if not is_ip(host) else None,
                https_compatible=True,
            )
            try:
                with trio.fail_after(timeout):
                    await tls.do_handshake()
            except trio.TooSlowError:
                return f"upstream {where}: no TLS handshake within {timeout:g} s"
            except STREAM_ERRORS as exc:
                return f"TLS with upstream {where} failed: {describe_error(exc, Leg.UPSTREAM)}"
            stream = tls
        greeting = b""
        with trio.move_on_after(timeout):
            greeting = bytes(await stream.receive_some(512))
        if not greeting:
            if config.upstream_tls:
                return f"upstream {where} sent no greeting within {timeout:g} s"
            return (
                f"upstream {where} sent no greeting within {timeout:g} s (hint: if it is a "
                "pop3s port, usually 995, add --upstream-tls)"
            )
        if looks_like_tls(greeting):
            return f"upstream {where} answers with TLS (hint: add --upstream-tls)"
        if not greeting.startswith((b"+OK", b"-ERR")):
            return f"upstream {where} does not greet like a POP3 server: {greeting[:40]!r}"
        await send_quietly(stream, b"QUIT\r\n")
        return None
    except STREAM_ERRORS as exc:
        return f"upstream {where}: {describe_error(exc)}"
    finally:
        await close_quietly(stream)


def exposed(host: str) -> bool:
    """Whether listening on ``host`` accepts connections from other machines."""
    if host in ("localhost", "ip6-localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: it may resolve to any address
