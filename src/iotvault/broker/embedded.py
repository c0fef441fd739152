"""The MQTT broker that runs inside iotvault (``IOTVAULT_BROKER_URL=embedded``), on amqtt 0.12.

What it adds to amqtt
=====================

**Acknowledged means stored.** amqtt acknowledges an incoming QoS 1 PUBLISH as soon as it has
queued the message in memory. Here ``on_publish`` — iotvault's hook, which stores the event
and commits it — must have completed *before* the broker sends the PUBACK (QoS 1) or PUBREC
(QoS 2), and before the message is forwarded to subscribers. If the hook fails, nothing is
acknowledged: the connection is dropped, one warning is logged (never the payload), and the
device sends the message again when it reconnects. So a crash of iotvault never loses an
acknowledged event.

- Redelivery needs a persistent session: MQTT 3.1.1 makes a client resend unacknowledged
  messages only when it reconnects with clean session 0 [MQTT-4.4.0-1] (gmqtt, for one, drops
  them unless the CONNACK says "session present").
- The hook may see one message twice (stored, then the PUBACK was lost), so it must be
  idempotent. Do not rely on ``dup``: gmqtt 0.8, for one, resends without setting it.
- amqtt handles each PUBLISH in its own task, so hooks for one client run concurrently (good
  for batching) and may finish, and be acknowledged, out of order.
- The hook may return an ``asyncio.Future``, which is used as it is (iotvault's returns the
  ingest pipeline's, so no task is made per message); a coroutine runs as a task.
- The hook runs to completion even if the device disconnects meanwhile: for QoS 0 and 1
  nothing awaits it (its completion sends the PUBACK), and for QoS 2 and retained messages
  the task that waits for it is shielded from it. ``__aexit__`` waits up to 10 seconds for
  running hooks.
- QoS 0 messages go through the hook too; there is nothing to withhold, but a failing hook
  still drops the connection.

**The path of a PUBLISH, cheaply.** amqtt's task for the packet checks the topic, starts the
hook and, for QoS 0 and 1, ends there. The hook's completion answers the message: if it is not
retained and no subscription can match its topic (:class:`_FilterIndex`: the filters granted
since the start), the broker writes the PUBACK itself — all amqtt would do for it besides
queueing it for a delivery loop (four futures per message) and broadcast tasks that find no
subscriber; otherwise amqtt's own flow delivers and acknowledges it. On iotvault's topics
devices subscribe to their commands only, so events and status messages take the short way.
What one turn of the event loop writes to a connection (the PUBACKs of a committed batch) goes
out in one ``send()``; the socket is read in chunks from which amqtt's many small reads are
cut; and a client's keep-alive is kept by one timer per connection, not one per packet.

**Admission at the door.** The broker accepts TCP connections itself, reads the CONNECT
packet, and asks ``authenticate`` (and ``authorize`` for the will topic) before amqtt sees
the connection. amqtt 0.12 authenticates late: by then it has already deleted the client id's
old session (clean session) or copied the new credentials and will into it, and it would take
over — disconnect — a connected device of the same client id even when the newcomer then
fails authentication. Here a refused client gets CONNACK 5 (not authorized) and touches no
state. A CONNECT that does not arrive within ``CONNECT_TIMEOUT`` seconds closes the connection.

**Topic rules.** ``authorize(client_id, username, topic, action)`` decides ``"publish"`` (before
the hook, so a refused message is never stored), ``"subscribe"`` (the SUBACK says 0x80) and
``"receive"`` (per subscriber, for every message forwarded). MQTT 3.1.1 cannot tell a client
that a PUBLISH was refused; the broker closes the connection [MQTT-3.3.5-2] rather than
acknowledge and discard, so nothing is acknowledged that was not stored. Topics with
wildcards, a leading ``$`` or a NUL character are refused the same way. Will messages are
published by amqtt itself when a client vanishes; they do not reach ``on_publish``, which is
why their topic is authorized at admission.

**Packet size.** amqtt 0.12 has no limit of its own (it would read a 256 MB packet into
memory). The reader given to amqtt follows the MQTT framing and ends the connection as soon as
a fixed header announces a packet larger than ``max_packet_size`` bytes, before the body is
read. (MQTT 3.1.1 has no way to say why.) The ingest pipeline has its own, smaller, limit on
event payloads.

**One connection per client id.** When a client id connects again while its previous
connection is still open (a device that lost its network reconnects before the broker noticed),
the broker closes the previous connection and waits for amqtt to finish it *before* amqtt sees
the new one [MQTT-3.1.4-2]. amqtt 0.12 would not close it at all with a clean session, and with
a persistent session its own take-over lets the old connection's ending mark the shared session
disconnected after the new connection started, so messages for the device were queued instead of
delivered.

**Presence.** ``on_connection(client_id, username, connected)`` is called when a client id
goes from no connection to one (``True``) and back (``False``), whether it disconnected, was
dropped, or was silent for 1.5 times its keep-alive (amqtt 0.12 never drops silent clients;
this module does, [MQTT-3.1.2-24]). A reconnection that replaces a connection is not reported.
Calls are serialised, so they arrive in order.

**Refusals, throttling, TLS.** Every refused login, will topic, PUBLISH and SUBSCRIBE is told to
``on_denied`` (a :class:`Denial` with the client's address). With a ``throttle``
(:class:`iotvault.broker.throttle.LoginThrottle`) the door counts failed logins per address and
client id and refuses, without calling ``authenticate``, while one is over its limit.
:meth:`EmbeddedBroker.disconnect` ends a client's connections (a revoked device). ``ssl`` makes
the listener speak TLS.

**Quiet, explicit amqtt.** The ``amqtt`` and ``transitions`` loggers are set to WARNING unless
someone configured them; amqtt's plugins are listed explicitly, so nothing is loaded from entry
points (no ``$SYS`` topics, no anonymous-auth plugin).

Known limits: amqtt keeps sessions, retained messages and messages queued for offline
subscribers in memory only, so a restart loses them (events are safe — they were stored before
they were acknowledged — but a command queued for an offline device is lost). Nothing bounds how
many PUBLISHes one client has in flight (MQTT 3.1.1 has no receive maximum). amqtt forwards to
subscribers from a single queue that falls behind during bursts; forwarding is not on the
acknowledgement path, and what is still queued at shutdown is dropped (amqtt logs "messages not
broadcasted"). iotvault's own :meth:`EmbeddedBroker.publish` delivers at the QoS it is given, even
to a subscriber that was granted less.

amqtt internals relied on
=========================

amqtt is pinned to ``0.12.*`` because of these; check each one on an upgrade (the integration
tests in ``tests/integration/test_embedded_broker.py`` exercise all of them):

1. ``Broker._handle_client_session(reader, writer, session, handler, server, listener_name)`` —
   overridden. amqtt calls it once per connection, after CONNECT, with that connection's
   ``BrokerProtocolHandler``: the one place where the handler exists and no PUBLISH has been
   read yet. The override installs the hooks below, ends a previous connection of the same
   client id, and reports presence around ``super()``.
2. ``ProtocolHandler._handle_message_flow(app_message)`` — replaced on each handler *instance*.
   Every incoming PUBLISH goes through it (from ``handle_publish``, one task per packet), and
   it is what queues the message for delivery and then sends PUBACK
   (``_handle_qos1_message_flow``) or PUBREC (``_handle_qos2_message_flow``). The wrapper runs
   the topic checks and the hook first. For an incoming QoS 0 or 1 message that is not
   retained and that no granted subscription can match, the flow is not called at all and the
   broker writes the PUBACK itself, on the same writer. That relies on amqtt forwarding only to
   subscriptions whose filter matches the topic, and adding subscriptions only in
   ``Broker.add_subscription``, after asking the topic plugin (``Action.SUBSCRIBE``), which
   notes the filter. Incoming QoS 2 messages that amqtt replays from ``session.inflight_in``
   after a reconnect already have ``pubrec_packet`` set and are not hooked twice.
3. ``IncomingApplicationMessage`` (``topic``, ``data``, ``qos``, ``retain``, ``packet_id``,
   ``pubrec_packet``, ``publish_packet.dup_flag``) and ``Session`` (``client_id``,
   ``username``, ``keep_alive``).
4. ``Session.keep_alive`` is amqtt's read timeout: ``ProtocolHandler.attach`` and the start of
   its reader loop read it, and the loop wraps every packet read in ``asyncio.wait_for`` with
   it (a task and a timer per packet), then calls ``handle_read_timeout()``, a no-op in amqtt
   0.12. It is set to 0 before amqtt attaches the handler, and the reader drops a connection
   that is silent for 1.5 times the client's keep-alive itself.
5. How amqtt ends a connection when its reader sees end-of-stream: the reader loop stops,
   the client loop publishes the will, stops the handler and ends the session. To drop a
   connection (and at shutdown) the broker aborts the TCP transport and lets amqtt take that
   path. It does not use amqtt's own ``handle_connection_closed()`` + ``stop()``: ``stop()``
   cancels the reader task and waits for it, and on Python 3.11 ``asyncio.wait_for`` loses
   a cancellation that coincides with an arriving packet, after which ``stop()`` waits
   forever (seen in these tests at shutdown).

Everything else is amqtt's public surface: ``Broker(config)``, ``start``, ``shutdown``,
``external_connected`` with a listener of type ``external``, ``internal_message_broadcast``,
``BrokerConfig.plugins`` with ``BaseAuthPlugin`` and ``BaseTopicPlugin``, ``ConnectPacket``,
``ConnackPacket``, ``ReaderAdapter`` and ``StreamWriterAdapter`` (subclassed: its
``is_closed`` flag and ``close()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.packet import CONNECT, MQTTFixedHeader
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import IncomingApplicationMessage

from iotvault.errors import PortInUseError

if TYPE_CHECKING:
    from ssl import SSLContext
    from types import TracebackType

    from iotvault.broker.throttle import LoginThrottle

__all__ = [
    "CONNECT_TIMEOUT",
    "Authenticator",
    "ConnectionHook",
    "Denial",
    "DenialHook",
    "EmbeddedBroker",
    "InboundPublish",
    "PublishHook",
    "TopicAction",
    "TopicAuthorizer",
]

_log = logging.getLogger(__name__)

CONNECT_TIMEOUT: Final = 10.0
"""Seconds a new connection has to send its CONNECT packet."""

_SHUTDOWN_GRACE: Final = 10.0  # seconds __aexit__ waits for running hooks and connections
_TAKE_OVER_GRACE: Final = 5.0  # seconds a new connection waits for its predecessor to end
_LISTENER: Final = "default"  # amqtt requires a listener of this name
_PORT_SETTING: Final = "IOTVAULT_MQTT_PORT"
_QUIETED_LOGGERS: Final = ("amqtt", "transitions")  # transitions is amqtt's state machine
_FLUSH_AT: Final = 64 * 1024  # bytes a connection's writer gathers before it writes at once
_READ_CHUNK: Final = 64 * 1024  # bytes a connection's reader asks the stream for at once
_MAX_FILTER_KEYS: Final = 250_000  # see _FilterIndex
_PUBACK: Final = struct.Struct("!BBH")  # packet type 4, remaining length 2, packet id

_Flow = Callable[[Any], Awaitable[None]]  # amqtt's ProtocolHandler._handle_message_flow


@dataclass(frozen=True, slots=True)
class InboundPublish:
    """A PUBLISH a client sent, as handed to the publish hook before it is acknowledged."""

    client_id: str
    username: str | None
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None


TopicAction = Literal["publish", "subscribe", "receive"]

PublishHook = Callable[[InboundPublish], Awaitable[object]]
"""Stores the message; its awaitable completes once it is committed (the result is ignored).

Raising, or an awaitable that fails, withholds the acknowledgement. An ``asyncio.Future`` is
used as it is (iotvault's hook returns the ingest pipeline's); anything else (a coroutine)
runs as a task.
"""

Authenticator = Callable[[str, str | None, str | None], Awaitable[bool]]
"""``(client_id, username, password) -> allowed``."""

TopicAuthorizer = Callable[[str, str | None, str, TopicAction], Awaitable[bool]]
"""``(client_id, username, topic or filter, action) -> allowed``."""

ConnectionHook = Callable[[str, str | None, bool], Awaitable[None]]
"""``(client_id, username, connected)``."""


@dataclass(frozen=True, slots=True)
class Denial:
    """Something the broker refused: a login, a PUBLISH or a SUBSCRIBE."""

    action: Literal["connect", "publish", "subscribe"]
    client_id: str
    username: str | None
    peer: str  # host:port of the client, or "-" when amqtt does not say
    reason: str  # "bad credentials", "throttled", "will topic", "not allowed"
    topic: str | None = None


DenialHook = Callable[[Denial], None]
"""Told of every refusal; must return at once (it runs on the broker's path)."""


class EmbeddedBroker:
    """An MQTT 3.1.1 broker inside the process; ``async with`` starts and stops it.

    ``authenticate=None`` admits everyone and ``authorize=None`` allows every topic: the
    development defaults until device credentials are plugged in.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        on_publish: PublishHook | None = None,
        authenticate: Authenticator | None = None,
        authorize: TopicAuthorizer | None = None,
        on_connection: ConnectionHook | None = None,
        max_packet_size: int = 256 * 1024,
        on_denied: DenialHook | None = None,
        throttle: LoginThrottle | None = None,
        ssl: SSLContext | None = None,
    ) -> None:
        if max_packet_size < 2:
            raise ValueError(f"max_packet_size must be at least 2 bytes, not {max_packet_size}")
        self._host = host
        self._port = port
        self._on_publish = on_publish
        self._authenticate = authenticate
        self._authorize = authorize
        self._on_connection = on_connection
        self._max_packet_size = max_packet_size
        self._amqtt: _AmqttBroker | None = None
        self._server: asyncio.Server | None = None
        # open connections (their tasks and readers) and running publish hooks, for shutdown
        self._connections: set[asyncio.Future[Any]] = set()
        self._readers: set[_FramedReader] = set()
        self._by_client: dict[str, set[_FramedReader]] = {}  # connections inside amqtt
        self._hooks: set[asyncio.Future[Any]] = set()  # and the forwarding tasks they start
        self._subscribed = _FilterIndex()
        self._online: dict[str, int] = {}
        self._presence_lock = asyncio.Lock()
        self._on_denied = on_denied
        self._throttle = throttle
        self._ssl = ssl

    @property
    def port(self) -> int:
        """The port the broker listens on (the one the system chose, when asked for port 0)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def __aenter__(self) -> EmbeddedBroker:
        for name in _QUIETED_LOGGERS:
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.WARNING)
        self._amqtt = _AmqttBroker(self._amqtt_config(), self)
        await self._amqtt.start()
        try:
            self._server = await asyncio.start_server(
                self._serve_connection, self._host, self._port, ssl=self._ssl
            )
        except OSError as exc:
            await self._amqtt.shutdown()
            self._amqtt = None
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(self._host, self._port, _PORT_SETTING) from None
            raise
        _log.info("embedded MQTT broker listening on %s:%d", self._host, self.port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server, amqtt = self._server, self._amqtt
        self._server = self._amqtt = None
        if server is not None:
            server.close()  # stop accepting
        for reader in list(self._readers):
            reader.abort()  # amqtt ends each session as if the client had gone
        await _settle(self._connections, self._hooks)
        if amqtt is not None:
            await amqtt.shutdown()
        if server is not None:
            await server.wait_closed()

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Send a message of iotvault's own (a command) to the clients subscribed to ``topic``.

        Returns once the message is queued for delivery, not once subscribers acknowledged it.
        """
        if self._amqtt is None:
            raise RuntimeError("the embedded broker is not running; use it inside `async with`")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos}")
        if _topic_problem(topic):
            raise ValueError(f"cannot publish to {topic!r}: {_topic_problem(topic)}")
        await self._amqtt.internal_message_broadcast(topic, bytes(payload), qos)

    # -- amqtt configuration ------------------------------------------------------------------

    def _amqtt_config(self) -> Any:
        # An `external` listener: we accept the TCP connections (admission, packet size, port
        # errors) and hand them to amqtt with `external_connected`. Listing the plugins keeps
        # amqtt from loading any from entry points or from its defaults.
        return BrokerConfig(
            listeners={
                _LISTENER: ListenerConfig(type=ListenerType.EXTERNAL, bind=f"{self._host}:{self._port}")
            },
            plugins={
                f"{__name__}.{_AdmittedPlugin.__name__}": {},
                f"{__name__}.{_TopicPolicyPlugin.__name__}": {"broker": self},
            },
        )

    # -- the door: CONNECT and admission ------------------------------------------------------

    async def _serve_connection(
        self, stream_reader: asyncio.StreamReader, stream_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        peer = stream_writer.get_extra_info("peername")
        writer = _BufferedWriter(stream_writer)
        reader = _FramedReader(stream_reader, writer, self._max_packet_size, peer)
        reader.task = task
        self._readers.add(reader)
        try:
            await self._admit_and_serve(reader, writer, peer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- one bad connection must not reach asyncio's handler
            _log.warning("MQTT connection from %s ended on an error: %s", _addr(peer), type(exc).__name__)
            _log.debug("MQTT connection error details", exc_info=exc)
        finally:
            reader.stop_watching()
            with contextlib.suppress(OSError, RuntimeError):
                await writer.close()
            self._readers.discard(reader)
            if task is not None:
                self._connections.discard(task)

    async def _admit_and_serve(self, reader: _FramedReader, writer: Any, peer: object) -> None:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                header = await MQTTFixedHeader.from_stream(reader)
                if header is None or header.packet_type != CONNECT:
                    _log.info("MQTT connection from %s did not start with CONNECT", _addr(peer))
                    return
                connect = await ConnectPacket.from_stream(reader, fixed_header=header)
        except TimeoutError:
            _log.info("MQTT connection from %s sent no CONNECT in %ss", _addr(peer), CONNECT_TIMEOUT)
            return
        except NoDataError:
            _log.info("MQTT connection from %s closed during CONNECT", _addr(peer))
            return
        # Protocol errors (wrong name or level, ...) are amqtt's to answer, with the right code.
        if connect.proto_name == "MQTT" and connect.proto_level == 4 and not await self._admit(connect, peer):
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            return
        reader.replay_connect()
        amqtt = self._amqtt
        if amqtt is not None:
            await amqtt.external_connected(reader, writer, _LISTENER)

    async def _admit(self, connect: Any, peer: object) -> bool:
        client_id: str = connect.client_id
        username: str | None = connect.username
        address = _host(peer)

        def refuse(reason: str, topic: str | None = None) -> bool:
            self._denied(Denial("connect", client_id, username, _addr(peer), reason, topic))
            return False

        throttle = self._throttle
        if throttle is not None and (wait := throttle.blocked(address, client_id)) is not None:
            _log.info(
                "MQTT client %r from %s refused: too many failed logins (%.0fs)", client_id, address, wait
            )
            return refuse("throttled")
        try:
            if self._authenticate is not None and not await self._authenticate(
                client_id, username, connect.password
            ):
                _log.info("MQTT client %r from %s refused: authentication failed", client_id, address)
                if throttle is not None:
                    throttle.failed(address, client_id)
                return refuse("bad credentials")
            will_topic: str | None = connect.will_topic if connect.will_flag else None
            if will_topic is not None and not await self._may(client_id, username, will_topic, "publish"):
                _log.warning("MQTT client %r refused: will topic %r is not allowed", client_id, will_topic)
                return refuse("will topic", will_topic)
        except Exception as exc:  # noqa: BLE001 -- fail closed, and say so
            _log.warning("MQTT client %r refused: admission check failed (%s)", client_id, type(exc).__name__)
            _log.debug("admission check error details", exc_info=exc)
            return refuse("admission check failed")
        if throttle is not None:
            throttle.succeeded(address, client_id)
        return True

    def _denied(self, denial: Denial) -> None:
        if self._on_denied is None:
            return
        try:
            self._on_denied(denial)
        except Exception as exc:  # noqa: BLE001 -- reporting must never break the broker
            _log.warning("denial hook failed (%s)", type(exc).__name__)
            _log.debug("denial hook error details", exc_info=exc)

    def disconnect(self, client_id: str) -> int:
        """End every connection of ``client_id`` now (its will is published); return how many.

        For a device whose credential was revoked or deleted while it was connected.
        """
        readers = list(self._by_client.get(client_id, ()))
        for reader in readers:
            reader.abort()
        return len(readers)

    async def _may(self, client_id: str, username: str | None, topic: str, action: TopicAction) -> bool:
        if action != "subscribe" and _topic_problem(topic):
            return False
        if self._authorize is None:
            return True
        return await self._authorize(client_id, username, topic, action)

    # -- per connection, inside amqtt ---------------------------------------------------------

    def _install(self, handler: Any, session: Any, reader: _FramedReader) -> None:
        """Put the publish checks and the hook in front of amqtt's acknowledgement; keep time."""
        amqtt_flow = handler._handle_message_flow

        async def message_flow(message: Any) -> None:
            # Outgoing messages, and incoming QoS 2 ones amqtt already answered with PUBREC and
            # now replays after a reconnect, go straight through.
            if (
                isinstance(message, IncomingApplicationMessage)
                and message.pubrec_packet is None
                and not await self._accept(reader, session, message, amqtt_flow)
            ):
                return  # refused (the connection is being dropped), or answered once stored
            await amqtt_flow(message)

        handler._handle_message_flow = message_flow
        # amqtt's read timeout (Session.keep_alive) wraps every packet read in asyncio.wait_for:
        # a task and a timer per packet. The reader keeps time instead, and amqtt, told 0, reads
        # without one. The spec allows 1.5 x keep-alive before the connection must end.
        if session.keep_alive > 0:
            reader.watch_silence(session.keep_alive * 1.5, session.client_id)
        session.keep_alive = 0

    async def _accept(self, reader: _FramedReader, session: Any, message: Any, amqtt_flow: _Flow) -> bool:
        """Check an incoming PUBLISH and hand it to the hook; True if amqtt's flow is to run now.

        False: refused (the connection is being dropped), or left to :meth:`_stored`, which
        answers it once the hook has completed.
        """
        client_id: str = session.client_id
        username: str | None = session.username
        topic: str = message.topic
        try:
            allowed = await self._may(client_id, username, topic, "publish")
        except Exception as exc:  # noqa: BLE001 -- fail closed: no ack, the device retries
            _log.debug("authorization error details", exc_info=exc)
            return self._drop(reader, client_id, f"authorization failed ({type(exc).__name__})", topic)
        if not allowed:
            self._denied(Denial("publish", client_id, username, _addr(reader.peer), "not allowed", topic))
            return self._drop(reader, client_id, "publish not allowed", topic)
        if self._on_publish is None:
            return True
        publish_packet = message.publish_packet
        inbound = InboundPublish(
            client_id=client_id,
            username=username,
            topic=topic,
            payload=bytes(message.data),
            qos=int(message.qos),
            retain=bool(message.retain),
            dup=bool(publish_packet is not None and publish_packet.dup_flag),
            packet_id=message.packet_id,
        )
        try:
            running = self._on_publish(inbound)
            # iotvault's hook hands over the ingest pipeline's own future; a coroutine gets a task
            hook = running if isinstance(running, asyncio.Future) else asyncio.ensure_future(running)
        except Exception as exc:  # noqa: BLE001 -- any failure means "not stored": do not ack
            _log.debug("publish hook error details", exc_info=exc)
            return self._drop(reader, client_id, f"publish hook failed ({type(exc).__name__})", topic)
        self._hooks.add(hook)
        if message.qos == QOS_2 or message.retain:
            return await self._wait_for_hook(reader, client_id, topic, hook)
        # QoS 0 and 1: nothing waits for the hook. Its completion answers the message
        # (_stored), so this task ends here, and since nothing awaits the hook, nothing can
        # cancel it: it runs to completion even if the device disconnects meanwhile.
        hook.add_done_callback(functools.partial(self._stored, reader, client_id, message, amqtt_flow))
        return False

    async def _wait_for_hook(
        self, reader: _FramedReader, client_id: str, topic: str, hook: asyncio.Future[Any]
    ) -> bool:
        """For amqtt's own flow (PUBREC and PUBREL, or keeping a retained message) after the hook.

        The flow runs in this task once the hook is done; the shield keeps a dropped
        connection's cancellation of this task from reaching the hook.
        """
        hook.add_done_callback(self._hooks.discard)
        try:
            await asyncio.shield(hook)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any failure means "not stored": do not ack
            _log.debug("publish hook error details", exc_info=exc)
            return self._drop(reader, client_id, f"publish hook failed ({type(exc).__name__})", topic)
        return True

    def _stored(
        self,
        reader: _FramedReader,
        client_id: str,
        message: Any,
        amqtt_flow: _Flow,
        hook: asyncio.Future[Any],
    ) -> None:
        """The hook of a QoS 0 or 1 PUBLISH is done: acknowledge, forward, or drop the connection."""
        self._hooks.discard(hook)
        if hook.cancelled():
            failure = "publish hook cancelled"
        elif (exc := hook.exception()) is not None:
            _log.debug("publish hook error details", exc_info=exc)
            failure = f"publish hook failed ({type(exc).__name__})"
        elif reader.closed:
            return  # the device went meanwhile: stored, not acknowledged, so it sends it again
        elif self._subscribed.may_match(message.topic):
            # Someone may receive it: amqtt's flow queues it for its subscribers and then
            # acknowledges it, in a task as amqtt's own handling would be. Decided now, not
            # before the hook, so that a subscription made meanwhile still gets the message.
            forward = asyncio.ensure_future(_forward(amqtt_flow, message))
            self._hooks.add(forward)
            forward.add_done_callback(self._hooks.discard)
            return
        else:
            # What amqtt's flow would do for a message nobody receives, without its queue,
            # delivery loop and broadcast tasks: a PUBACK (QoS 1) or nothing (QoS 0).
            if message.qos == QOS_1:
                reader.send(_PUBACK.pack(0x40, 2, message.packet_id))
            return
        if reader.closed:
            _log.debug("MQTT client %r: %s after the connection ended", client_id, failure)
            return
        self._drop(reader, client_id, failure, message.topic)

    def _drop(self, reader: _FramedReader, client_id: str, reason: str, topic: str) -> bool:
        _log.warning(
            "MQTT client %r: %s on topic %r; dropping the connection without acknowledging",
            client_id,
            reason,
            topic,
        )
        reader.abort()
        return False

    @contextlib.asynccontextmanager
    async def _connection(
        self, client_id: str, username: str | None, reader: _FramedReader
    ) -> AsyncIterator[None]:
        """Presence and registration of one connection that amqtt serves; ends its predecessor."""
        await self._count_connection(client_id, username, +1)  # first, so a take-over does not flap
        try:
            live = self._by_client.setdefault(client_id, set())
            ending = [old.task for old in live if old.task is not None]
            for old in live:
                _log.info("MQTT client %r connected again; closing its previous connection", client_id)
                old.abort()
            live.add(reader)
            if ending:
                await asyncio.wait(ending, timeout=_TAKE_OVER_GRACE)
            try:
                yield
            finally:
                live.discard(reader)
                if not live and self._by_client.get(client_id) is live:
                    del self._by_client[client_id]
        finally:
            await self._count_connection(client_id, username, -1)

    async def _count_connection(self, client_id: str, username: str | None, delta: int) -> None:
        async with self._presence_lock:
            before = self._online.get(client_id, 0)
            after = before + delta
            if after > 0:
                self._online[client_id] = after
            else:
                self._online.pop(client_id, None)
            if self._on_connection is None or (before > 0) == (after > 0):
                return
            try:
                await self._on_connection(client_id, username, after > 0)
            except Exception as exc:  # noqa: BLE001 -- presence is informational; keep serving
                _log.warning("connection hook failed for MQTT client %r (%s)", client_id, type(exc).__name__)
                _log.debug("connection hook error details", exc_info=exc)


class _AmqttBroker(Broker):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's broker, with iotvault's hooks installed on each connection (internal 1 above)."""

    def __init__(self, config: Any, owner: EmbeddedBroker) -> None:
        super().__init__(config)
        self._owner = owner

    async def _handle_client_session(  # noqa: PLR0917 -- amqtt's signature, called positionally
        self,
        reader: Any,
        writer: Any,
        client_session: Any,
        handler: Any,
        server: Any,
        listener_name: str,
    ) -> None:
        if not isinstance(reader, _FramedReader):  # every connection comes through the door
            raise TypeError(f"unexpected amqtt reader {type(reader).__name__}")
        self._owner._install(handler, client_session, reader)
        async with self._owner._connection(client_session.client_id, client_session.username, reader):
            await super()._handle_client_session(
                reader, writer, client_session, handler, server, listener_name
            )


class _AdmittedPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt wants one authentication plugin to say yes; admission already happened.

    Every connection amqtt sees went through :meth:`EmbeddedBroker._admit` first.
    """

    async def authenticate(self, *, session: Any) -> bool:
        return True


class _TopicPolicyPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's topic-filtering hook, answered by ``EmbeddedBroker``'s ``authorize``.

    amqtt asks it to subscribe (a refusal becomes SUBACK 0x80), to forward a message to a
    subscriber ("receive"), and to forward a PUBLISH — which was already decided, before the
    acknowledgement, by :meth:`EmbeddedBroker._accept`.
    """

    @dataclass
    class Config:
        broker: Any  # EmbeddedBroker; typed Any because amqtt builds this with dacite

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Any = None
    ) -> bool:
        if action == Action.PUBLISH:
            return True
        if session is None or topic is None or action not in (Action.SUBSCRIBE, Action.RECEIVE):
            return False
        broker: EmbeddedBroker = self.context.config.broker
        verb: TopicAction = "subscribe" if action == Action.SUBSCRIBE else "receive"
        try:
            allowed = await broker._may(session.client_id, session.username, topic, verb)
        except Exception as exc:  # noqa: BLE001 -- fail closed
            _log.warning(
                "MQTT client %r: %s check for %r failed (%s); refusing",
                session.client_id,
                verb,
                topic,
                type(exc).__name__,
            )
            _log.debug("authorization error details", exc_info=exc)
            return False
        if allowed and verb == "subscribe":
            broker._subscribed.add(topic)  # before amqtt adds the subscription
        if not allowed and verb == "subscribe":
            peer = f"{getattr(session, 'remote_address', '-')}:{getattr(session, 'remote_port', '-')}"
            broker._denied(
                Denial("subscribe", session.client_id, session.username, peer, "not allowed", topic)
            )
        return bool(allowed)


class _BufferedWriter(StreamWriterAdapter):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's writer for one connection, which sends what one turn of the event loop wrote at once.

    The PUBACKs of a committed batch are written in the same turn of the loop; one ``send()``
    each had been a system call per message, and each call let the ingest writer thread take
    the GIL. Bytes go out in the order they were written (everything for the connection goes
    through here), at the next turn of the loop, or at once when ``_FLUSH_AT`` bytes wait and
    amqtt asks to drain; ``close()`` sends what waits first. After an abort nothing is sent.
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        super().__init__(writer)
        self.transport = writer.transport
        self._loop = asyncio.get_running_loop()
        self._chunks: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if self.is_closed:
            return
        if not self._chunks:
            self._loop.call_soon(self.flush)
        self._chunks.append(data)
        self._size += len(data)

    def flush(self) -> None:
        if not self._chunks:
            return
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if not self.transport.is_closing():  # aborted: a write would only count lost calls
            self.transport.write(data)

    async def drain(self) -> None:
        if self._size >= _FLUSH_AT:
            self.flush()
        await super().drain()  # back-pressure (and a lost connection) as StreamWriter has them

    async def close(self) -> None:
        self.flush()
        await super().close()


class _FramedReader(ReaderAdapter):  # type: ignore[misc]  # amqtt ships no type information
    """The byte stream as amqtt reads it, with the MQTT framing followed on the way.

    Following the fixed headers lets a too-large packet be refused from its header alone; the
    connection is then aborted and amqtt sees the end of the stream, which ends the session
    cleanly. The reader also records the CONNECT packet that the door reads and replays it to
    amqtt, and it is the handle by which the broker drops a connection (:meth:`abort`), sends
    a PUBACK of its own (:meth:`send`) and ends a silent one (:meth:`watch_silence`).
    """

    def __init__(
        self,
        stream: asyncio.StreamReader,
        writer: _BufferedWriter,
        max_packet_size: int,
        peer: object,
    ) -> None:
        self._stream = stream
        self._writer = writer
        self._transport = writer.transport
        self._loop = asyncio.get_running_loop()
        self._max_packet_size = max_packet_size
        self._peer = peer
        self.peer = peer  # the client's address, for reports
        self._recorded: bytearray | None = bytearray()
        self._refused = False
        self.task: asyncio.Future[Any] | None = None  # the connection's task, to wait for its end
        self._chunk = b""  # read from the stream, not yet given to amqtt from _pos on
        self._pos = 0
        self._heard = 0.0  # loop time of the last read that returned data
        self._silence_limit = 0.0
        self._silence_timer: asyncio.TimerHandle | None = None
        self._client_id = ""
        # framing state
        self._body_left = 0  # bytes of the current packet's body still to come
        self._header_len = 0  # bytes of the current fixed header seen; 0 at a packet boundary
        self._length = 0  # remaining length decoded so far
        self._multiplier = 1

    def abort(self) -> None:
        """Drop the connection now: nothing more is read, nothing more is sent.

        What was written before (acknowledgements of stored messages) is sent first, as it
        would have been without the writer's gathering.
        """
        self._refused = True
        self.stop_watching()
        self._writer.flush()
        self._transport.abort()

    @property
    def closed(self) -> bool:
        """Dropped, or closing: what is sent now would not arrive."""
        return self._refused or self._transport.is_closing()

    def send(self, packet: bytes) -> None:
        """Send ``packet`` in order with what amqtt sends on this connection."""
        self._writer.write(packet)

    def watch_silence(self, limit_s: float, client_id: str) -> None:
        """Drop the connection once nothing has been read from it for ``limit_s`` seconds.

        One timer per connection, pushed back only when it fires: a read just notes the time.
        """
        self._silence_limit, self._client_id = limit_s, client_id
        self._heard = self._loop.time()
        self._silence_timer = self._loop.call_later(limit_s, self._check_silence)

    def stop_watching(self) -> None:
        if self._silence_timer is not None:
            self._silence_timer.cancel()
            self._silence_timer = None

    def _check_silence(self) -> None:
        quiet = self._loop.time() - self._heard
        if quiet < self._silence_limit:
            self._silence_timer = self._loop.call_later(self._silence_limit - quiet, self._check_silence)
            return
        self._silence_timer = None
        _log.info("MQTT client %r silent for too long; dropping the connection", self._client_id)
        self.abort()

    def replay_connect(self) -> None:
        """Serve the bytes read so far (the CONNECT packet) again, then the stream."""
        if self._recorded is not None:
            # the framing, followed again over the same bytes, ends where it is now
            self._chunk = bytes(self._recorded) + self._chunk[self._pos :]
            self._pos, self._recorded = 0, None

    async def read(self, n: int = -1) -> bytes:
        if self._refused:
            return b""
        # amqtt reads a PUBLISH in six or more small reads (a byte at a time for the fixed
        # header); StreamReader.readexactly for each cost more than amqtt's parsing itself.
        # The stream is read in chunks instead, and small reads are cut from the chunk.
        chunk, pos = self._chunk, self._pos
        if 0 <= n <= len(chunk) - pos:
            data = chunk[pos : pos + n]
            self._pos = pos = pos + n
            if pos == len(chunk):  # all given out: do not keep a read-ahead chunk alive
                self._chunk, self._pos = b"", 0
        else:
            data = await self._refill(n)
        if not self._follow(data):
            self.abort()
            return b""
        if self._recorded is not None:
            self._recorded += data
        return data

    def feed_eof(self) -> None:
        self._stream.feed_eof()

    async def _refill(self, n: int) -> bytes:
        """``n`` bytes (``-1``: all until the end), what is left of the chunk first; read ahead."""
        parts = [self._chunk[self._pos :]]
        self._chunk, self._pos = b"", 0
        if n < 0:
            parts.append(await self._stream.read())
            self._heard = self._loop.time()
            return b"".join(parts)
        have = len(parts[0])
        while have < n:
            more = await self._stream.read(max(_READ_CHUNK, n - have))
            if not more:
                raise asyncio.IncompleteReadError(b"".join(parts), n)  # as readexactly would
            self._heard = self._loop.time()
            parts.append(more)
            have += len(more)
        chunk = b"".join(parts)
        self._chunk, self._pos = chunk, n
        return chunk[:n]

    def _follow(self, data: bytes) -> bool:
        """Advance the framing over ``data``; False if a packet is over the size limit."""
        if len(data) <= self._body_left:  # inside a packet's body, as most reads are
            self._body_left -= len(data)
            return True
        i, end = 0, len(data)
        while i < end:
            if self._body_left:
                step = min(self._body_left, end - i)
                self._body_left -= step
                i += step
                continue
            byte = data[i]
            i += 1
            if self._header_len == 0:  # the packet type byte
                self._header_len, self._length, self._multiplier = 1, 0, 1
                continue
            self._header_len += 1
            self._length += (byte & 0x7F) * self._multiplier
            self._multiplier *= 128
            size = self._header_len + self._length
            if size > self._max_packet_size or (byte & 0x80 and self._header_len >= 5):
                _log.warning(
                    "MQTT packet of %s%d bytes from %s is over the limit of %d; closing the connection",
                    "at least " if byte & 0x80 else "",
                    size,
                    _addr(self._peer),
                    self._max_packet_size,
                )
                return False
            if not byte & 0x80:  # the remaining length is complete
                self._body_left, self._header_len = self._length, 0
        return True


class _FilterIndex:
    """Could anyone receive a topic? The filters of the subscriptions granted since the start.

    A superset of amqtt's live subscriptions: a filter is noted when its SUBSCRIBE is
    authorized, and never forgotten (an unsubscribe or a deleted session is not seen). Each
    filter is kept as its literal part, up to the first wildcard; since a wildcard takes a
    whole level, a topic a filter matches starts with that part at a level boundary, or is it
    (``a/b`` for ``a/b``), or is it less the final ``/`` (``a`` for ``a/#``). So a topic for
    which no such key is noted has no subscriber. A device's command filter
    ``iot-2/type/T/id/D/cmd/+/fmt/json`` is kept as ``iot-2/type/T/id/D/cmd/``, which no event
    or status topic starts with. Past ``_MAX_FILTER_KEYS`` keys the index stops noting and
    answers "maybe" to everything: amqtt's own forwarding, as without the index.
    """

    def __init__(self) -> None:
        self._keys: set[str] = set()
        self._full = False

    def add(self, topic_filter: str) -> None:
        cut = len(topic_filter)
        for wildcard in "+#":
            at = topic_filter.find(wildcard)
            if 0 <= at < cut:
                cut = at
        if len(self._keys) >= _MAX_FILTER_KEYS:
            self._full = True
        else:
            self._keys.add(topic_filter[:cut])

    def may_match(self, topic: str) -> bool:
        keys = self._keys
        if self._full:
            return True
        if not keys:
            return False
        if "" in keys or topic in keys or topic + "/" in keys:
            return True
        at = topic.find("/")
        while at >= 0:
            if topic[: at + 1] in keys:
                return True
            at = topic.find("/", at + 1)
        return False


async def _forward(amqtt_flow: _Flow, message: Any) -> None:
    """amqtt's flow for a stored message that a subscriber may receive: deliver, then acknowledge."""
    try:
        await amqtt_flow(message)
    except Exception as exc:  # noqa: BLE001 -- the connection is ending; the device resends it
        _log.debug("MQTT delivery of a stored message failed", exc_info=exc)


def _topic_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be published to (MQTT 3.1.1 section 4.7), or None."""
    if not topic:
        return "empty topic"
    if "+" in topic or "#" in topic:
        return "wildcard in a topic name"
    if topic.startswith("$"):
        return "topic names starting with $ are reserved"
    if "\x00" in topic:
        return "NUL character in topic"
    return None


def _host(peer: object) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


def _addr(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


async def _settle(*groups: set[asyncio.Future[Any]]) -> None:
    """Wait a little for connections and hooks to finish after amqtt's shutdown; cancel the rest."""
    pending: set[asyncio.Future[Any]] = {task for group in groups for task in group if not task.done()}
    if not pending:
        return
    _, late = await asyncio.wait(pending, timeout=_SHUTDOWN_GRACE)
    for task in late:
        task.cancel()
    if late:
        _log.warning("%d MQTT connection(s) or hook(s) cancelled at shutdown", len(late))
        await asyncio.wait(late)
