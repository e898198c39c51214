"""A local development certificate authority: the broker's server certificate and, optionally,
a client certificate per pump, so TLS is on in the local stack and in docker-compose from the
first run. Production brings its own CA; nothing here is for real patients' pumps.

Files in the CA directory: `ca.crt` / `ca.key` (the authority), `server.crt` / `server.key` (the
broker), and `clients/<name>.crt` / `.key`. Keys are written 0600. An existing CA is reused, so
certificates issued earlier stay valid; a server certificate is reissued when its host names
change or it is near expiry.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DEFAULT_HOSTS", "DevCA", "DevCAError", "ensure_ca"]

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1", "mosquitto")
"""Names the local stack's and compose's broker is reached by."""

CA_DAYS = 3650
LEAF_DAYS = 825
_RENEW_BEFORE = dt.timedelta(days=30)


class DevCAError(Exception):
    """The CA directory is unusable; the message says what to do."""


@dataclass(frozen=True)
class DevCA:
    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def ca_pem(self) -> str:
        return self.ca_cert.read_text()

    def issue_server(self, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> tuple[Path, Path]:
        """The broker's certificate for `hosts`, reissued only when they changed or it expires."""
        if self.server_cert.is_file() and self.server_key.is_file():
            cert = x509.load_pem_x509_certificate(self.server_cert.read_bytes())
            if _hosts_of(cert) == set(hosts) and _valid_for(cert, _RENEW_BEFORE):
                return self.server_cert, self.server_key
        _issue(self, hosts[0], self.server_cert, self.server_key, hosts=hosts, server=True)
        return self.server_cert, self.server_key

    def issue_client(self, name: str) -> tuple[Path, Path]:
        """A client certificate whose common name is `name` (a pump id); always a new one."""
        if not name or "/" in name or name.startswith("."):
            raise DevCAError(f"{name!r} cannot name a certificate file")
        out = self.directory / "clients"
        out.mkdir(exist_ok=True)
        cert, key = out / f"{name}.crt", out / f"{name}.key"
        _issue(self, name, cert, key, hosts=(), server=False)
        return cert, key


def ensure_ca(directory: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> DevCA:
    """The CA in `directory` (made if absent) with a current server certificate for `hosts`."""
    ca = DevCA(Path(directory))
    try:
        ca.directory.mkdir(parents=True, exist_ok=True)
        if ca.ca_cert.is_file() != ca.ca_key.is_file():
            raise DevCAError(
                f"{ca.directory} has only one of ca.crt and ca.key: remove the directory to "
                "make a new CA (certificates issued by the old one stop working)"
            )
        if not ca.ca_cert.is_file():
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pumpfleet development"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "pumpfleet development CA"),
                ]
            )
            now = _now()
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True,
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
                .add_extension(
                    x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
                )
                .sign(key, hashes.SHA256())
            )
            _write_key(ca.ca_key, key)
            ca.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        ca.issue_server(hosts)
    except OSError as exc:
        raise DevCAError(f"cannot write the development CA in {ca.directory}: {exc}") from None
    return ca


def _issue(
    ca: DevCA,
    common_name: str,
    cert_path: Path,
    key_path: Path,
    *,
    hosts: tuple[str, ...],
    server: bool,
) -> None:
    ca_key = serialization.load_pem_private_key(ca.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.ca_cert.read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise DevCAError(f"{ca.ca_key} is not this CA's key type: remove {ca.directory}")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _hosts_of(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    }


def _valid_for(cert: x509.Certificate, margin: dt.timedelta) -> bool:
    return cert.not_valid_after_utc - margin > _now()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
