"""The recording proxy's settings."""

from __future__ import annotations

import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from popproxy.errors import UsageError
from popproxy.netutil import format_hostport, parse_hostport
from popproxy.proxy.controller import StlsMode
from popproxy.tls.ca import CertificateAuthority

__all__ = [
    "ProxyConfig",
    "StlsMode",
    "UsageError",
    "capture_dir",
    "format_hostport",
    "parse_hostport",
]


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
    insecure: bool = False
    upstream_ca: str | None = None
    ca: CertificateAuthority | None = None
    ca_dir: Path | None = None
    verbose: bool = False
    upstream_context: ssl.SSLContext | None = None
    extra_header: dict[str, object] = field(default_factory=dict)
    check_upstream: bool = False  # record's start-up probe (popproxy/proxy/probe.py)
    faults: FaultSet | None = None  # fault rules (docs/faults.md)

    def certificate_authority(self) -> CertificateAuthority:
        """popproxy's CA, loaded (or created) on first use: plaintext runs never touch it."""
        if self.ca is None:
            from popproxy.tls.ca import default_ca_dir

            self.ca = CertificateAuthority.load_or_create(self.ca_dir or default_ca_dir())
        return self.ca

    @property
    def upstream_text(self) -> str:
        return format_hostport(*self.upstream)
