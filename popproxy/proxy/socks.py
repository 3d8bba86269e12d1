"""SOCKS5's server side, sans-IO: greeting, username/password, CONNECT, reply (RFC 1928, 1929).

Why not ``socksio``: it implements the client side only (it builds requests and parses
replies; it cannot parse a client's method list, credentials or CONNECT request, nor build
a server's reply), so popproxy carries this small state machine instead.

Bytes go in (``receive_data``), events come out; the caller sends ``data_to_send()``.
Everything that affects state transitions lives here.  Bad input raises ``SocksError``
(the only exception this module raises on peer input) after queuing the reply RFC 1928
asks for, if any; the caller sends it and closes the connection.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import re
from dataclasses import dataclass

VERSION = 5
AUTH_VERSION = 1  # RFC 1929 §2: the sub-negotiation's own version number


class Method(enum.IntEnum):
    """RFC 1928 §3: authentication methods."""

    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(enum.IntEnum):
    """RFC 1928 §4: request commands."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(enum.IntEnum):
    """RFC 1928 §5: address types."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Reply(enum.IntEnum):
    """RFC 1928 §6: reply codes."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class State(enum.Enum):
    METHODS = "methods"  # waiting for the client's version/method list
    AUTH = "auth"  # waiting for RFC 1929 username/password
    REQUEST = "request"  # waiting for the CONNECT request
    CONNECTING = "connecting"  # the caller is reaching the target; it must call reply()
    TUNNEL = "tunnel"  # replied success: every later byte belongs to the tunnel
    CLOSED = "closed"  # failed: send what is queued, then close


class SocksError(Exception):
    """The client broke the protocol or was refused; its reply (if any) is queued."""


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """The client asked to be connected to ``host:port``; ``user`` if it authenticated.

    ``host`` is an IP address in its usual text form, or a domain name for popproxy to
    resolve (``address_type`` says which).
    """

    host: str
    port: int
    address_type: AddressType
    user: str | None


# A domain name as resolvers take it: printable ASCII, no spaces (IDNs arrive as
# punycode); anything else is refused rather than shown or looked up.
_DOMAIN = re.compile(r"[A-Za-z0-9_.\-]{1,253}")


class Socks5Server:
    """One client connection's SOCKS5 negotiation, up to the CONNECT reply.

    ``credentials``: the only accepted (user, password) pair; the client must then use
    username/password authentication.  Without it the client may skip authentication,
    and one that offers only username/password is accepted with any password (its user
    name is still reported, never its password).
    """

    def __init__(self, credentials: tuple[bytes, bytes] | None = None) -> None:
        self.state = State.METHODS
        self.user: str | None = None
        self._credentials = credentials
        self._buf = bytearray()
        self._out = bytearray()
        self._request: ConnectRequest | None = None

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def trailing_data(self) -> bytes:
        """Bytes received after the request (a client that did not wait for the reply)."""
        data, self._buf = bytes(self._buf), bytearray()
        return data

    def receive_data(self, data: bytes) -> list[ConnectRequest]:
        """Feed bytes from the client; returns the CONNECT request once it is complete."""
        if self.state in (State.CONNECTING, State.TUNNEL):
            self._buf += data  # early tunnel bytes: kept for the caller, in order
            return []
        if self.state is State.CLOSED:
            raise SocksError("the SOCKS negotiation already failed")
        self._buf += data
        events: list[ConnectRequest] = []
        progressed = True
        while progressed:
            if self.state is State.METHODS:
                progressed = self._methods()
            elif self.state is State.AUTH:
                progressed = self._auth()
            elif self.state is State.REQUEST:
                request = self._command()
                if request is not None:
                    events.append(request)
                progressed = False
            else:
                progressed = False
        return events

    def reply(self, code: Reply, bound: tuple[str, int] | None = None) -> None:
        """Queue the answer to the CONNECT request (RFC 1928 §6); ``bound`` is the address
        popproxy's upstream socket is bound to (BND.ADDR/BND.PORT)."""
        if self.state is not State.CONNECTING:
            raise RuntimeError(f"reply() in state {self.state.value}")
        self._out += encode_reply(code, bound)
        self.state = State.TUNNEL if code is Reply.SUCCEEDED else State.CLOSED

    # ---------------------------------------------------------------- the phases

    def _fail(self, reason: str, answer: bytes = b"") -> SocksError:
        self._out += answer
        self.state = State.CLOSED
        self._buf.clear()
        return SocksError(reason)

    def _methods(self) -> bool:
        buf = self._buf
        if not buf:
            return False
        if buf[0] == 4:
            # A SOCKS4 request: answer "request rejected" in SOCKS4's own reply format.
            raise self._fail("SOCKS4 is not supported (use SOCKS5)", b"\x00\x5b" + bytes(6))
        if buf[0] != VERSION:
            raise self._fail("not a SOCKS5 client")
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return False
        # RFC 1928 §3: VER NMETHODS METHODS; the server picks one.
        offered = set(buf[2 : 2 + buf[1]])
        del buf[: 2 + buf[1]]
        if self._credentials is not None:
            choice = Method.USERNAME_PASSWORD if Method.USERNAME_PASSWORD in offered else None
        elif Method.NO_AUTH in offered:
            choice = Method.NO_AUTH
        elif Method.USERNAME_PASSWORD in offered:
            choice = Method.USERNAME_PASSWORD
        else:
            choice = None
        if choice is None:
            # RFC 1928 §3: X'FF', and the client MUST close the connection.
            wanted = "username/password" if self._credentials else "no authentication"
            raise self._fail(
                f"the client offers no acceptable method (popproxy wants {wanted})",
                bytes([VERSION, Method.NO_ACCEPTABLE]),
            )
        self._out += bytes([VERSION, choice])
        self.state = State.AUTH if choice is Method.USERNAME_PASSWORD else State.REQUEST
        return True

    def _auth(self) -> bool:
        # RFC 1929 §2: VER ULEN UNAME PLEN PASSWD
        buf = self._buf
        if not buf:
            return False
        if buf[0] != AUTH_VERSION:
            raise self._fail("bad username/password sub-negotiation", bytes([AUTH_VERSION, 1]))
        if len(buf) < 2 or len(buf) < 3 + buf[1]:
            return False
        ulen = buf[1]
        plen = buf[2 + ulen]
        if len(buf) < 3 + ulen + plen:
            return False
        user, password = bytes(buf[2 : 2 + ulen]), bytes(buf[3 + ulen : 3 + ulen + plen])
        del buf[: 3 + ulen + plen]
        self.user = printable(user.decode("utf-8", "replace"))
        if self._credentials is not None:
            want_user, want_password = self._credentials
            # Both compared, always, in constant time: no timing hint about which was wrong.
            ok_user = hmac.compare_digest(user, want_user)
            ok_password = hmac.compare_digest(password, want_password)
            if not (ok_user and ok_password):
                # RFC 1929 §2: a non-zero STATUS, then the server MUST close the connection.
                raise self._fail(
                    f"SOCKS authentication failed for user {self.user!r}",
                    bytes([AUTH_VERSION, 1]),
                )
        self._out += bytes([AUTH_VERSION, 0])
        self.state = State.REQUEST
        return True

    def _command(self) -> ConnectRequest | None:
        # RFC 1928 §4: VER CMD RSV ATYP DST.ADDR DST.PORT
        buf = self._buf
        if len(buf) < 5:
            if buf and buf[0] != VERSION:
                raise self._fail("bad SOCKS5 request", encode_reply(Reply.GENERAL_FAILURE))
            return None
        if buf[0] != VERSION:
            raise self._fail("bad SOCKS5 request", encode_reply(Reply.GENERAL_FAILURE))
        atype = buf[3]
        if atype == AddressType.IPV4:
            size = 4
        elif atype == AddressType.IPV6:
            size = 16
        elif atype == AddressType.DOMAIN:
            size = 1 + buf[4]
        else:
            raise self._fail(
                f"address type {atype} is not supported",
                encode_reply(Reply.ADDRESS_TYPE_NOT_SUPPORTED),
            )
        end = 4 + size + 2
        if len(buf) < end:
            return None
        command, raw = buf[1], bytes(buf[4 : 4 + size])
        port = int.from_bytes(buf[4 + size : end], "big")
        del buf[:end]
        if command != Command.CONNECT:
            name = Command(command).name if command in (1, 2, 3) else str(command)
            raise self._fail(
                f"SOCKS command {name} is not supported (only CONNECT)",
                encode_reply(Reply.COMMAND_NOT_SUPPORTED),
            )
        if atype == AddressType.IPV4:
            host = str(ipaddress.IPv4Address(raw))
        elif atype == AddressType.IPV6:
            host = str(ipaddress.IPv6Address(raw))
        else:
            name_bytes = raw[1:]
            text = name_bytes.decode("ascii", "replace")
            if not _DOMAIN.fullmatch(text):
                raise self._fail(f"bad domain name {text!r}", encode_reply(Reply.HOST_UNREACHABLE))
            host = text
        if port == 0:
            raise self._fail("port 0 cannot be reached", encode_reply(Reply.CONNECTION_REFUSED))
        self.state = State.CONNECTING
        self._request = ConnectRequest(host, port, AddressType(atype), self.user)
        return self._request


def printable(text: str) -> str:
    """A peer's text with control characters escaped: it is shown and recorded."""
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def encode_reply(code: Reply, bound: tuple[str, int] | None = None) -> bytes:
    """RFC 1928 §6: VER REP RSV ATYP BND.ADDR BND.PORT (0.0.0.0:0 when there is none)."""
    host, port = bound or ("0.0.0.0", 0)
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        address = ipaddress.IPv4Address(0)
    atype = AddressType.IPV4 if address.version == 4 else AddressType.IPV6
    return bytes([VERSION, code, 0, atype]) + address.packed + port.to_bytes(2, "big")
