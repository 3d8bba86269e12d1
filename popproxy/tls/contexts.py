"""TLS contexts for both legs of the proxy, and what a finished handshake looked like."""

from __future__ import annotations

import functools
import hashlib
import os
import ssl
import sys
import tempfile
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio
from cryptography import x509

from popproxy import fsutil
from popproxy.tls.ca import LEAF_CACHE_SIZE, CertificateAuthority

_S = TypeVar("_S", bound=trio.abc.Stream)

# SNI a client sent, per server-side SSLObject; weak so a closed session leaves nothing behind.
_client_sni: weakref.WeakKeyDictionary[ssl.SSLObject, str | None] = weakref.WeakKeyDictionary()


def _apply_keylog(ctx: ssl.SSLContext) -> None:
    # Only ssl.create_default_context() reads SSLKEYLOGFILE; a hand-built context must be told,
    # and so must each per-name context the SNI callback swaps in (OpenSSL logs through it).
    path = os.environ.get("SSLKEYLOGFILE")
    if path and not sys.flags.ignore_environment and _keylog_ready(path):
        ctx.keylog_filename = path


@functools.cache
def _keylog_ready(path: str) -> bool:
    """Create the key log 0600 (or check an existing one is a regular file of ours) first.

    ssl appends to the file by name and would follow a symlink, creating it 0644; made or
    checked here, with O_NOFOLLOW, it holds keys only where the user asked.  Checked once
    per path: a refused key log is reported once and TLS goes on without it.
    """
    try:
        os.close(fsutil.open_append(path, fsutil.PRIVATE))
    except OSError as exc:
        print(
            f"popproxy: warning: SSLKEYLOGFILE {path}: {exc.strerror or exc}; "
            "TLS keys are not logged",
            file=sys.stderr,
        )
        return False
    return True


def _server_base() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _apply_keylog(ctx)
    return ctx


class _LeafContexts:
    """Per-name server contexts, each holding one leaf, bounded like the leaf cache."""

    def __init__(self, ca: CertificateAuthority, local_ip: str | None) -> None:
        self._ca = ca
        self._local_ip = local_ip
        self._contexts: OrderedDict[str | None, ssl.SSLContext] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, hostname: str | None) -> ssl.SSLContext:
        with self._lock:
            ctx = self._contexts.get(hostname)
            if ctx is not None:
                self._contexts.move_to_end(hostname)
                return ctx
        ctx = self._build(hostname)
        with self._lock:
            self._contexts[hostname] = ctx
            while len(self._contexts) > LEAF_CACHE_SIZE:
                self._contexts.popitem(last=False)
        return ctx

    def _build(self, hostname: str | None) -> ssl.SSLContext:
        ctx = _server_base()
        self.load_into(ctx, hostname)
        return ctx

    def load_into(self, ctx: ssl.SSLContext, hostname: str | None) -> None:
        # The local address goes into every leaf, so a client that dialled the IP is served too.
        chain, key = self._ca.leaf(hostname, self._local_ip)
        # ssl can only load a cert chain from a file. The file lives a few microseconds, mode
        # 0600 in a fresh 0700 folder, and is deleted at once: leaf keys are cheap to mint, so
        # keeping them on disk (ca_dir/leaves/) would add secrets to guard and nothing else.
        with tempfile.TemporaryDirectory(prefix="popproxy-leaf-") as tmp:
            pem = Path(tmp) / "leaf.pem"
            with os.fdopen(fsutil.create(pem, fsutil.PRIVATE), "wb") as f:
                f.write(key + chain)
            ctx.load_cert_chain(pem)


def server_context(
    ca: CertificateAuthority, *, default_host: str | None, local_ip: str | None
) -> ssl.SSLContext:
    """TLS server context toward clients; each SNI name gets a leaf minted by `ca`.

    A client that sends no SNI (or an unusable one) gets the leaf for `default_host`, then for
    `local_ip`; with neither, its handshake fails with an unrecognized_name alert.
    """
    leaves = _LeafContexts(ca, local_ip)
    fallback = default_host or None

    def on_sni(
        ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext
    ) -> int | None:
        _client_sni[ssl_object] = server_name
        # Errors here would only print to stderr and fail the handshake, so answer with alerts.
        # The SNI name first, then the default host, then a leaf for the local address alone.
        candidates: list[str | None] = [n for n in (server_name, fallback) if n]
        if local_ip is not None:
            candidates.append(None)
        for name in dict.fromkeys(candidates):
            try:
                ssl_object.context = leaves.get(name)
            except (ValueError, OSError, ssl.SSLError):
                continue  # e.g. an SNI name no certificate can carry: try the fallback
            return None
        return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME

    base = _server_base()
    if fallback is not None or local_ip is not None:
        # The default leaf is loaded now so bad settings fail at start-up, and so a handshake
        # still has a certificate should the callback not swap contexts.
        leaves.load_into(base, fallback)
    base.sni_callback = on_sni
    return base


def client_context(*, cafile: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """TLS client context toward the real server: system trust (plus `cafile`), hostname check.

    `insecure=True` accepts any certificate and any name, to watch servers with broken setups.
    Build it once and share it: loading the system trust store takes ~30 ms.
    """
    # create_default_context(cafile=...) would drop the system store; we want both.
    ctx = ssl.create_default_context()
    if cafile is not None:
        ctx.load_verify_locations(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        ctx.check_hostname = False  # must go before verify_mode, or ssl refuses CERT_NONE
        ctx.verify_mode = ssl.CERT_NONE
    _apply_keylog(ctx)
    return ctx


def client_sni(stream: trio.SSLStream[_S]) -> str | None:
    """The SNI name the client sent on a server-side stream (None if it sent none)."""
    # trio keeps the SSLObject private; typed access lets mypy notice if trio renames it.
    return _client_sni.get(stream._ssl_object)


@dataclass(frozen=True)
class TlsInfo:
    """What one TLS leg negotiated, for capture records and the live view."""

    version: str | None
    cipher: str | None
    sni: str | None
    peer_subject: str | None
    peer_fingerprint_sha256: str | None
    alpn: str | None
    peer_issuer: str | None = None
    verified: bool | None = None  # the peer's certificate was checked (None: none was asked)


def describe_tls(stream: trio.SSLStream[_S]) -> TlsInfo:
    """Summarise a stream whose handshake is done (trio raises NeedHandshakeError before)."""
    cipher = stream.cipher()
    der: bytes | None = stream.getpeercert(binary_form=True)
    subject = issuer = None
    if der:
        try:
            cert = x509.load_der_x509_certificate(der)
            subject, issuer = cert.subject.rfc4514_string(), cert.issuer.rfc4514_string()
        except ValueError:
            subject = issuer = None  # a peer's odd certificate must not spoil the record
    # Towards the upstream popproxy is the client: the handshake succeeded, so the server's
    # certificate was verified exactly when the context required it (not with --insecure).
    verified = None if stream.server_side else stream.context.verify_mode == ssl.CERT_REQUIRED
    return TlsInfo(
        version=stream.version(),
        cipher=cipher[0] if cipher else None,
        sni=client_sni(stream) if stream.server_side else stream.server_hostname,
        peer_subject=subject,
        peer_fingerprint_sha256=hashlib.sha256(der).hexdigest() if der else None,
        alpn=stream.selected_alpn_protocol(),
        peer_issuer=issuer,
        verified=verified,
    )
