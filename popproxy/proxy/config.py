"""The recording proxy's settings, and ``HOST:PORT`` parsing shared by every command."""

from __future__ import annotations

import enum
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from popproxy.tls.ca import CertificateAuthority


class UsageError(Exception):
    """A bad command-line value: reported in one line, exit code 2."""


class StlsMode(enum.Enum):
    INTERCEPT = "intercept"
    PASSTHROUGH = "passthrough"
    STRIP = "strip"


def parse_hostport(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``host:port``, ``1.2.3.4:port`` or ``[v6]:port`` (names allowed) → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host:
            raise UsageError(f"bad address {text!r}: expected [IPv6]:PORT")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise UsageError(f"bad address {text!r}: expected [IPv6]:PORT")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
        if ":" in host:
            raise UsageError(f"bad address {text!r}: write IPv6 addresses as [ADDR]:PORT")
    if not host:
        raise UsageError(f"bad address {text!r}: the host is missing")
    if not port_text:
        if default_port is None:
            raise UsageError(f"bad address {text!r}: expected HOST:PORT")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"bad address {text!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


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


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
    insecure: bool = False
    upstream_ca: str | None = None
    ca: CertificateAuthority | None = None
    ca_dir: Path | None = None
    verbose: bool = False
    upstream_context: ssl.SSLContext | None = None
    extra_header: dict[str, object] = field(default_factory=dict)

    def certificate_authority(self) -> CertificateAuthority:
        """popproxy's CA, loaded (or created) on first use: plaintext runs never touch it."""
        if self.ca is None:
            from popproxy.tls.ca import default_ca_dir

            self.ca = CertificateAuthority.load_or_create(self.ca_dir or default_ca_dir())
        return self.ca

    @property
    def upstream_text(self) -> str:
        return format_hostport(*self.upstream)
