"""The sans-IO SOCKS5 server (RFC 1928, RFC 1929) and the POP3 sniffer, without sockets."""

from __future__ import annotations

import errno
import socket

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from popproxy.proxy.config import (
    Security,
    UsageError,
    parse_credentials,
    parse_listen,
    parse_route,
)
from popproxy.proxy.sniff import PrefixedStream, Verdict, judge_client, judge_server, sniff
from popproxy.proxy.socks import (
    AddressType,
    ConnectRequest,
    Reply,
    Socks5Server,
    SocksError,
    State,
    encode_reply,
)
from popproxy.proxy.socks_front import reply_for

NO_AUTH = b"\x05\x01\x00"
USERPASS = b"\x05\x01\x02"


def connect_domain(name: bytes, port: int) -> bytes:
    return b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big")


def login(user: bytes, password: bytes) -> bytes:
    return b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password


def feed(server: Socks5Server, data: bytes, *, bytewise: bool = False) -> list[ConnectRequest]:
    out: list[ConnectRequest] = []
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for chunk in chunks:
        out += server.receive_data(chunk)
    return out


# ----------------------------------------------------------------------------- negotiation


@pytest.mark.parametrize("bytewise", [False, True])
def test_no_auth_connect_by_domain(bytewise: bool) -> None:
    server = Socks5Server()
    got = feed(server, NO_AUTH + connect_domain(b"pop.example.org", 995), bytewise=bytewise)
    assert got == [ConnectRequest("pop.example.org", 995, AddressType.DOMAIN, None)]
    assert server.data_to_send() == b"\x05\x00"
    assert server.state is State.CONNECTING
    server.reply(Reply.SUCCEEDED, ("127.0.0.1", 40000))
    assert server.data_to_send() == b"\x05\x00\x00\x01\x7f\x00\x00\x01" + (40000).to_bytes(2)
    assert server.state is State.TUNNEL


def test_ipv4_and_ipv6_targets() -> None:
    v4 = Socks5Server()
    assert feed(v4, NO_AUTH + b"\x05\x01\x00\x01\xc0\x00\x02\x01\x00\x6e") == [
        ConnectRequest("192.0.2.1", 110, AddressType.IPV4, None)
    ]
    v6 = Socks5Server()
    raw = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    assert feed(v6, NO_AUTH + b"\x05\x01\x00\x04" + raw + b"\x03\xe3") == [
        ConnectRequest("2001:db8::1", 995, AddressType.IPV6, None)
    ]
    v6.reply(Reply.SUCCEEDED, ("::1", 7))
    assert v6.data_to_send()[-20:] == bytes([0, 4]) + socket.inet_pton(socket.AF_INET6, "::1") + (
        7
    ).to_bytes(2)


def test_required_username_password() -> None:
    server = Socks5Server((b"u", b"p w"))
    assert feed(server, b"\x05\x02\x00\x02") == []
    assert server.data_to_send() == b"\x05\x02"
    assert feed(server, login(b"u", b"p w") + connect_domain(b"h", 110)) == [
        ConnectRequest("h", 110, AddressType.DOMAIN, "u")
    ]
    assert server.data_to_send() == b"\x01\x00"


def test_wrong_password_is_refused_and_never_repeated() -> None:
    server = Socks5Server((b"u", b"right"))
    feed(server, USERPASS)
    server.data_to_send()
    with pytest.raises(SocksError) as info:
        feed(server, login(b"u", b"wrong"))
    assert server.data_to_send() == b"\x01\x01"  # RFC 1929 §2: non-zero status
    assert "wrong" not in str(info.value) and "'u'" in str(info.value)
    assert server.state is State.CLOSED


def test_auth_required_but_not_offered() -> None:
    server = Socks5Server((b"u", b"p"))
    with pytest.raises(SocksError, match="username/password"):
        feed(server, NO_AUTH)
    assert server.data_to_send() == b"\x05\xff"  # RFC 1928 §3: no acceptable methods


def test_user_recorded_when_offered_without_requirement() -> None:
    server = Socks5Server()
    got = feed(server, USERPASS + login(b"alice", b"anything") + connect_domain(b"h", 1))
    assert got[0].user == "alice"


@pytest.mark.parametrize(
    ("request_bytes", "code", "message"),
    [
        (b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x01", Reply.COMMAND_NOT_SUPPORTED, "BIND"),
        (b"\x05\x03\x00\x01\x7f\x00\x00\x01\x00\x01", Reply.COMMAND_NOT_SUPPORTED, "UDP"),
        (b"\x05\x01\x00\x09\x00", Reply.ADDRESS_TYPE_NOT_SUPPORTED, "address type"),
        (connect_domain(b"bad\x1b[31mname", 110), Reply.HOST_UNREACHABLE, "domain"),
        (connect_domain(b"h", 0), Reply.CONNECTION_REFUSED, "port 0"),
    ],
)
def test_bad_requests_get_their_reply(request_bytes: bytes, code: Reply, message: str) -> None:
    server = Socks5Server()
    with pytest.raises(SocksError, match=message):
        feed(server, NO_AUTH + request_bytes)
    assert server.data_to_send() == b"\x05\x00" + encode_reply(code)
    assert server.state is State.CLOSED


def test_socks4_and_garbage() -> None:
    socks4 = Socks5Server()
    with pytest.raises(SocksError, match="SOCKS4"):
        feed(socks4, b"\x04\x01\x00\x6e\x7f\x00\x00\x01\x00")
    assert socks4.data_to_send() == b"\x00\x5b" + bytes(6)
    http = Socks5Server()
    with pytest.raises(SocksError, match="not a SOCKS5"):
        feed(http, b"GET / HTTP/1.1\r\n")
    assert http.data_to_send() == b""
    with pytest.raises(SocksError):
        http.receive_data(b"more")


def test_bytes_after_the_request_are_kept_for_the_tunnel() -> None:
    server = Socks5Server()
    feed(server, NO_AUTH + connect_domain(b"h", 110) + b"CAPA\r\n")
    server.receive_data(b"USER a\r\n")
    assert server.trailing_data() == b"CAPA\r\nUSER a\r\n"


def test_failure_reply_closes() -> None:
    server = Socks5Server()
    feed(server, NO_AUTH + connect_domain(b"h", 110))
    server.data_to_send()
    server.reply(Reply.TTL_EXPIRED)
    assert server.data_to_send() == b"\x05\x06\x00\x01" + bytes(6)
    assert server.state is State.CLOSED
    with pytest.raises(RuntimeError):
        server.reply(Reply.SUCCEEDED)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.lists(st.integers(1, 20), max_size=10))
def test_any_input_gives_events_or_socks_error(data: bytes, cuts: list[int]) -> None:
    """No other exception escapes, whatever the bytes and however they are split."""
    for credentials in (None, (b"u", b"p")):
        server = Socks5Server(credentials)
        pos = 0
        try:
            for cut in [*cuts, len(data)]:
                server.receive_data(data[pos : pos + cut])
                pos += cut
        except SocksError:
            assert server.state is State.CLOSED


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([b"\x00", b"\x02\x00", b"\x01\x02\x00"]),
    st.from_regex(rb"[a-z0-9.\-]{1,40}", fullmatch=True),
    st.integers(1, 65535),
    st.integers(1, 7),
)
def test_segmentation_independence(methods: bytes, name: bytes, port: int, step: int) -> None:
    wire = b"\x05" + bytes([len(methods)]) + methods
    if b"\x00" not in methods:
        wire += login(b"u", b"p")
    wire += connect_domain(name, port)
    whole = Socks5Server()
    expected = whole.receive_data(wire)
    split = Socks5Server()
    got: list[ConnectRequest] = []
    for i in range(0, len(wire), step):
        got += split.receive_data(wire[i : i + step])
    assert got == expected and len(got) == 1
    assert split.data_to_send() == whole.data_to_send()


# ----------------------------------------------------------------------------- reply codes


def test_connect_errors_map_to_reply_codes() -> None:
    refused = OSError("all attempts failed")
    refused.__cause__ = ExceptionGroup("x", [ConnectionRefusedError(errno.ECONNREFUSED, "no")])
    assert reply_for(refused) is Reply.CONNECTION_REFUSED
    assert reply_for(OSError(errno.ENETUNREACH, "x")) is Reply.NETWORK_UNREACHABLE
    assert reply_for(OSError(errno.EHOSTUNREACH, "x")) is Reply.HOST_UNREACHABLE
    assert reply_for(socket.gaierror(socket.EAI_NONAME, "x")) is Reply.HOST_UNREACHABLE
    assert reply_for(trio.TooSlowError()) is Reply.TTL_EXPIRED
    assert reply_for(OSError("odd")) is Reply.GENERAL_FAILURE


# ----------------------------------------------------------------------------- sniffing


@pytest.mark.parametrize(
    ("data", "eof", "verdict"),
    [
        (b"+OK Dovecot ready.\r\n", False, Verdict.POP3),
        (b"-ERR busy\r\n", False, Verdict.POP3),
        (b"+O", False, Verdict.UNDECIDED),
        (b"+O", True, Verdict.OPAQUE),
        (b"SSH-2.0-OpenSSH\r\n", False, Verdict.OPAQUE),
        (b"* OK IMAP4rev1\r\n", False, Verdict.OPAQUE),
        (b"HTTP/1.1 400\r\n", False, Verdict.OPAQUE),
    ],
)
def test_judge_server(data: bytes, eof: bool, verdict: Verdict) -> None:
    assert judge_server(data, eof) is verdict


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (b"CAPA\r\n", Verdict.POP3),
        (b"user alice\r\n", Verdict.POP3),
        (b"CA", Verdict.UNDECIDED),
        (b"GET / HTTP/1.1\r\n", Verdict.OPAQUE),
        (b"\x16\x03\x01\x02\x00", Verdict.OPAQUE),  # a TLS ClientHello
        (b"EHLO x\r\n", Verdict.OPAQUE),
        (b"RETRIEVE", Verdict.OPAQUE),
    ],
)
def test_judge_client(data: bytes, verdict: Verdict) -> None:
    assert judge_client(data, False) is verdict


async def test_sniff_hands_back_every_byte() -> None:
    client, client_far = trio.testing.memory_stream_pair()
    server, server_far = trio.testing.memory_stream_pair()
    await client_far.send_all(b"CAPA\r\n")
    await server_far.send_all(b"+OK hi\r\nextra")
    found = await sniff(client, server, 5)
    assert found.verdict is Verdict.POP3
    assert found.client is not None
    assert await found.client.receive_some(100) == b"CAPA\r\n"
    assert await found.server.receive_some(3) == b"+OK"
    assert await found.server.receive_some(100) == b" hi\r\nextra"
    await server_far.send_all(b"later")
    assert await found.server.receive_some(100) == b"later"


async def test_sniff_http_client_is_opaque_at_once() -> None:
    client, client_far = trio.testing.memory_stream_pair()
    server, _server_far = trio.testing.memory_stream_pair()
    await client_far.send_all(b"GET / HTTP/1.1\r\n")
    with trio.fail_after(1):
        found = await sniff(client, server, 30)
    assert found.verdict is Verdict.OPAQUE and "client spoke first" in found.reason
    assert found.client is not None
    assert await found.client.receive_some(100) == b"GET / HTTP/1.1\r\n"


async def test_sniff_silent_server_times_out(autojump_clock: trio.abc.Clock) -> None:
    client, _c = trio.testing.memory_stream_pair()
    server, _s = trio.testing.memory_stream_pair()
    found = await sniff(client, server, 3)
    assert found.verdict is Verdict.OPAQUE and "within 3 s" in found.reason


async def test_sniff_keeps_eof() -> None:
    client, _c = trio.testing.memory_stream_pair()
    server, server_far = trio.testing.memory_stream_pair()
    await server_far.send_all(b"+OK\r\n")
    await server_far.send_eof()
    found = await sniff(client, server, 1)
    chunks = [await found.server.receive_some(100), await found.server.receive_some(100)]
    assert chunks[0] in (b"+OK\r\n", b"+OK\r\n")
    assert b"".join(chunks) == b"+OK\r\n"


async def test_prefixed_stream_delegates() -> None:
    a, b = trio.testing.memory_stream_pair()
    stream = PrefixedStream(a, b"ab")
    await stream.send_all(b"x")
    assert await b.receive_some(10) == b"x"
    assert await stream.receive_some(1) == b"a"
    assert await stream.receive_some() == b"b"


# ----------------------------------------------------------------------------- parsing flags


def test_parse_route() -> None:
    route = parse_route("1995=pop.b.org:995/tls")
    assert route.listen == ("127.0.0.1", 1995) and route.upstream == ("pop.b.org", 995)
    assert route.security is Security.TLS
    assert route.text == "127.0.0.1:1995=pop.b.org:995/tls"
    assert parse_route("[::1]:1110=[2001:db8::1]:110/STLS").security is Security.STLS
    assert parse_route("0.0.0.0:1110=h:110").security is Security.PLAIN
    for bad in ("1110", "=h:110", "1110=h", "1110=h:110/ssl", "1110=h:0", "x:y=h:1"):
        with pytest.raises(UsageError):
            parse_route(bad)


def test_parse_listen_and_credentials() -> None:
    assert parse_listen("1080") == ("127.0.0.1", 1080)
    assert parse_listen("[::1]:1080") == ("::1", 1080)
    assert parse_credentials("u:p:q") == (b"u", b"p:q")
    assert parse_credentials("u", {"POPPROXY_SOCKS_PASSWORD": "from env"}) == (b"u", b"from env")
    for bad in ("nopass", ":p", "u:", "u:" + "x" * 256):
        with pytest.raises(UsageError):
            parse_credentials(bad, {})
