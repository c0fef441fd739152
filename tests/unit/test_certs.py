"""``iotvault certs``: a CA and a server certificate that TLS clients accept for the right names."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from iotvault.certs import write_certs
from iotvault.errors import ConfigError, ValidationError


def test_ca_and_server_certificate(tmp_path: Path) -> None:
    files = write_certs(tmp_path / "pki", ["broker.example", "127.0.0.1"])
    assert files.ca_created
    for key in (files.ca_key, files.server_key):
        assert key.stat().st_mode & 0o777 == 0o600
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # both load where they are used: a server context and a verifying client context
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    ssl.create_default_context(cafile=str(files.ca_cert))


def test_existing_ca_is_reused_and_server_files_are_not_replaced_silently(tmp_path: Path) -> None:
    first = write_certs(tmp_path, ["localhost"])
    ca_pem = first.ca_cert.read_bytes()
    with pytest.raises(ConfigError, match="--force"):
        write_certs(tmp_path, ["localhost"])
    second = write_certs(tmp_path, ["localhost", "::1"], force=True)
    assert not second.ca_created
    assert second.ca_cert.read_bytes() == ca_pem
    with pytest.raises(ValidationError):
        write_certs(tmp_path / "other", [])
    with pytest.raises(ValidationError):
        write_certs(tmp_path / "other2", ["bad host"])
