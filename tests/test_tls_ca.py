"""popproxy's CA, leaf certificates and TLS contexts, checked by real handshakes and openssl."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import shutil
import ssl
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from popproxy.tls import (
    CAError,
    CertificateAuthority,
    client_context,
    client_sni,
    default_ca_dir,
    describe_tls,
    server_context,
)
from popproxy.tls.ca import CA_CERT_NAME, CA_KEY_NAME, LEAF_CACHE_SIZE

REPO = Path(__file__).resolve().parent.parent

Stream = trio.SSLStream[
    trio.StapledStream[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]
]


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca")


def _leaf_cert(chain: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(chain)[0]


async def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str | None
) -> tuple[Stream, Stream]:
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client = trio.SSLStream(client_raw, client_ctx, server_hostname=server_hostname)
    server = trio.SSLStream(server_raw, server_ctx, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server


async def _failed_handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str
) -> tuple[BaseException, BaseException | None]:
    """Run a handshake expected to fail; return the client's and the server's errors' causes."""
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client = trio.SSLStream(client_raw, client_ctx, server_hostname=server_hostname)
    server = trio.SSLStream(server_raw, server_ctx, server_side=True)
    server_error: list[BaseException | None] = [None]

    async def server_side() -> None:
        try:
            await server.do_handshake()
        except trio.BrokenResourceError as exc:
            server_error[0] = exc.__cause__
            # trio does not flush the alert of a failed handshake: hang up so the client sees it.
            await server_raw.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_side)
        with pytest.raises(trio.BrokenResourceError) as info:
            await client.do_handshake()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert info.value.__cause__ is not None
    return info.value.__cause__, server_error[0]


def _peer_cert(stream: Stream) -> x509.Certificate:
    der = stream.getpeercert(binary_form=True)
    assert der
    return x509.load_der_x509_certificate(der)


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


# --- the CA on disk --------------------------------------------------------------------------


def test_default_ca_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POPPROXY_CA_DIR", str(tmp_path / "x"))
    assert default_ca_dir() == tmp_path / "x"
    monkeypatch.delenv("POPPROXY_CA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_ca_dir() == tmp_path / ".popproxy"


def test_ca_created_once_with_private_modes(tmp_path: Path) -> None:
    ca_dir = tmp_path / "nested" / "ca"
    ca = CertificateAuthority.load_or_create(ca_dir)
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((ca_dir / CA_KEY_NAME).stat().st_mode) == 0o600
    assert ca.cert_path == ca_dir / CA_CERT_NAME
    assert ca.cert_path.read_bytes() == ca.cert_pem
    # Nothing left behind but the two files and the lock.
    assert sorted(p.name for p in ca_dir.iterdir()) == [".lock", CA_KEY_NAME, CA_CERT_NAME]

    key_before = (ca_dir / CA_KEY_NAME).read_bytes()
    again = CertificateAuthority.load_or_create(ca_dir)
    assert again.cert_pem == ca.cert_pem
    assert (ca_dir / CA_KEY_NAME).read_bytes() == key_before


def test_ca_certificate_fields(ca: CertificateAuthority) -> None:
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "popproxy CA"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 3650 <= lifetime.days <= 3652


_RACER = textwrap.dedent(
    """
    import hashlib, sys, time
    from pathlib import Path
    from popproxy.tls import CertificateAuthority
    ca_dir, ready, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    ready.touch()
    while not go.exists():
        time.sleep(0.0005)
    ca = CertificateAuthority.load_or_create(ca_dir)
    key = (ca_dir / "ca-key.pem").read_bytes()
    print(hashlib.sha256(ca.cert_pem).hexdigest(), hashlib.sha256(key).hexdigest())
    """
)


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_first_use_yields_one_ca(tmp_path: Path, round_: int) -> None:
    ca_dir = tmp_path / "ca"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(ca_dir), str(tmp_path / f"ready{i}"), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for i in range(6)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(len(procs))):
        assert time.monotonic() < deadline, "racers did not start"
        time.sleep(0.005)
    go.touch()
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        outputs.append(out.decode().strip())
    assert len(set(outputs)) == 1, outputs
    ca = CertificateAuthority.load_or_create(ca_dir)
    assert ca.cert_path.read_bytes() == ca.cert_pem
    assert not [p for p in ca_dir.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / CA_CERT_NAME).write_bytes(b"not a certificate"), "not a PEM certificate"),
        (lambda d: (d / CA_KEY_NAME).write_bytes(b"garbage"), "not an unencrypted PEM key"),
        (lambda d: (d / CA_KEY_NAME).unlink(), "is missing"),
        (lambda d: (d / CA_CERT_NAME).unlink(), "exists but"),
    ],
    ids=["bad-cert", "bad-key", "no-key", "no-cert"],
)
def test_damaged_ca_gives_clear_error(
    tmp_path: Path, damage: Callable[[Path], object], message: str
) -> None:
    ca_dir = tmp_path / "ca"
    CertificateAuthority.load_or_create(ca_dir)
    key_before = (ca_dir / CA_KEY_NAME).read_bytes()
    damage(ca_dir)
    with pytest.raises(CAError, match=message):
        CertificateAuthority.load_or_create(ca_dir)
    if (ca_dir / CA_KEY_NAME).exists() and message == "exists but":
        assert (ca_dir / CA_KEY_NAME).read_bytes() == key_before  # a key is never overwritten


def test_key_from_another_ca_is_refused(tmp_path: Path) -> None:
    one = CertificateAuthority.load_or_create(tmp_path / "one")
    CertificateAuthority.load_or_create(tmp_path / "two")
    shutil.copy(tmp_path / "two" / CA_KEY_NAME, one.ca_dir / CA_KEY_NAME)
    with pytest.raises(CAError, match="does not belong"):
        CertificateAuthority.load_or_create(one.ca_dir)


def test_unusable_ca_folder_gives_clear_error(tmp_path: Path) -> None:
    # As root permission bits block nothing: a path under a regular file cannot be a folder.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CAError, match="cannot use CA folder"):
        CertificateAuthority.load_or_create(blocker / "ca")
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    (ca_dir / CA_CERT_NAME).mkdir()
    with pytest.raises(CAError):
        CertificateAuthority.load_or_create(ca_dir)


def test_expired_ca_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    key = serialization.load_pem_private_key((ca.ca_dir / CA_KEY_NAME).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    long_ago = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(ca.cert.subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(long_ago)
        .not_valid_after(long_ago + datetime.timedelta(days=1))
    )
    for ext in ca.cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    expired = builder.sign(key, hashes.SHA256())
    ca.cert_path.write_bytes(expired.public_bytes(Encoding.PEM))
    with pytest.raises(CAError, match="expired on 2000-01-02"):
        CertificateAuthority.load_or_create(ca.ca_dir)


# --- leaf certificates -----------------------------------------------------------------------


def test_leaf_extensions(ca: CertificateAuthority) -> None:
    chain, key_pem = ca.leaf("Mail.Example.TEST.", "192.0.2.7")
    certs = x509.load_pem_x509_certificates(chain)
    assert len(certs) == 2 and certs[1] == x509.load_pem_x509_certificate(ca.cert_pem)
    leaf = certs[0]
    assert leaf.issuer == certs[1].subject
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "mail.example.test"
    )
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert b"PRIVATE KEY" in key_pem
    san = _san(leaf)
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.test"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not bc.ca
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = certs[1].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 397 <= lifetime.days < 398
    assert leaf.serial_number != certs[1].serial_number


def test_leaf_for_ip_literals(ca: CertificateAuthority) -> None:
    only_ip = _leaf_cert(ca.leaf(None, "127.0.0.1")[0])
    assert only_ip.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "127.0.0.1"
    assert _san(only_ip).get_values_for_type(x509.DNSName) == []
    # An IP-looking host name goes into iPAddress only (CA/B BR §7.1.4.2.1), without duplicates.
    ip_name = _leaf_cert(ca.leaf("::1", "::1")[0])
    assert _san(ip_name).get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]
    assert _san(ip_name).get_values_for_type(x509.DNSName) == []


def test_leaf_edge_cases(ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError):
        ca.leaf(None, None)
    with pytest.raises(ValueError):
        ca.leaf("host", "not-an-ip")
    with pytest.raises(ValueError):
        ca.leaf("a" * 64 + ".test", None)  # a DNS label is at most 63 octets
    long_name = ".".join(["a" * 30] * 3)
    leaf = _leaf_cert(ca.leaf(long_name, None)[0])
    assert not leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.DNSName) == [long_name]
    idn = _leaf_cert(ca.leaf("bücher.example", None)[0])
    assert _san(idn).get_values_for_type(x509.DNSName) == ["xn--bcher-kva.example"]


def test_leaf_cache_is_bounded_lru(ca: CertificateAuthority) -> None:
    first = ca.leaf("a.test", None)
    assert ca.leaf("A.test.", None) is first
    for i in range(LEAF_CACHE_SIZE):
        ca.leaf(f"h{i}.test", None)
    assert ca.leaf("a.test", None) is not first
    assert ca.leaf("localhost", "127.0.0.1") != ca.leaf("localhost", None)


def _openssl_strict_flags() -> list[str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    help_text = subprocess.run(
        ["openssl", "verify", "-help"], capture_output=True, text=True, check=False
    )
    return ["-x509_strict"] if "x509_strict" in help_text.stdout + help_text.stderr else []


def _openssl_verify(flags: list[str], ca_path: Path, target: Path) -> None:
    result = subprocess.run(
        ["openssl", "verify", *flags, "-CAfile", ca_path, target],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and ": OK" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize(("hostname", "ip"), [("localhost", "127.0.0.1"), (None, "::1")])
def test_openssl_verify_strict(
    ca: CertificateAuthority, tmp_path: Path, hostname: str | None, ip: str
) -> None:
    flags = _openssl_strict_flags()
    leaf_pem = tmp_path / "leaf.pem"
    leaf_pem.write_bytes(_leaf_cert(ca.leaf(hostname, ip)[0]).public_bytes(Encoding.PEM))
    _openssl_verify(flags, ca.cert_path, ca.cert_path)
    _openssl_verify([*flags, "-purpose", "sslserver"], ca.cert_path, leaf_pem)
    name_check = ["-verify_hostname", hostname] if hostname else ["-verify_ip", ip]
    _openssl_verify([*flags, *name_check], ca.cert_path, leaf_pem)


# --- handshakes over trio --------------------------------------------------------------------


@pytest.fixture
def trusting_client(ca: CertificateAuthority) -> ssl.SSLContext:
    return client_context(cafile=str(ca.cert_path))


async def test_handshake_localhost(
    ca: CertificateAuthority, trusting_client: ssl.SSLContext
) -> None:
    server_ctx = server_context(ca, default_host=None, local_ip="127.0.0.1")
    client, server = await _handshake(server_ctx, trusting_client, "localhost")
    assert _san(_peer_cert(client)).get_values_for_type(x509.DNSName) == ["localhost"]
    assert client_sni(server) == "localhost"
    # Bytes cross the TLS leg both ways.
    await client.send_all(b"USER alice\r\n")
    assert await server.receive_some() == b"USER alice\r\n"


@pytest.mark.parametrize("default_host", [None, "mail.example.test"])
async def test_handshake_ip_without_sni(
    ca: CertificateAuthority, trusting_client: ssl.SSLContext, default_host: str | None
) -> None:
    # RFC 6066 §3: clients send no SNI for an IP literal, so the server falls back.
    server_ctx = server_context(ca, default_host=default_host, local_ip="127.0.0.1")
    client, server = await _handshake(server_ctx, trusting_client, "127.0.0.1")
    assert client_sni(server) is None
    san = _san(_peer_cert(client))
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert san.get_values_for_type(x509.DNSName) == ([default_host] if default_host else [])


async def test_sni_picks_matching_leaf_and_contexts_are_cached(
    ca: CertificateAuthority, trusting_client: ssl.SSLContext
) -> None:
    server_ctx = server_context(ca, default_host="default.example.test", local_ip="127.0.0.1")
    seen: dict[str, list[ssl.SSLContext]] = {}
    for name in ("pop.example.org", "other.example.net", "pop.example.org"):
        client, server = await _handshake(server_ctx, trusting_client, name)
        assert _san(_peer_cert(client)).get_values_for_type(x509.DNSName) == [name]
        assert client_sni(server) == name
        seen.setdefault(name, []).append(server.context)
    first, again = seen["pop.example.org"]
    assert first is again and first is not server_ctx


async def test_no_name_at_all_fails_cleanly(
    ca: CertificateAuthority, trusting_client: ssl.SSLContext
) -> None:
    server_ctx = server_context(ca, default_host=None, local_ip=None)
    insecure = client_context(insecure=True)
    _, server_error = await _failed_handshake(server_ctx, insecure, "127.0.0.1")
    assert isinstance(server_error, ssl.SSLError), server_error
    assert server_error.reason == "CALLBACK_FAILED", server_error  # our unrecognized_name


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_minimum_tls_version(ca: CertificateAuthority) -> None:
    server_ctx = server_context(ca, default_host="localhost", local_ip=None)
    old = client_context(insecure=True)
    # SECLEVEL=0 lets this OpenSSL still send a TLS 1.1 hello, which the server must refuse.
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    _, server_error = await _failed_handshake(server_ctx, old, "localhost")
    assert isinstance(server_error, ssl.SSLError)
    assert server_error.reason == "UNSUPPORTED_PROTOCOL", server_error
    assert server_ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client_context().minimum_version == ssl.TLSVersion.TLSv1_2


async def test_describe_tls_both_sides(
    ca: CertificateAuthority, trusting_client: ssl.SSLContext
) -> None:
    server_ctx = server_context(ca, default_host=None, local_ip="127.0.0.1")
    client, server = await _handshake(server_ctx, trusting_client, "pop.example.org")
    info = describe_tls(client)
    assert info.version in ("TLSv1.2", "TLSv1.3") and info.cipher
    assert info.sni == "pop.example.org"
    assert info.peer_subject == "CN=pop.example.org"
    der = client.getpeercert(binary_form=True)
    assert info.peer_fingerprint_sha256 == hashlib.sha256(der).hexdigest()
    assert info.alpn is None
    server_info = describe_tls(server)
    assert server_info.sni == "pop.example.org"
    assert server_info.peer_subject is None and server_info.peer_fingerprint_sha256 is None
    assert server_info.version == info.version and server_info.cipher == info.cipher


def _foreign_server() -> ssl.SSLContext:
    other = trustme.CA()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    other.issue_cert("localhost").configure_cert(ctx)
    return ctx


@pytest.mark.parametrize("cafile", [False, True])
async def test_client_context_verifies_by_default(ca: CertificateAuthority, cafile: bool) -> None:
    client_ctx = client_context(cafile=str(ca.cert_path) if cafile else None)
    client_error, _ = await _failed_handshake(_foreign_server(), client_ctx, "localhost")
    assert isinstance(client_error, ssl.SSLCertVerificationError)


async def test_client_context_checks_host_name(ca: CertificateAuthority) -> None:
    # Trusted CA, wrong name: the leaf is for the fallback, the client asked for an IP.
    server_ctx = server_context(ca, default_host="mail.example.test", local_ip=None)
    client_ctx = client_context(cafile=str(ca.cert_path))
    client_error, _ = await _failed_handshake(server_ctx, client_ctx, "127.0.0.1")
    assert isinstance(client_error, ssl.SSLCertVerificationError)
    assert "IP address mismatch" in str(client_error)


async def test_client_context_insecure_accepts_anything() -> None:
    client, _server = await _handshake(
        _foreign_server(), client_context(insecure=True), "not-the-name.example"
    )
    info = describe_tls(client)
    assert info.peer_fingerprint_sha256 and info.peer_subject is not None


@pytest.mark.parametrize("side", ["server", "client"])
async def test_sslkeylogfile_is_honoured(
    ca: CertificateAuthority, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: str
) -> None:
    keylog = tmp_path / "keys.log"
    monkeypatch.delenv("SSLKEYLOGFILE", raising=False)
    # Only one side is built with the variable set, to prove each honours it by itself.
    if side == "server":
        client_ctx = client_context(cafile=str(ca.cert_path))
        monkeypatch.setenv("SSLKEYLOGFILE", str(keylog))
        # A fresh name, so the logging must come from the context the SNI callback swaps in.
        server_ctx = server_context(ca, default_host=None, local_ip="127.0.0.1")
    else:
        server_ctx = server_context(ca, default_host=None, local_ip="127.0.0.1")
        monkeypatch.setenv("SSLKEYLOGFILE", str(keylog))
        client_ctx = client_context(cafile=str(ca.cert_path))
    await _handshake(server_ctx, client_ctx, "keylog.example.test")
    lines = keylog.read_text().splitlines()
    assert lines
    assert any(
        line.startswith(("CLIENT_RANDOM ", "CLIENT_TRAFFIC_SECRET_0 ", "SERVER_TRAFFIC_SECRET_0 "))
        for line in lines
    ), lines


def test_unusable_sni_falls_back_to_default_host(ca: CertificateAuthority) -> None:
    # Python's client cannot send such a name, so call the callback as OpenSSL would.
    server_ctx = server_context(ca, default_host="default.example.test", local_ip=None)
    callback = server_ctx.sni_callback
    assert callback is not None
    picked = []
    for name in ("a" * 64 + ".test", "default.example.test"):
        ssl_object = server_ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
        assert callback(ssl_object, name, server_ctx) is None
        picked.append(ssl_object.context)
    assert picked[0] is picked[1] and picked[0] is not server_ctx
