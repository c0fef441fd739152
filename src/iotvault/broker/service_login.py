"""How iotvault's own service account reaches an external broker (Mosquitto 2).

The dynamic-security admin client (:mod:`.dynsec`) and the command publisher (:mod:`.publisher`)
both log in as iotvault's service account; this is the one place that holds that address and
login, and says where they point without the password.
"""

from __future__ import annotations

import ssl


class ServiceLogin:
    """Host, port, iotvault's service credentials, TLS and the time a broker may take to answer."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str,
        password: str,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self._host = host
        self._port = port
        self._username = username
        self._password = password
        self._ssl = ssl_context
        self._timeout_s = timeout_s

    @property
    def display(self) -> str:
        """The broker's URL, never the credentials: for logs and errors."""
        return f"{'mqtts' if self._ssl else 'mqtt'}://{self._host}:{self._port}"
