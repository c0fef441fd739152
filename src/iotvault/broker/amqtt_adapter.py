"""Every touch of amqtt, in one place: what the embedded broker still takes from it, and how.

amqtt (pinned to ``0.12.*``; :func:`check_amqtt_version` refuses anything else at start with
a clear error) keeps the sessions, subscriptions, QoS 1/2 delivery to subscribers and the
will. iotvault's own code does the rest (``docs/design/embedded-broker.md``): the door
(accepting, limits, CONNECT, authentication), the framing and validation of every packet
(:mod:`iotvault.broker.framing`, :mod:`iotvault.broker.codec`), acknowledgement after storage,
keep-alive, presence and take-over. Each private internal used below has a contract test in
``tests/unit/test_amqtt_contract.py`` that fails loudly when an upgrade changes it:

1. ``Broker._handle_client_session(reader, writer, session, handler, server, listener_name)``
   — overridden: the one place, once per connection after CONNECT, where the connection's
   ``BrokerProtocolHandler`` exists and no PUBLISH has been read yet.
2. ``ProtocolHandler._handle_message_flow(app_message)`` — replaced on each handler
   instance: every incoming PUBLISH goes through it before amqtt queues and acknowledges it.
3. ``IncomingApplicationMessage`` fields (``topic``, ``data``, ``qos``, ``packet_id``,
   ``pubrec_packet``, ``publish_packet.retain_flag`` / ``dup_flag``), ``Session`` fields
   (``client_id``, ``username``, ``keep_alive``).
4. ``Session.keep_alive`` is amqtt's per-packet read timeout; set to 0 before the handler
   starts, and the framing keeps time instead (one timer per connection).
5. ``BrokerProtocolHandler.handle_connection_closed()`` resolves the handler's disconnect
   waiter. amqtt 0.12 has a race: when the stream ends while ``handler.start()`` runs (a client
   that sends CONNECT and closes at once), the reader loop resolves the *old* waiter and
   ``start()`` then makes a new one nobody resolves; the connection hangs. It is called again
   once the stream has ended, which is harmless when there is nothing left to resolve.
6. ``Broker.retain_message`` (overridden, to bound retained messages) and
   ``Broker._retained_messages`` (a cleared topic is removed; amqtt keeps an empty entry forever).

Everything else is amqtt's public surface: ``Broker(config)``, ``start``, ``shutdown``,
``external_connected``, ``internal_message_broadcast``, ``BrokerConfig``, ``ReaderAdapter``,
``WriterAdapter``, ``BaseAuthPlugin``, ``BaseTopicPlugin``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Final, Protocol

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BrokerConfig, ListenerConfig, ListenerType
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import IncomingApplicationMessage

from iotvault.errors import BrokerError

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from iotvault.broker.framing import GatheringWriter, PacketStream

__all__ = [
    "SUPPORTED_AMQTT",
    "AmqttCore",
    "Incoming",
    "Owner",
    "check_amqtt_version",
]

_log = logging.getLogger(__name__)

SUPPORTED_AMQTT: Final = "0.12."
_LISTENER: Final = "default"  # amqtt requires a listener of this name
QUIETED_LOGGERS: Final = ("amqtt", "transitions")  # transitions is amqtt's state machine


def check_amqtt_version(installed: str | None = None) -> str:
    """The installed amqtt's version; :class:`BrokerError` if it is not the one this adapter knows."""
    if installed is None:
        try:
            installed = version("amqtt")
        except PackageNotFoundError:
            raise BrokerError("the embedded broker needs amqtt, which is not installed") from None
    if not installed.startswith(SUPPORTED_AMQTT):
        raise BrokerError(
            f"the embedded broker supports amqtt {SUPPORTED_AMQTT}x, but {installed} is installed; "
            f"install iotvault's pinned requirements (requirements/runtime.txt)"
        )
    return installed


@dataclass(frozen=True, slots=True)
class Incoming:
    """What the embedded broker reads of an incoming PUBLISH (internal 3)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None


Flow = Callable[[Any], Awaitable[None]]  # amqtt's ProtocolHandler._handle_message_flow


class Owner(Protocol):
    """What the adapter calls back in :class:`iotvault.broker.embedded.EmbeddedBroker`."""

    async def on_incoming(  # noqa: PLR0917 -- one call per PUBLISH, everything it needs
        self,
        stream: PacketStream,
        client_id: str,
        username: str | None,
        message: Any,
        incoming: Incoming,
        flow: Flow,
    ) -> bool: ...

    def connection(
        self, client_id: str, username: str | None, stream: PacketStream
    ) -> AbstractAsyncContextManager[None]: ...

    async def may(self, client_id: str, username: str | None, topic: str, action: str) -> bool: ...

    def subscribed(self, topic_filter: str) -> None: ...

    def subscribe_denied(self, client_id: str, username: str | None, peer: str, topic: str) -> None: ...

    def may_retain(self, topic: str, size: int) -> bool: ...


class AmqttCore:
    """amqtt's broker, driven by iotvault: connections come in through :meth:`serve`."""

    def __init__(self, host: str, port: int, owner: Owner) -> None:
        check_amqtt_version()
        for name in QUIETED_LOGGERS:
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.WARNING)
        config = BrokerConfig(
            listeners={_LISTENER: ListenerConfig(type=ListenerType.EXTERNAL, bind=f"{host}:{port}")},
            # listing the plugins keeps amqtt from loading any from entry points or its defaults
            plugins={
                f"{__name__}.{_AdmittedPlugin.__name__}": {},
                f"{__name__}.{_TopicPolicyPlugin.__name__}": {"owner": owner},
            },
        )
        self._broker = _AmqttBroker(config, owner)

    async def start(self) -> None:
        await self._broker.start()

    async def shutdown(self) -> None:
        await self._broker.shutdown()

    async def serve(self, stream: PacketStream, writer: GatheringWriter) -> None:
        """Hand an admitted connection (its CONNECT served next) to amqtt until it ends."""
        await self._broker.external_connected(_Reader(stream), _Writer(writer), _LISTENER)

    async def broadcast(self, topic: str, payload: bytes, qos: int) -> None:
        await self._broker.internal_message_broadcast(topic, payload, qos)

    @property
    def retained_topics(self) -> set[str]:
        return set(self._broker._retained_messages)


class _Reader(ReaderAdapter):  # type: ignore[misc]  # amqtt ships no type information
    def __init__(self, stream: PacketStream) -> None:
        self.stream = stream

    async def read(self, n: int = -1) -> bytes:
        return await self.stream.read(n)

    def feed_eof(self) -> None:
        self.stream.abort()


class _Writer(WriterAdapter):  # type: ignore[misc]  # amqtt ships no type information
    def __init__(self, writer: GatheringWriter) -> None:
        self._writer = writer

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    def get_peer_info(self) -> tuple[str, int] | None:
        peer = self._writer.stream.get_extra_info("peername")
        return (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else ("-", 0)

    def get_ssl_info(self) -> Any:
        return self._writer.stream.get_extra_info("ssl_object")

    async def close(self) -> None:
        self._writer.close()


class _AmqttBroker(Broker):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's broker, with iotvault's hooks installed on each connection (internals 1, 5, 6)."""

    def __init__(self, config: Any, owner: Owner) -> None:
        super().__init__(config)
        self._owner = owner

    async def _handle_client_session(  # noqa: PLR0917 -- amqtt's signature, called positionally
        self, reader: Any, writer: Any, session: Any, handler: Any, server: Any, listener_name: str
    ) -> None:
        if not isinstance(reader, _Reader):  # every connection comes through the door
            raise TypeError(f"unexpected amqtt reader {type(reader).__name__}")
        stream = reader.stream
        _install(self._owner, handler, session, stream)
        stream.on_eof = lambda: _resolve_after_eof(handler, stream.task)
        async with self._owner.connection(session.client_id, session.username, stream):
            await super()._handle_client_session(reader, writer, session, handler, server, listener_name)

    async def retain_message(
        self, source_session: Any, topic_name: str | None, data: Any, qos: int | None = None
    ) -> None:
        if topic_name is not None and not self._owner.may_retain(topic_name, len(data or b"")):
            return  # delivered, not kept: over the limits (or retained messages are off)
        await super().retain_message(source_session, topic_name, data, qos)
        if not data and topic_name is not None:
            self._retained_messages.pop(topic_name, None)  # amqtt keeps an empty entry forever


def _resolve_after_eof(handler: Any, connection: asyncio.Future[Any] | None) -> None:
    """Internal 5: once the stream ended, make sure the handler's disconnect waiter is resolved."""

    async def resolve() -> None:
        for delay in (0.0, 0.05, 0.5, 2.0):
            await asyncio.sleep(delay)
            if connection is not None and connection.done():
                return
            with contextlib.suppress(Exception):
                await handler.handle_connection_closed()

    task = asyncio.ensure_future(resolve())
    _pending.add(task)
    task.add_done_callback(_pending.discard)


_pending: set[asyncio.Future[None]] = set()  # keeps the resolving tasks referenced


def _install(owner: Owner, handler: Any, session: Any, stream: PacketStream) -> None:
    """Internals 2-4: the publish checks and hook in front of amqtt's acknowledgement; keep time."""
    amqtt_flow: Flow = handler._handle_message_flow
    client_id: str = session.client_id
    username: str | None = session.username

    async def message_flow(message: Any) -> None:
        # Outgoing messages, and incoming QoS 2 ones amqtt already answered with PUBREC and now
        # replays after a reconnect, go straight through.
        if isinstance(message, IncomingApplicationMessage) and message.pubrec_packet is None:
            packet = message.publish_packet
            incoming = Incoming(
                topic=message.topic,
                payload=bytes(message.data),
                qos=int(message.qos),
                retain=bool(packet is not None and packet.retain_flag),
                dup=bool(packet is not None and packet.dup_flag),
                packet_id=message.packet_id,
            )
            if not await owner.on_incoming(stream, client_id, username, message, incoming, amqtt_flow):
                return  # refused (the connection is being dropped), or answered once stored
        await amqtt_flow(message)

    handler._handle_message_flow = message_flow
    stream.client_id = client_id
    # amqtt's read timeout wraps every packet read in asyncio.wait_for: a task and a timer per
    # packet. The stream keeps time instead; the spec allows 1.5 x keep-alive [MQTT-3.1.2-24].
    if session.keep_alive > 0:
        stream.watch_silence(session.keep_alive * 1.5)
    session.keep_alive = 0


class _AdmittedPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt wants one authentication plugin to say yes; admission already happened at the door."""

    async def authenticate(self, *, session: Any) -> bool:
        return True


class _TopicPolicyPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's topic-filtering hook: SUBSCRIBE (refused: SUBACK 0x80) and forwarding ("receive").

    PUBLISH was already decided, before the acknowledgement, by the embedded broker.
    """

    @dataclass
    class Config:
        owner: Any  # the EmbeddedBroker; typed Any because amqtt builds this with dacite

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Any = None
    ) -> bool:
        if action == Action.PUBLISH:
            return True
        if session is None or topic is None or action not in (Action.SUBSCRIBE, Action.RECEIVE):
            return False
        owner: Owner = self.context.config.owner
        verb = "subscribe" if action == Action.SUBSCRIBE else "receive"
        try:
            allowed = await owner.may(session.client_id, session.username, topic, verb)
        except Exception as exc:  # noqa: BLE001 -- fail closed
            _log.warning("MQTT client %r: %s check for %r failed (%s); refusing",
                         session.client_id, verb, topic, type(exc).__name__)  # fmt: skip
            _log.debug("authorization error details", exc_info=exc)
            return False
        if verb == "subscribe":
            if allowed:
                owner.subscribed(topic)  # before amqtt adds the subscription
            else:
                peer = f"{getattr(session, 'remote_address', '-')}:{getattr(session, 'remote_port', '-')}"
                owner.subscribe_denied(session.client_id, session.username, peer, topic)
        return bool(allowed)
