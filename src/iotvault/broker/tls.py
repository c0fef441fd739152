"""TLS contexts for MQTT: iotvault's clients verify the broker; the embedded broker serves TLS.

A client context always verifies the broker's certificate chain and host name (there is no
setting to turn that off): against ``broker_ca_file`` when it is set — a private CA such as the
one ``iotvault certs`` makes — else against the system's trusted CAs.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from iotvault.errors import ConfigError


def client_context(ca_file: str = "") -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=str(Path(ca_file).expanduser()) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("broker_ca_file", f"cannot load {ca_file}: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(Path(cert_file).expanduser()), str(Path(key_file).expanduser()))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("mqtt_tls_cert_file", f"cannot load the certificate and key: {exc}") from None
    return ctx
