"""Feeds the pipeline from an external broker (e.g. Mosquitto 2) and acknowledges after commit.

Why gmqtt: it is asyncio-native and, with ``optimistic_acknowledgement=False``, sends the
PUBACK for a QoS 1 message only when our (async) ``on_message`` returns, so "acknowledge after
commit" is simply "return after ``submit()``". Each message is handled in its own task, which
is what lets the pipeline batch them. In the design notes' measurements gmqtt acknowledged
clearly faster than paho-mqtt on the same machine. gmqtt honours manual acknowledgement
only with MQTT 5, so this subscriber speaks MQTT 5.

QoS 1 messages take a shorter road than ``on_message`` (BENCHMARKS.md has the profiles): the
handler of this one connection has its QoS 1 path replaced (:func:`iotvault.adapters.gmqtt.take_qos1`,
a private method of gmqtt 0.8 with a contract test), which queues the message with
:meth:`IngestPipeline.enqueue` and acknowledges when its future completes. That saves the
task gmqtt would create per message, and it gives us the packet id, which ``on_message`` does
not get and the dedupe rule needs. The PUBACKs of one batch — its futures complete together —
are collected and written to the connection (:func:`iotvault.adapters.gmqtt.write_raw`, also
gmqtt 0.8's internals) in one write at the next turn of the event loop, instead of one ``send()``
system call each, which was a large share of ingest's CPU (BENCHMARKS.md). A future that
fails or is cancelled is not acknowledged, as before. QoS 0 and 2 messages still go through ``on_message``.

The session is persistent (clean start off, long session expiry) and subscribed with QoS 1,
so messages that arrive while iotvault is down wait in the broker. A large receive maximum
lets the broker keep enough messages in flight to fill a batch.

Several ingest nodes share the load through an MQTT shared subscription
(``$share/<group>/iot-2/...``, ``ingest_share_group``): each has its own persistent session
(:mod:`iotvault.ingest.nodeid`), and the broker gives each message to one of them. The topic
of a delivered message carries no ``$share`` prefix, so nothing else changes.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import gmqtt
from gmqtt.mqtt.constants import MQTTv50

from iotvault.adapters.gmqtt import check_version, take_qos1, write_raw
from iotvault.config import BrokerAddress
from iotvault.domain.topics import EVENT_FILTER, STATUS_FILTER
from iotvault.errors import BrokerUnavailableError
from iotvault.ingest.pipeline import Inbound, IngestPipeline

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600
RECEIVE_MAXIMUM = 5000
# MQTT 5 PUBACK: type, remaining length 4, packet id, reason code 0 (success), no properties:
# the bytes gmqtt 0.8 itself sends
_PUBACK = struct.Struct("!BBHBB")


class _Acknowledger:
    """PUBACKs for QoS 1 messages once the pipeline has handled them, written in bulk."""

    def __init__(self, client: gmqtt.Client) -> None:
        self._client = client
        self._mids: list[int] = []
        self._flush_scheduled = False

    def done(self, mid: int, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return  # not stored: not acknowledged; the broker redelivers it to the session
        self._mids.append(mid)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        mids, self._mids = self._mids, []
        pack = _PUBACK.pack
        if not write_raw(self._client, b"".join([pack(0x40, 4, mid, 0, 0) for mid in mids])):
            log.debug("ingest: %d acknowledgements dropped: not connected", len(mids))


def tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class BrokerSubscriber:
    def __init__(
        self,
        broker: BrokerAddress,
        pipeline: IngestPipeline,
        *,
        client_id: str,
        share_group: str = "",
        ssl_context: ssl.SSLContext | None = None,
        on_connected: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._broker = broker
        self._pipeline = pipeline
        self._client_id = client_id
        prefix = f"$share/{share_group}/" if share_group else ""
        self._filters = [prefix + EVENT_FILTER, prefix + STATUS_FILTER]
        self._ssl = ssl_context if ssl_context is not None else (tls_context() if broker.tls else None)
        self._on_connected = on_connected
        check_version()
        self._client = gmqtt.Client(
            client_id,
            clean_session=False,
            optimistic_acknowledgement=False,
            session_expiry_interval=SESSION_EXPIRY_S,
            receive_maximum=RECEIVE_MAXIMUM,
            logger=logging.getLogger("iotvault.ingest.mqtt"),
        )
        self._acks = _Acknowledger(self._client)
        take_qos1(self._client, self._on_qos1)
        self._client.on_message = self._on_message
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.reconnect_retries = -1  # forever
        self._client.reconnect_delay = 2
        if broker.username:
            self._client.set_auth_credentials(broker.username, broker.password)
        self.connected = asyncio.Event()

    async def __aenter__(self) -> BrokerSubscriber:
        try:
            await self._client.connect(
                self._broker.host, self._broker.port, ssl=self._ssl or False, keepalive=30, version=MQTTv50
            )
        except (TimeoutError, OSError) as exc:
            raise BrokerUnavailableError(
                self._broker.display, exc.strerror or str(exc) or type(exc).__name__
            ) from None
        self._pipeline.attach_feed(f"broker {self._broker.display}", self.connected.is_set)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await asyncio.wait_for(self._client.disconnect(), timeout=5)
        except (OSError, TimeoutError):
            log.debug("ingest: broker connection already gone at shutdown")

    def _on_connect(self, client: gmqtt.Client, flags: int, rc: int, properties: dict[str, Any]) -> None:
        client.subscribe([gmqtt.Subscription(f, qos=1) for f in self._filters])
        log.info("ingest: connected to %s as %s", self._broker.display, self._client_id)

    def _on_subscribe(
        self, client: gmqtt.Client, mid: int, granted: tuple[int, ...], properties: Any
    ) -> None:
        """Ready only once the broker granted every subscription: a refused one (an ACL that
        does not allow ``$share/...``, say) would otherwise leave a connected node that ingests
        nothing, which readiness must say."""
        refused = [f for f, code in zip(self._filters, granted, strict=False) if code >= 0x80]
        if refused:
            log.error(
                "ingest: the broker %s refused the subscription to %s (reason codes %s); "
                "check the ingest account's ACL",
                self._broker.display,
                ", ".join(refused),
                ", ".join(f"0x{c:02x}" for c in granted),
            )
            return
        self.connected.set()
        if self._on_connected is not None:
            asyncio.ensure_future(self._on_connected())  # noqa: RUF006 - fire and forget notification

    def _on_disconnect(self, client: gmqtt.Client, packet: bytes, exc: BaseException | None = None) -> None:
        self.connected.clear()
        log.warning("ingest: disconnected from %s; reconnecting", self._broker.display)

    def _on_qos1(self, mid: int, payload: bytes, topic: str, properties: dict[str, Any]) -> None:
        msg = Inbound(
            topic=topic,
            payload=payload,
            qos=1,
            dup=bool(properties.get("dup", 0)),
            packet_id=mid,
            consumer=self._client_id,
        )
        self._pipeline.enqueue(msg).add_done_callback(partial(self._acks.done, mid))

    async def _on_message(
        self, client: gmqtt.Client, topic: str, payload: bytes, qos: int, properties: dict[str, Any]
    ) -> int:
        msg = Inbound(
            topic=topic,
            payload=payload,
            qos=qos,
            dup=bool(properties.get("dup", 0)),
            packet_id=None,  # QoS 0 (QoS 1 takes _on_qos1; iotvault subscribes with QoS 1 at most)
            consumer=self._client_id,
        )
        await self._pipeline.submit(msg)
        return 0  # PUBACK reason code "success", sent by gmqtt only now
