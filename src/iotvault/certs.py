"""A private certificate authority and a server certificate, for testing and small deployments.

``iotvault certs DIR --host broker.example.com --host 10.0.0.5`` writes::

    DIR/ca.pem        the CA certificate: give it to devices and to iotvault (broker_ca_file)
    DIR/ca.key        the CA's private key (0600): keep it offline once the server has its cert
    DIR/server.pem    the server certificate, for Mosquitto's certfile or mqtt_tls_cert_file
    DIR/server.key    its private key (0600), for Mosquitto's keyfile or mqtt_tls_key_file

Keys are ECDSA P-256; the server certificate names every ``--host`` as a DNS name or IP address
(subjectAltName; clients check it) and is valid for ``serverAuth`` only. An existing CA in
``DIR`` is reused, so a renewed server certificate is trusted by devices that already hold
``ca.pem``; existing server files are only replaced with ``force``. For production, a
certificate from your organisation's CA or a public one serves the same purpose.
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

from iotvault.errors import ConfigError, ValidationError


@dataclass(frozen=True, slots=True)
class CertFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    ca_created: bool


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "iotvault"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(
    common_name: str = "iotvault private CA", days: int = 3650
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str], days: int = 397
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if not hosts:
        raise ValidationError("--host", "name at least one host name or IP address the server is reached at")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() for c in host) or "/" in host:
                raise ValidationError(
                    "--host", f"{host!r} is neither a host name nor an IP address"
                ) from None
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.chmod(mode)
    tmp.replace(path)


def write_certs(out_dir: Path, hosts: list[str], *, days: int = 397, force: bool = False) -> CertFiles:
    """Make (or reuse) the CA in ``out_dir`` and issue a server certificate for ``hosts``."""
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = CertFiles(
        out_dir / "ca.pem", out_dir / "ca.key", out_dir / "server.pem", out_dir / "server.key", False
    )
    if not force and (files.server_cert.exists() or files.server_key.exists()):
        raise ConfigError(
            "certs", f"{files.server_cert} exists; give --force to replace the server certificate"
        )
    if files.ca_cert.exists() and files.ca_key.exists():
        try:
            ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
            loaded = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError("certs", f"the CA in {out_dir} cannot be read: {exc}") from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ConfigError("certs", f"{files.ca_key} is not an EC key made by iotvault certs")
        ca_key = loaded
        created = False
    else:
        ca_key, ca_cert = make_ca()
        _write(files.ca_key, _key_pem(ca_key), 0o600)
        _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        created = True
    key, cert = make_server_cert(ca_key, ca_cert, hosts, days)
    _write(files.server_key, _key_pem(key), 0o600)
    _write(files.server_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return CertFiles(files.ca_cert, files.ca_key, files.server_cert, files.server_key, created)
