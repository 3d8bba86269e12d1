"""popproxy's own certificate authority: one CA on disk, short-lived leaf certificates in memory."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from popproxy import fsutil
from popproxy.errors import PopproxyError

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca-key.pem"
_LOCK_NAME = ".lock"

CA_COMMON_NAME = "popproxy CA"
CA_VALIDITY = datetime.timedelta(days=3650)
# Backdated so that a client whose clock runs a little slow still accepts a fresh cert.
CLOCK_SKEW = datetime.timedelta(days=1)
# CA/B BR §6.3.2: at most 398 days, counted notBefore..notAfter inclusive, hence the second.
LEAF_VALIDITY = datetime.timedelta(days=398) - datetime.timedelta(seconds=1)
LEAF_CACHE_SIZE = 256
# RFC 5280 Appendix A: ub-common-name is 64 characters.
_CN_MAX = 64

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class CAError(PopproxyError):
    """The CA folder or its files cannot be used; the message says what to do."""


def default_ca_dir() -> Path:
    """Where the CA lives: `$POPPROXY_CA_DIR` if set, else `~/.popproxy`."""
    env = os.environ.get("POPPROXY_CA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".popproxy"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256 rather than RSA: generating it takes ~0.1 ms, RSA-2048 16-50 ms on the trio thread.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_ca_cert(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "popproxy"),
        ]
    )
    now = _now()
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        # RFC 5280 §4.1.2.2 / CA/B BR §7.1: positive, at most 20 octets, 64+ random bits.
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        # RFC 5280 §4.2.1.9: critical in CA certs; pathlen 0 because it only signs leaves.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        # RFC 5280 §4.2.1.3: keyCertSign must be set for a key that signs certificates.
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # RFC 5280 §4.2.1.2: conforming CAs MUST include the SKI in their own certificate.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        # RFC 5280 §4.2.1.1 lets a self-signed cert omit the AKI; strict checkers want it anyway.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _split_name(hostname: str | None) -> tuple[str | None, _Address | None]:
    """Normalise a host name; an IP literal comes back as an address instead."""
    if hostname is None:
        return None, None
    name = hostname.strip().rstrip(".").lower()
    if not name:
        return None, None
    with contextlib.suppress(ValueError):
        return None, ipaddress.ip_address(name.strip("[]"))
    try:
        # Certificates carry A-labels (RFC 5280 §7.2); SNI names already are, a user's may not be.
        return name.encode("idna").decode("ascii"), None
    except UnicodeError as exc:
        raise ValueError(f"not a usable host name: {hostname!r}") from exc


@contextlib.contextmanager
def _locked(ca_dir: Path) -> Iterator[None]:
    fd = fsutil.open_lock(ca_dir / _LOCK_NAME)
    try:
        # flock serialises first use across processes; the kernel drops it if we die.
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_temp(folder: fsutil.Folder, name: str, data: bytes, mode: int) -> str:
    # Same folder as the target, so the rename that follows is atomic.
    fd, tmp = folder.temp(name, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the content must be on disk before the rename publishes it
    except BaseException:
        folder.discard(tmp)
        raise
    return tmp


class CertificateAuthority:
    """A CA key and certificate, and the leaf certificates minted from them."""

    def __init__(
        self, ca_dir: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> None:
        self.ca_dir = ca_dir
        self.cert = cert
        self._key = key
        self.cert_path = ca_dir / CA_CERT_NAME
        self.cert_pem: bytes = cert.public_bytes(serialization.Encoding.PEM)
        self._ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        self._leaves: OrderedDict[tuple[str | None, str | None], tuple[bytes, bytes]] = (
            OrderedDict()
        )
        # Leaves are minted on the trio thread, but a worker thread must not corrupt the LRU.
        self._lock = threading.Lock()

    @classmethod
    def load_or_create(cls, ca_dir: Path) -> CertificateAuthority:
        """Load the CA in `ca_dir`, creating folder and CA on first use; raises CAError."""
        try:
            return cls._load_or_create(ca_dir)
        except CAError:
            raise
        except OSError as exc:
            raise CAError(f"cannot use CA folder {ca_dir}: {exc.strerror or exc}") from exc

    @classmethod
    def _load_or_create(cls, ca_dir: Path) -> CertificateAuthority:
        if not ca_dir.is_dir():
            ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir's mode is filtered by the umask; the folder holds a private key.
            os.chmod(ca_dir, 0o700)
        cert_path, key_path = ca_dir / CA_CERT_NAME, ca_dir / CA_KEY_NAME
        # The cert is renamed into place last, so its presence means the key is complete too.
        if cert_path.exists():
            return cls._load(ca_dir)
        with _locked(ca_dir):
            # Another process may have created the CA while we waited for the lock.
            if cert_path.exists():
                return cls._load(ca_dir)
            if key_path.exists():
                # Never overwrite a key: clients may trust a CA made from it.
                raise CAError(
                    f"{key_path} exists but {cert_path} does not; restore {cert_path}, "
                    f"or delete {key_path} to create a new CA"
                )
            cls._create(ca_dir)
            return cls._load(ca_dir)

    @classmethod
    def _create(cls, ca_dir: Path) -> None:
        key = _new_key()
        cert = _make_ca_cert(key)
        with fsutil.Folder(ca_dir, make=False) as folder:
            key_tmp = _write_temp(folder, CA_KEY_NAME, _key_pem(key), fsutil.PRIVATE)
            cert_pem = cert.public_bytes(serialization.Encoding.PEM)
            cert_tmp = _write_temp(folder, CA_CERT_NAME, cert_pem, fsutil.PUBLIC)
            try:
                # Never replace what is there (a planted symlink included): refuse instead.
                folder.publish(key_tmp, CA_KEY_NAME)
                folder.publish(cert_tmp, CA_CERT_NAME)
                os.fsync(folder.fd)  # make the renames durable before anyone trusts the CA
            except fsutil.Exists as exc:
                raise CAError(f"{exc.filename} is in the way (not a CA file); remove it") from None
            finally:
                for tmp in (key_tmp, cert_tmp):
                    folder.discard(tmp)

    @classmethod
    def _load(cls, ca_dir: Path) -> CertificateAuthority:
        cert_path, key_path = ca_dir / CA_CERT_NAME, ca_dir / CA_KEY_NAME
        hint = f"; delete {ca_dir} to create a new CA (clients must then trust the new one)"
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError as exc:
            raise CAError(f"{cert_path} is not a PEM certificate ({exc}){hint}") from exc
        if not key_path.exists():
            raise CAError(f"{cert_path} exists but its key {key_path} is missing{hint}")
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            # TypeError: the key is password-protected, which popproxy does not support.
            raise CAError(f"{key_path} is not an unencrypted PEM key ({exc}){hint}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{key_path} is not an EC key{hint}")
        if cert.public_key() != key.public_key():
            raise CAError(f"{key_path} does not belong to {cert_path}{hint}")
        try:
            ca_flag = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except (x509.ExtensionNotFound, ValueError):
            ca_flag = False
        if not ca_flag:
            raise CAError(f"{cert_path} is not a CA certificate{hint}")
        if cert.not_valid_after_utc <= _now():
            raise CAError(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}{hint}")
        return cls(ca_dir, cert, key)

    def leaf(self, hostname: str | None, ip: str | None) -> tuple[bytes, bytes]:
        """Return (cert chain PEM, key PEM) of a leaf for `hostname` and/or `ip`; cached."""
        name, name_ip = _split_name(hostname)
        addr = ipaddress.ip_address(ip) if ip else None
        cache_key = (name or (str(name_ip) if name_ip else None), str(addr) if addr else None)
        with self._lock:
            cached = self._leaves.get(cache_key)
            if cached is not None:
                self._leaves.move_to_end(cache_key)
                return cached
        minted = self._mint(name, [a for a in (name_ip, addr) if a is not None])
        with self._lock:
            self._leaves[cache_key] = minted
            self._leaves.move_to_end(cache_key)
            while len(self._leaves) > LEAF_CACHE_SIZE:
                self._leaves.popitem(last=False)
        return minted

    def _mint(self, name: str | None, addrs: list[_Address]) -> tuple[bytes, bytes]:
        unique = list(dict.fromkeys(addrs))
        if name is None and not unique:
            raise ValueError("a leaf certificate needs a host name or an IP address")
        sans: list[x509.GeneralName] = []
        if name is not None:
            sans.append(x509.DNSName(name))
        # CA/B BR §7.1.4.2.1: an IP address goes in iPAddress, never in a dNSName.
        sans.extend(x509.IPAddress(a) for a in unique)
        cn = name if name is not None else str(unique[0])
        # CA/B BR §7.1.4.3: a CN must repeat a SAN entry, so drop (never cut) an over-long one.
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if len(cn) <= _CN_MAX else []
        )
        key = _new_key()
        now = _now()
        not_before = now - CLOCK_SKEW
        not_after = min(not_before + LEAF_VALIDITY, self.cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            # RFC 5280 §4.2.1.6: with an empty subject the SAN must be critical.
            .add_extension(x509.SubjectAlternativeName(sans), critical=not subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # RFC 5280 §4.2.1.3 / CA/B BR §7.1.2.7.11: an ECDSA TLS server key only signs.
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            # CA/B BR §7.1.2.7.10: serverAuth, and the extension is not critical.
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            # RFC 5280 §4.2.1.1: the AKI names the CA's key so verifiers can build the path.
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                critical=False,
            )
            # RFC 5280 §4.2.1.2: SHOULD be in end-entity certificates.
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem
        return chain, _key_pem(key)
