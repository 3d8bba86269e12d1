"""TLS for both legs: popproxy's own CA, per-name leaf certificates, contexts and summaries."""

from popproxy.tls.ca import CAError, CertificateAuthority, default_ca_dir
from popproxy.tls.contexts import (
    TlsInfo,
    client_context,
    client_sni,
    describe_tls,
    server_context,
)

__all__ = [
    "CAError",
    "CertificateAuthority",
    "TlsInfo",
    "client_context",
    "client_sni",
    "default_ca_dir",
    "describe_tls",
    "server_context",
]
