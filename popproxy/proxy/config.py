"""The recording proxy's settings."""

from __future__ import annotations

import enum
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popproxy.errors import UsageError
from popproxy.netutil import format_hostport, parse_hostport
from popproxy.proxy.controller import StlsMode
from popproxy.tls.ca import CertificateAuthority

__all__ = [
    "ProxyConfig",
    "Route",
    "Security",
    "SocksSettings",
    "StlsMode",
    "UsageError",
    "capture_dir",
    "format_hostport",
    "parse_credentials",
    "parse_hostport",
    "parse_listen",
    "parse_route",
]


def parse_listen(text: str, *, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """A listening address: ``[HOST:]PORT`` (loopback unless a host is named)."""
    text = text.strip()
    if text.isdigit():
        return parse_hostport(f"{default_host}:{text}")
    return parse_hostport(text)


class Security(enum.Enum):
    """How a ``--route`` reaches its upstream (and so what its listener speaks)."""

    PLAIN = "plain"  # POP3, a client's STLS intercepted as with --upstream
    TLS = "tls"  # implicit TLS on both legs (pop3s), popproxy's CA towards the client
    STLS = "stls"  # popproxy upgrades the upstream leg with STLS itself


@dataclass(frozen=True)
class Route:
    """One ``--route LISTEN=UPSTREAM[/tls|/stls]``: a listener with its own upstream."""

    listen: tuple[str, int]
    upstream: tuple[str, int]
    security: Security
    text: str  # as written on the command line, for captures and the live view


def parse_route(text: str) -> Route:
    """``LISTEN=UPSTREAM[/tls|/stls]``, LISTEN being ``[HOST:]PORT``."""
    listen_text, sep, rest = text.partition("=")
    if not sep or not listen_text or not rest:
        raise UsageError(f"bad route {text!r}: expected LISTEN=UPSTREAM[/tls|/stls]")
    upstream_text, slash, mode = rest.partition("/")
    try:
        security = Security(mode.lower()) if slash else Security.PLAIN
    except ValueError:
        raise UsageError(f"bad route {text!r}: the suffix must be /tls or /stls") from None
    if slash and security is Security.PLAIN:
        raise UsageError(f"bad route {text!r}: the suffix must be /tls or /stls")
    try:
        listen = parse_listen(listen_text)
        upstream = parse_hostport(upstream_text)
    except UsageError as exc:
        raise UsageError(f"bad route {text!r}: {exc}") from None
    if upstream[1] == 0:
        raise UsageError(f"bad route {text!r}: the upstream needs a real port, not 0")
    canonical = f"{format_hostport(*listen)}={format_hostport(*upstream)}"
    if security is not Security.PLAIN:
        canonical += f"/{security.value}"
    return Route(listen, upstream, security, canonical)


SOCKS_PASSWORD_ENV = "POPPROXY_SOCKS_PASSWORD"


def parse_credentials(text: str, environ: Mapping[str, str] | None = None) -> tuple[bytes, bytes]:
    """``--socks-auth USER:PASS``, or ``USER`` alone with the password in the environment
    variable ``POPPROXY_SOCKS_PASSWORD`` (kept out of ``ps``); RFC 1929 §2: each 1 to 255
    octets."""
    user, sep, password = text.partition(":")
    if not sep:
        env = os.environ if environ is None else environ
        password = env.get(SOCKS_PASSWORD_ENV, "")
        if not password:
            raise UsageError(
                f"--socks-auth wants USER:PASS, or USER with the password in ${SOCKS_PASSWORD_ENV}"
            )
    raw_user, raw_password = user.encode(), password.encode()
    if not 0 < len(raw_user) <= 255 or not 0 < len(raw_password) <= 255:
        raise UsageError("--socks-auth: the user and the password must be 1 to 255 octets each")
    return raw_user, raw_password


@dataclass(frozen=True)
class SocksSettings:
    """The ``--socks5`` listener: clients name their upstream in a SOCKS5 CONNECT."""

    listen: tuple[str, int]
    credentials: tuple[bytes, bytes] | None = None
    tls_ports: frozenset[int] = frozenset({995})  # implicit TLS on both legs
    pop3_only: bool = False  # refuse what does not greet like POP3 instead of relaying it
    sniff_timeout: float = 3.0  # how long a server may take to greet before it is not POP3


def capture_dir(text: str) -> Path:
    """The ``--out`` folder, created if needed and checked writable (a clear error if not)."""
    out = Path(text)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write captures to {out}: {exc.strerror or exc}") from None
    return out


if TYPE_CHECKING:
    from popproxy.faults.matcher import FaultSet


@dataclass
class ProxyConfig:
    """Everything one ``popproxy record`` run needs; TLS pieces are built once, up front."""

    upstream: tuple[str, int]
    listen: tuple[str, int] = ("127.0.0.1", 1110)
    out_dir: Path = Path("captures")
    keep_secrets: bool = False
    connect_timeout: float = 10.0
    idle_timeout: float = 600.0  # RFC 1939 §3: a server's autologout timer is >= 10 minutes
    linger: float = 5.0
    listen_tls: bool = False
    upstream_tls: bool = False
    upstream_stls: bool = False
    stls: StlsMode = StlsMode.INTERCEPT
    hide_plus: bool = False  # hide SASL -PLUS mechanisms from the client (docs/tls.md)
    insecure: bool = False
    upstream_ca: str | None = None
    ca: CertificateAuthority | None = None
    ca_dir: Path | None = None
    verbose: bool = False
    upstream_context: ssl.SSLContext | None = None
    extra_header: dict[str, object] = field(default_factory=dict)
    check_upstream: bool = False  # record's start-up probe (popproxy/proxy/probe.py)
    faults: FaultSet | None = None  # fault rules (docs/faults.md)
    serve_fixed: bool = True  # listen on ``listen`` for ``upstream`` (off: only routes, SOCKS)
    routes: list[Route] = field(default_factory=list)
    socks: SocksSettings | None = None

    def certificate_authority(self) -> CertificateAuthority:
        """popproxy's CA, loaded (or created) on first use: plaintext runs never touch it."""
        if self.ca is None:
            from popproxy.tls.ca import default_ca_dir

            self.ca = CertificateAuthority.load_or_create(self.ca_dir or default_ca_dir())
        return self.ca

    @property
    def upstream_text(self) -> str:
        return format_hostport(*self.upstream)

    def capture_header(
        self, number: int, client: str, listen: str, started: datetime
    ) -> tuple[str, dict[str, Any]]:
        """A session's capture file name and header record (docs/capture-format.md)."""
        from popproxy import __version__

        name = f"{started:%Y%m%dT%H%M%S}.{started:%f}Z-{number:05d}.popcap"
        header: dict[str, Any] = {
            "popproxy": __version__,
            "start": started.isoformat().replace("+00:00", "Z"),
            "t0": started.timestamp(),
            "session": number,
            "client": client,
            "listen": listen,
            "upstream": self.upstream_text,
            "keep_secrets": self.keep_secrets,
            "listen_tls": self.listen_tls,
            "upstream_tls": self.upstream_tls,
            "upstream_stls": self.upstream_stls,
            "stls": self.stls.value,
            "insecure": self.insecure,
            **({"hide_plus": True} if self.hide_plus else {}),
            **self.extra_header,
        }
        return name, header
