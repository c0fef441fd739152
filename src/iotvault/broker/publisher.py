"""iotvault's own MQTT connection for sending commands, as its service account.

Used where the broker is not inside this process: an external broker (Mosquitto), or the
embedded broker of another node (an ``--role api`` node). ``publish`` returns once the broker
has acknowledged the message (PUBACK, QoS 1), so "sent" means the broker holds it. The
connection is opened on first use and again after it is lost; a publish during an outage fails
at once (:class:`~iotvault.errors.BrokerUnavailableError`) rather than queueing a command nobody
will wait for.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from typing import Any

import gmqtt
from gmqtt.mqtt.constants import MQTTv311
from gmqtt.storage import PersistentStorage

from iotvault.adapters.gmqtt import NO_RECONNECT, check_version
from iotvault.broker.acl import SERVICE_CLIENT_PREFIX
from iotvault.broker.service_login import ServiceLogin
from iotvault.errors import BrokerUnavailableError

log = logging.getLogger(__name__)


class _Acks(PersistentStorage):  # type: ignore[misc]  # gmqtt ships no type information
    """gmqtt's in-flight store, used to learn when the broker acknowledged a message.

    Relies on when gmqtt calls it (:class:`iotvault.adapters.gmqtt.InflightStore`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.last_mid: int | None = None
        self._waiting: dict[int, asyncio.Future[None]] = {}

    def push_message(self, mid: int, raw_package: bytes) -> None:
        super().push_message(mid, raw_package)
        self.last_mid = mid

    def waiter(self, mid: int) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[mid] = fut
        return fut

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        fut = self._waiting.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def fail_all(self, exc: BaseException) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(exc)
        self._waiting.clear()

    def get_all(self) -> list[tuple[int, bytes]]:
        return []  # never replayed: a command not acknowledged is reported failed instead


class CommandPublisher(ServiceLogin):
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
        super().__init__(
            host, port, username=username, password=password, ssl_context=ssl_context, timeout_s=timeout_s
        )
        self._client: Any = None
        self._acks = _Acks()
        self._lock = asyncio.Lock()

    async def _connected(self) -> Any:
        if self._client is not None and self._client.is_connected:
            return self._client
        await self._drop()
        acks = _Acks()
        check_version()
        client = gmqtt.Client(
            f"{SERVICE_CLIENT_PREFIX}cmd:{secrets.token_hex(6)}",
            clean_session=True,
            persistent_storage=acks,
            logger=logging.getLogger("iotvault.broker.mqtt"),
        )
        client.set_config({"reconnect_retries": NO_RECONNECT})
        if self._username:
            client.set_auth_credentials(self._username, self._password)
        client.on_disconnect = lambda *_args: acks.fail_all(ConnectionError("connection to the broker lost"))
        try:
            async with asyncio.timeout(self._timeout_s):
                await client.connect(self._host, self._port, ssl=self._ssl or False, version=MQTTv311)
        except (OSError, TimeoutError, gmqtt.MQTTConnectError) as exc:
            raise BrokerUnavailableError(self.display, str(exc) or type(exc).__name__) from None
        self._client, self._acks = client, acks
        log.info("commands: connected to %s as %s", self.display, self._username)
        return client

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        async with self._lock:
            client = await self._connected()
            acks = self._acks
            client.publish(gmqtt.Message(topic, payload, qos=qos, retain=False))
            mid = acks.last_mid
            if qos == 0 or mid is None:
                return
            waiter = acks.waiter(mid)  # before any await: the PUBACK cannot come first
        try:
            async with asyncio.timeout(self._timeout_s):
                await waiter
        except (ConnectionError, TimeoutError) as exc:
            raise BrokerUnavailableError(self.display, f"no acknowledgement ({exc or 'timeout'})") from None

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            async with asyncio.timeout(2.0):
                await client.disconnect()
        except (OSError, TimeoutError):
            log.debug("commands: connection already gone")

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    async def __aenter__(self) -> CommandPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
