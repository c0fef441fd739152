"""A device's connection to iotvault, with commands: what a real device (or a gateway) runs.

:class:`DeviceClient` is a :class:`~iotvault.device.connection.DeviceConnection`
— one MQTT 3.1.1 connection with username = client id = deviceId, a will on the status topic,
at-least-once events that survive broker restarts — plus commands: it subscribes to its own
command topic, checks every command with the platform public key and its replay state, runs the
handler, and publishes the answer as a ``cmdack`` event (QoS 1, kept until acknowledged).
"""

from __future__ import annotations

from pathlib import Path
from ssl import SSLContext
from typing import Any

from iotvault.crypto.signing import CommandPublicKey
from iotvault.device.connection import DeviceConnection, DeviceCredential
from iotvault.device.processor import CommandProcessor, Handler
from iotvault.device.replay import ReplayGuard
from iotvault.device.verify import CommandVerifier


class DeviceClient(DeviceConnection):
    def __init__(
        self,
        credential: DeviceCredential,
        host: str,
        port: int,
        *,
        platform_key: CommandPublicKey,
        state_file: Path | None,
        on_command: Handler | None,
        ssl: SSLContext | None = None,
        max_clock_skew_s: float = 300.0,
        **options: Any,
    ) -> None:
        """``state_file`` keeps the replay state across restarts (None: in memory only, for
        tests); ``options`` are those of :class:`DeviceConnection` (keepalive, reconnect…)."""
        processor = CommandProcessor(
            CommandVerifier(
                platform_key,
                credential.device_id,
                type_id=credential.type_id,
                max_skew_s=max_clock_skew_s,
            ),
            ReplayGuard(state_file, credential.device_id),
            on_command,
        )
        super().__init__(credential, host, port, ssl=ssl, commands=processor, **options)
