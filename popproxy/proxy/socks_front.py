"""The ``--socks5`` front: SOCKS5 handshake and CONNECT, then a session or an opaque relay."""

from __future__ import annotations

import contextlib
import errno
import socket
import sys

import trio

from popproxy.netutil import describe_error, stream_address
from popproxy.proxy import routing
from popproxy.proxy import session as session_module
from popproxy.proxy.config import ProxyConfig, format_hostport
from popproxy.proxy.opaque import OpaqueRelay
from popproxy.proxy.session import Session
from popproxy.proxy.sniff import PrefixedStream, Verdict, sniff
from popproxy.proxy.socks import ConnectRequest, Reply, Socks5Server, SocksError
from popproxy.proxy.view import SessionView

STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
READ = 4096

_ERRNO_REPLIES = {
    errno.ECONNREFUSED: Reply.CONNECTION_REFUSED,
    errno.ENETUNREACH: Reply.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: Reply.HOST_UNREACHABLE,
    errno.EHOSTDOWN: Reply.HOST_UNREACHABLE,
    errno.ETIMEDOUT: Reply.TTL_EXPIRED,
    errno.EACCES: Reply.NOT_ALLOWED,
    errno.EPERM: Reply.NOT_ALLOWED,
}


def reply_for(exc: BaseException) -> Reply:
    """RFC 1928 §6: the reply code that says why the CONNECT failed."""
    if isinstance(exc, trio.TooSlowError):
        return Reply.TTL_EXPIRED  # what SOCKS5 servers answer when a connect times out
    if isinstance(exc, socket.gaierror):
        return Reply.HOST_UNREACHABLE  # the name does not resolve
    for cause in _causes(exc):
        code = _ERRNO_REPLIES.get(getattr(cause, "errno", None) or -1)
        if code is not None:
            return code
    return Reply.GENERAL_FAILURE


def _causes(exc: BaseException) -> list[BaseException]:
    """The error and what caused it (trio's open_tcp_stream wraps one error per address)."""
    seen: list[BaseException] = [exc]
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        seen.extend(cause.exceptions)
    elif cause is not None:
        seen.append(cause)
    return seen


async def handle_socks(
    config: ProxyConfig, view: SessionView | None, stream: trio.SocketStream
) -> None:
    """One SOCKS5 client: negotiate, connect, reply, then relay through a session."""
    try:
        await _serve(config, view, stream)
    except Exception as exc:  # a bug in one connection must never end the proxy
        print(
            f"popproxy: SOCKS5 connection failed: {type(exc).__name__}: {exc}",
            file=sys.stderr,
            flush=True,
        )
        with contextlib.suppress(Exception):
            await stream.aclose()


async def _serve(config: ProxyConfig, view: SessionView | None, stream: trio.SocketStream) -> None:
    settings = config.socks
    assert settings is not None
    peer = stream_address(stream, peer=True)
    proto = Socks5Server(settings.credentials)
    request = await _negotiate(config, view, proto, stream, peer)
    if request is None:
        return
    target = format_hostport(request.host, request.port)
    try:
        with trio.fail_after(config.connect_timeout):
            upstream: trio.abc.Stream = await trio.open_tcp_stream(request.host, request.port)
    except (OSError, trio.TooSlowError) as exc:
        code = reply_for(exc)
        reason = "timed out" if isinstance(exc, trio.TooSlowError) else describe_error(exc)
        await _refuse(view, proto, stream, peer, f"cannot reach {target}: {reason}", code)
        return
    tls = request.port in settings.tls_ports
    client: trio.abc.Stream = stream
    if settings.pop3_only and not tls:
        # Refused with a SOCKS reply the client can show, before a byte is relayed.
        found = await sniff(None, upstream, settings.sniff_timeout)
        upstream = found.server
        if found.verdict is not Verdict.POP3:
            with contextlib.suppress(*STREAM_ERRORS):
                await upstream.aclose()
            reason = f"{target} is not POP3 ({found.reason}; --socks-pop3-only)"
            await _refuse(view, proto, stream, peer, reason, Reply.NOT_ALLOWED)
            return
    sockname = getattr(upstream, "socket", None)
    bound = sockname.getsockname()[:2] if sockname is not None else None
    proto.reply(Reply.SUCCEEDED, bound)
    try:
        await stream.send_all(proto.data_to_send())
    except STREAM_ERRORS:
        await _close_both(stream, upstream)
        return
    early = proto.trailing_data()  # a client that sent before the reply came: kept, in order
    if early:
        client = PrefixedStream(stream, early)
    session_config = routing.socks_config(
        config, request.host, request.port, tls=tls, user=request.user
    )
    label = routing.describe_via(session_config.extra_header) + (", pop3s" if tls else "")
    labelled = routing.LabelledView(view, label) if view is not None else None
    if not tls and not settings.pop3_only:
        found = await sniff(client, upstream, settings.sniff_timeout)
        client, upstream = found.client or client, found.server
        if found.verdict is not Verdict.POP3:
            number = next(session_module._counter)
            if labelled is not None:
                labelled.label += ", opaque"
            relay = OpaqueRelay(
                session_config,
                client,
                upstream,
                labelled,
                number=number,
                reason=found.reason,
                label=session_config.upstream_text,
            )
            await relay.run()
            return

    async def connect() -> trio.abc.Stream:
        return upstream

    session = Session(session_config, client, labelled, connect=connect)
    try:
        await session.run()
    except Exception as exc:  # a bug in one session must never end the proxy
        print(
            f"popproxy: session {session.number} failed: {type(exc).__name__}: {exc}",
            file=sys.stderr,
            flush=True,
        )
        await _close_both(stream, upstream)


async def _negotiate(
    config: ProxyConfig,
    view: SessionView | None,
    proto: Socks5Server,
    stream: trio.SocketStream,
    peer: str,
) -> ConnectRequest | None:
    """RFC 1928 §3-4 (and RFC 1929 §2): up to the CONNECT request, within the timeout."""
    try:
        with trio.fail_after(config.connect_timeout):
            while True:
                data = await stream.receive_some(READ)
                if not data:
                    await _close_both(stream)
                    return None  # gone before asking for anything: nothing to report
                try:
                    requests = proto.receive_data(data)
                finally:
                    out = proto.data_to_send()
                    if out:
                        await stream.send_all(out)
                if requests:
                    return requests[0]
    except SocksError as exc:
        _failed(view, peer, f"SOCKS5: {exc}")
    except trio.TooSlowError:
        _failed(view, peer, "SOCKS5: the client did not finish the handshake in time")
    except STREAM_ERRORS as exc:
        _failed(view, peer, f"SOCKS5: {describe_error(exc)}")
    await _close_both(stream)
    return None


async def _refuse(
    view: SessionView | None,
    proto: Socks5Server,
    stream: trio.SocketStream,
    peer: str,
    reason: str,
    code: Reply,
) -> None:
    proto.reply(code)
    with contextlib.suppress(*STREAM_ERRORS), trio.move_on_after(2):
        await stream.send_all(proto.data_to_send())
    _failed(view, peer, f"SOCKS5 {code.name.lower().replace('_', ' ')}: {reason}")
    await _close_both(stream)


def _failed(view: SessionView | None, peer: str, reason: str) -> None:
    if view is not None:
        view.failed(0, peer, reason)


async def _close_both(*streams: trio.abc.Stream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        for stream in streams:
            with contextlib.suppress(*STREAM_ERRORS, trio.BusyResourceError):
                await stream.aclose()
