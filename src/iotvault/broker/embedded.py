"""The MQTT broker that runs inside iotvault (``IOTVAULT_BROKER_URL=embedded``).

How it is built, and why, is in ``docs/design/embedded-broker.md``; in short:

- **The door is ours.** :class:`EmbeddedBroker` accepts TCP connections itself, counts them
  against :class:`~iotvault.broker.limits.BrokerLimits`, decodes the CONNECT with iotvault's
  codec and asks ``authenticate`` (and ``authorize`` for the will) before amqtt sees anything.
  A refused client gets CONNACK 5 (MQTT 5: 0x86, 0x87, 0x8C or 0x9F) and touches no state.
  MQTT 5 clients are translated to 3.1.1 for amqtt (:mod:`iotvault.broker.mqtt5`).
- **Whole packets only.** Every packet is cut from the stream by its header, bounded by
  ``max_packet_size`` and decoded in full (:mod:`iotvault.broker.codec`) before amqtt reads
  it, one packet at a time (:mod:`iotvault.broker.framing`). A malformed packet (QoS 3, a
  wildcard in a topic name, lengths that do not add up, ...) or an oversized one closes the
  connection and is told to ``on_denied`` as a ``protocol`` denial.
- **Acknowledged means stored.** ``on_publish`` must complete before the PUBACK (QoS 1) or
  PUBREC (QoS 2) goes out and before the message is forwarded. A failing hook withholds the
  acknowledgement and drops the connection; the device resends. A hook that refuses a message
  for good (:class:`~iotvault.broker.hooks.Refused`) has it answered all the same — MQTT 5 with
  the refusal's reason code — so that the sender does not resend it. QoS 1/2 messages being stored
  per connection are bounded (``max_inflight``): past it the connection is simply not read
  until some are stored (back-pressure; MQTT 3.1.1 has no receive maximum). A message no
  subscription can match is acknowledged by the broker itself (:class:`FilterIndex`).
- **Topic rules.** ``authorize(client_id, username, topic, action)`` decides ``"publish"``
  (before the hook: a refused message is never stored, the connection is closed
  [MQTT-3.3.5-2]), ``"subscribe"`` (SUBACK 0x80) and ``"receive"``. Topics starting with ``$``
  are refused the same way.
- **One connection per client id**, the previous one closed first [MQTT-3.1.4-2]; **presence**
  via ``on_connection``; a silent client is dropped after 1.5 keep-alives and a client with
  keep-alive 0 is watched by TCP keep-alive.
- **Throttling that spares the innocent**: with a ``throttle``, an address that failed too
  often is refused *except* for a client id that has not itself been failing from it, whose
  credential is still checked (SECURITY.md, "Login throttling").
- **Bounded state**: retained messages (count and bytes, or off), log lines per connection.

amqtt keeps sessions, subscriptions and delivery to subscribers; every touch of it is in
:mod:`iotvault.broker.amqtt_adapter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import logging
import struct
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from ssl import SSLContext
from typing import TYPE_CHECKING, Any, Final, cast

from iotvault.broker.amqtt_adapter import AmqttCore, Flow, Incoming
from iotvault.broker.codec import Connack, Connect, MalformedPacketError, encode, publish_topic_problem
from iotvault.broker.filter_index import FilterIndex
from iotvault.broker.framing import GatheringWriter, PacketStream, addr, host, keep_alive, settle
from iotvault.broker.hooks import (
    NOT_FORWARDED,
    Authenticator,
    ConnectionHook,
    Denial,
    DenialHook,
    InboundPublish,
    PublishHook,
    Refused,
    TopicAction,
    TopicAuthorizer,
)
from iotvault.broker.limits import (
    BrokerLimits,
    ConnectionGate,
    LogBudget,
    fit_to_descriptors,
    install_log_budget,
    log_budget,
)
from iotvault.broker.mqtt5 import (
    NOT_AUTHORIZED,
    UNSPECIFIED,
    PublishRefusedError,
    V5Limits,
    V5Session,
    connack_refusal,
    refusal_ack,
)
from iotvault.broker.watson import DeviceTopics
from iotvault.broker.websocket import open_websocket
from iotvault.errors import PortInUseError

if TYPE_CHECKING:
    from types import TracebackType

    from iotvault.broker.throttle import LoginThrottle

__all__ = [
    "Authenticator",
    "BrokerLimits",
    "ConnectionHook",
    "Denial",
    "DenialHook",
    "EmbeddedBroker",
    "InboundPublish",
    "Listener",
    "PublishHook",
    "Refused",
    "TopicAction",
    "TopicAuthorizer",
]

_log = logging.getLogger(__name__)

_SHUTDOWN_GRACE: Final = 10.0  # seconds __aexit__ waits for running hooks and connections
_TAKE_OVER_GRACE: Final = 5.0  # seconds a new connection waits for its predecessor to end
_PORT_SETTING: Final = "IOTVAULT_MQTT_PORT"
_PUBACK: Final = struct.Struct("!BBH")  # packet type 4, remaining length 2, packet id
_CONNACK_REFUSED_LEVEL: Final = 1  # MQTT 3.1.1: unacceptable protocol version
_CONNACK_NOT_AUTHORIZED: Final = 5
_REFUSAL_LOG_EVERY_S: Final = 10.0  # refused connections are logged once in this many seconds
_COLLECT_AFTER: Final = (2_000, 10.0)  # ended connections, and seconds since the last collection


@dataclass(frozen=True, slots=True)
class Listener:
    """A further port on the broker's host: MQTT over TLS, or over WebSocket (``/mqtt``).

    ``setting`` names the setting that chose the port, for the error when it is taken.
    """

    port: int
    ssl: SSLContext | None = None
    websocket: bool = False
    setting: str = _PORT_SETTING


class EmbeddedBroker:
    """An MQTT 3.1.1 and 5 broker inside the process; ``async with`` starts and stops it.

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
        limits: BrokerLimits | None = None,
        listeners: Sequence[Listener] = (),
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
        self._on_denied = on_denied
        self._throttle = throttle
        self._ssl = ssl
        self._listeners = tuple(listeners)
        self._extra_servers: list[asyncio.Server] = []
        self.limits = fit_to_descriptors(limits if limits is not None else BrokerLimits())
        self._gate = ConnectionGate(self.limits)
        self._core: AmqttCore | None = None
        self._server: asyncio.Server | None = None
        # open connections (their tasks and streams) and running publish hooks, for shutdown
        self._connections: set[asyncio.Future[Any]] = set()
        self._streams: set[PacketStream] = set()
        self._by_client: dict[str, set[PacketStream]] = {}  # connections inside amqtt
        self._hooks: set[asyncio.Future[Any]] = set()  # and the forwarding tasks they start
        self._subscribed = FilterIndex()
        self._online: dict[str, int] = {}
        self._presence_lock = asyncio.Lock()
        self._retained: dict[str, int] = {}  # topic -> payload bytes kept by amqtt
        self._retained_bytes = 0
        self._refused_since_log = 0
        self._refusal_logged_at = 0.0
        self._ended_since_collect = 0
        self._collected_at = time.monotonic()

    @property
    def port(self) -> int:
        """The port the broker listens on (the one the system chose, when asked for port 0)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def open_connections(self) -> int:
        """Connections open now, CONNECT sent or not."""
        return self._gate.total

    async def __aenter__(self) -> EmbeddedBroker:
        core = AmqttCore(self._host, self._port, self)  # checks amqtt's version first
        install_log_budget(("amqtt", "transitions", "iotvault.broker"))
        await core.start()
        try:
            self._server = await asyncio.start_server(
                self._serve_connection, self._host, self._port, ssl=self._ssl
            )
        except OSError as exc:
            await core.shutdown()
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(self._host, self._port, _PORT_SETTING) from None
            raise
        self._core = core
        _log.info("embedded MQTT broker listening on %s:%d", self._host, self.port)
        for listener in self._listeners:
            serve = functools.partial(self._serve_connection, websocket=listener.websocket)
            try:
                server = await asyncio.start_server(serve, self._host, listener.port, ssl=listener.ssl)
            except OSError as exc:
                await self.__aexit__(None, None, None)
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUseError(self._host, listener.port, listener.setting) from None
                raise
            self._extra_servers.append(server)
            kind = ("MQTT over WebSocket" if listener.websocket else "MQTT") + (
                " over TLS" if listener.ssl else ""
            )
            _log.info("embedded MQTT broker listening on %s:%d (%s)", self._host, listener.port, kind)
        return self

    @property
    def ports(self) -> list[int]:
        """Every port listened on: the main one first, then the further listeners' in order."""
        return [self.port] + [int(s.sockets[0].getsockname()[1]) for s in self._extra_servers if s.sockets]

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        server, core = self._server, self._core
        self._server = self._core = None
        extra, self._extra_servers = self._extra_servers, []
        for other in extra:
            other.close()
        if server is not None:
            server.close()  # stop accepting
        for stream in list(self._streams):
            stream.abort()  # amqtt ends each session as if the client had gone
        await settle(self._connections, self._hooks, grace_s=_SHUTDOWN_GRACE)
        if core is not None:
            await core.shutdown()
        if server is not None:
            await server.wait_closed()
        for other in extra:
            await other.wait_closed()

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Send a message of iotvault's own (a command) to the clients subscribed to ``topic``.

        Returns once the message is queued for delivery, not once subscribers acknowledged it.
        """
        if self._core is None:
            raise RuntimeError("the embedded broker is not running; use it inside `async with`")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos}")
        if problem := publish_topic_problem(topic):
            raise ValueError(f"cannot publish to {topic!r}: {problem}")
        await self._core.broadcast(topic, bytes(payload), qos)

    def disconnect(self, client_id: str) -> int:
        """End every connection of ``client_id`` now (its will is published); return how many.

        For a device whose credential was revoked or deleted while it was connected.
        """
        streams = list(self._by_client.get(client_id, ()))
        for stream in streams:
            stream.abort()
        return len(streams)

    # -- the door -----------------------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, websocket: bool = False
    ) -> None:
        peer = writer.get_extra_info("peername")
        address = host(peer)
        refusal = self._gate.enter(address)
        if refusal is not None:
            writer.transport.abort()  # nothing read, nothing sent, no descriptor kept
            self._refused_connection(address, refusal)
            return
        if websocket:
            opened = await self._open_websocket(reader, writer, address)
            if opened is None:
                return
            reader, writer = opened
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        keep_alive(writer)
        gathering = GatheringWriter(writer)
        stream = PacketStream(
            reader, gathering, self._max_packet_size, peer, max_inflight=self.limits.max_inflight
        )
        stream.task = task
        stream.on_violation = functools.partial(self._violation, stream)
        budget = LogBudget(self.limits.log_lines_per_connection)
        log_budget.set(budget)  # this task's context, copied into the tasks amqtt makes for it
        self._streams.add(stream)
        pending = [True]
        try:
            await self._admit_and_serve(stream, gathering, pending)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- one bad connection must not reach asyncio's handler
            _log.warning("MQTT connection from %s ended on an error: %s", addr(peer), type(exc).__name__)
            _log.debug("MQTT connection error details", exc_info=exc)
        finally:
            stream.stop_watching()
            gathering.close()  # the transport itself, whatever happened (finding: descriptor leak)
            self._streams.discard(stream)
            self._gate.leave(address, pending=pending[0])
            if task is not None:
                self._connections.discard(task)
            log_budget.set(None)
            self._collect_churn()
            if budget.suppressed:
                _log.warning("MQTT client %r from %s: %d further log lines suppressed",
                             stream.client_id, address, budget.suppressed)  # fmt: skip

    async def _open_websocket(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The WebSocket handshake, within the connect timeout; None (and all released) if refused."""
        opened = None
        try:
            async with asyncio.timeout(self.limits.connect_timeout_s):
                opened = await open_websocket(reader, writer, max_size=self._max_packet_size + 16)
        except (TimeoutError, OSError) as exc:
            _log.info("WebSocket handshake from %s failed (%s)", address, type(exc).__name__)
        finally:
            if opened is None:
                writer.transport.abort()
                self._gate.leave(address, pending=True)
        if opened is None:
            return None
        # shaped like asyncio's streams: from here on, served exactly as a TCP connection
        return cast("asyncio.StreamReader", opened[0]), cast("asyncio.StreamWriter", opened[1])

    def _collect_churn(self) -> None:
        """A full collection after many ended connections: each leaves cyclic garbage behind
        (amqtt's session, handler and state machine), which ``iotvault serve``'s raised collector
        thresholds let pile up — measured: +30 MB per 10,000 connect-and-close, flat with this;
        a collection takes about 70 ms, at most once in 10 s."""
        self._ended_since_collect += 1
        every, min_gap_s = _COLLECT_AFTER
        now = time.monotonic()
        if self._ended_since_collect >= every and now - self._collected_at >= min_gap_s:
            self._ended_since_collect, self._collected_at = 0, now
            gc.collect()

    def _refused_connection(self, address: str, reason: str) -> None:
        self._denied(Denial("limit", "-", None, address, reason))
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= _REFUSAL_LOG_EVERY_S:
            _log.warning("MQTT connections refused (%s, last from %s): %d in the last %.0fs",
                         reason, address, self._refused_since_log, _REFUSAL_LOG_EVERY_S)  # fmt: skip
            self._refused_since_log, self._refusal_logged_at = 0, now

    def _violation(self, stream: PacketStream, reason: str) -> None:
        self._denied(Denial("protocol", stream.client_id or "-", None, addr(stream.peer), reason))

    async def _admit_and_serve(  # noqa: PLR0911 -- each refusal ends here
        self, stream: PacketStream, writer: GatheringWriter, pending: list[bool]
    ) -> None:
        peer = stream.peer
        try:
            async with asyncio.timeout(self.limits.connect_timeout_s):
                got = await stream.next_packet()
        except TimeoutError:
            _log.info("MQTT connection from %s sent no CONNECT in time", addr(peer))
            return
        except MalformedPacketError as exc:
            stream.violation(exc.reason)
            return
        if got is None:
            return  # closed before a whole first packet
        raw, connect = got
        self._gate.connected(host(peer))
        pending[0] = False
        if not isinstance(connect, Connect):
            stream.violation("first packet is not CONNECT")  # [MQTT-3.1.0-1]
            return
        stream.client_id = connect.client_id
        if connect.protocol_level == 5:
            if (served := await self._admit_v5(stream, writer, raw)) is None:
                return
            raw = served
        elif connect.protocol_level != 4:
            level = connect.protocol_level
            writer.write(encode(Connack(_CONNACK_REFUSED_LEVEL)))
            _log.info("MQTT connection from %s refused: protocol level %d", addr(peer), level)
            self._denied(Denial("protocol", "-", None, addr(peer), f"unsupported protocol level {level}"))
            return
        else:
            topics = DeviceTopics.for_client(connect.client_id)
            if topics is not None and (mapped := topics.connect(connect)) != connect:
                connect, raw = mapped, encode(mapped)
            if await self._admit(connect, peer) is not None:
                writer.write(encode(Connack(_CONNACK_NOT_AUTHORIZED)))
                return
            self._map_topics(stream, writer, topics)
        stream.serve(raw)
        if self._core is not None:
            await self._core.serve(stream, writer)

    async def _admit_v5(self, stream: PacketStream, writer: GatheringWriter, raw: bytes) -> bytes | None:
        """Decode and admit an MQTT 5 CONNECT; the 3.1.1 CONNECT amqtt is to read, or None if refused."""
        try:
            session = V5Session.open(raw, V5Limits(
                self._max_packet_size, self.limits.max_inflight, self.limits.max_retained > 0))  # fmt: skip
        except MalformedPacketError as exc:
            stream.violation(exc.reason)
            return None
        stream.client_id = session.connect.client_id
        connect = session.as_v4()
        topics = DeviceTopics.for_client(connect.client_id)
        if topics is not None:
            connect = topics.connect(connect)
        if (refusal := await self._admit(connect, stream.peer, session.check_connect())) is not None:
            writer.write(connack_refusal(refusal))
            return None
        stream.v5 = session
        writer.translate = session.outbound
        self._map_topics(stream, writer, topics)
        return encode(connect)

    @staticmethod
    def _map_topics(stream: PacketStream, writer: GatheringWriter, topics: DeviceTopics | None) -> None:
        """A Watson device's session: its relative topics mapped both ways (:mod:`.watson`)."""
        if topics is None:
            return
        stream.topics = topics
        then = writer.translate
        writer.translate = topics.outbound if then is None else lambda data: then(topics.outbound(data))

    async def _admit(self, connect: Connect, peer: object, refusal: str | None = None) -> str | None:
        """Why ``connect`` is refused (``refusal`` already; a security event is recorded), or None."""
        client_id, username, address = connect.client_id, connect.username, host(peer)

        def refuse(reason: str, topic: str | None = None) -> str:
            self._denied(Denial("connect", client_id, username, addr(peer), reason, topic))
            return reason

        if refusal is not None:
            return refuse(refusal)
        throttle = self._throttle
        if throttle is not None and (wait := throttle.blocked(address, client_id)) is not None:
            _log.info(
                "MQTT client %r from %s refused: too many failed logins (%.0fs)", client_id, address, wait
            )
            return refuse("throttled")
        password = connect.password.decode("utf-8", "replace") if connect.password is not None else None
        try:
            if self._authenticate is not None and not await self._authenticate(client_id, username, password):
                _log.info("MQTT client %r from %s refused: authentication failed", client_id, address)
                if throttle is not None:
                    throttle.failed(address, client_id)
                return refuse("bad credentials")
            will_topic = connect.will_topic
            if will_topic is not None and not await self._may(client_id, username, will_topic, "publish"):
                _log.warning("MQTT client %r refused: will topic %r is not allowed", client_id, will_topic)
                return refuse("will topic", will_topic)
        except Exception as exc:  # noqa: BLE001 -- fail closed, and say so
            _log.warning("MQTT client %r refused: admission check failed (%s)", client_id, type(exc).__name__)
            _log.debug("admission check error details", exc_info=exc)
            return refuse("admission check failed")
        if throttle is not None:
            throttle.succeeded(address, client_id)
        return None

    def _denied(self, denial: Denial) -> None:
        if self._on_denied is None:
            return
        try:
            self._on_denied(denial)
        except Exception as exc:  # noqa: BLE001 -- reporting must never break the broker
            _log.warning("denial hook failed (%s)", type(exc).__name__)
            _log.debug("denial hook error details", exc_info=exc)

    async def _may(self, client_id: str, username: str | None, topic: str, action: TopicAction) -> bool:
        if action != "subscribe" and publish_topic_problem(topic):
            return False
        if self._authorize is None:
            return True
        return await self._authorize(client_id, username, topic, action)

    # -- called by the amqtt adapter (amqtt_adapter.Owner) ------------------------------------

    async def may(self, client_id: str, username: str | None, topic: str, action: str) -> bool:
        verb: TopicAction = "subscribe" if action == "subscribe" else "receive"
        return await self._may(client_id, username, topic, verb)

    def subscribed(self, topic_filter: str) -> None:
        self._subscribed.add(topic_filter)

    def subscribe_denied(self, client_id: str, username: str | None, peer: str, topic: str) -> None:
        self._denied(Denial("subscribe", client_id, username, peer, "not allowed", topic))

    def may_retain(self, topic: str, size: int) -> bool:
        """Keep a retained message of ``size`` bytes on ``topic``? 0 bytes: it is cleared."""
        old = self._retained.pop(topic, 0)
        self._retained_bytes -= old
        if size == 0:
            return True
        lim = self.limits
        if len(self._retained) + 1 > lim.max_retained or self._retained_bytes + size > lim.max_retained_bytes:
            if lim.max_retained:
                _log.warning("retained message on %r not kept: over %d messages or %d bytes",
                             topic, lim.max_retained, lim.max_retained_bytes)  # fmt: skip
            return False
        self._retained[topic] = size
        self._retained_bytes += size
        return True

    async def on_incoming(  # noqa: PLR0917 -- the adapter's one call per PUBLISH
        self,
        stream: PacketStream,
        client_id: str,
        username: str | None,
        message: Any,
        incoming: Incoming,
        flow: Flow,
    ) -> bool:
        """Check an incoming PUBLISH and hand it to the hook; True if amqtt's flow is to run now.

        False: refused (the connection is being dropped), or left to :meth:`_stored`, which
        answers it once the hook has completed. A QoS 1/2 message holds one of the stream's
        in-flight slots from the moment it was read (:meth:`PacketStream.read`) until its hook
        is done, or until it is refused or handed on here.
        """
        try:
            hook = await self._start_hook(stream, client_id, username, incoming)
        except PublishRefusedError:  # answered with a reason code; the connection goes on
            if incoming.qos:
                stream.release()
            return False
        if incoming.qos:
            if hook is None:
                stream.release()
            else:
                hook.add_done_callback(lambda _: stream.release())
        if hook is None:
            return not stream.closed  # refused (dropped), or no hook: amqtt's flow as it is
        if incoming.qos == 2 or incoming.retain:
            return await self._wait_for_hook(stream, incoming, hook)
        # QoS 0 and 1: nothing waits for the hook, so nothing can cancel it; its completion
        # answers the message (_stored), even if the device disconnects meanwhile.
        hook.add_done_callback(functools.partial(self._stored, stream, incoming, message, flow))
        return False

    async def _start_hook(
        self, stream: PacketStream, client_id: str, username: str | None, incoming: Incoming
    ) -> asyncio.Future[Any] | None:
        """Authorize the PUBLISH and start the hook; None if refused (dropped) or there is no hook."""
        topic = incoming.topic
        try:
            allowed = await self._may(client_id, username, topic, "publish")
        except Exception as exc:  # noqa: BLE001 -- fail closed: no ack, the device retries
            _log.debug("authorization error details", exc_info=exc)
            _drop(stream, f"authorization failed ({type(exc).__name__})", topic)
            return None
        if not allowed:
            self._denied(Denial("publish", client_id, username, addr(stream.peer), "not allowed", topic))
            if stream.v5 is not None and incoming.qos and incoming.packet_id is not None:
                # MQTT 5 can say no and keep the connection: PUBACK/PUBREC 0x87, nothing stored
                stream.send(refusal_ack(incoming.qos, incoming.packet_id))
                if incoming.qos == 2:
                    stream.refused_qos2(incoming.packet_id)
                raise PublishRefusedError
            _drop(stream, "publish not allowed", topic, NOT_AUTHORIZED)
            return None
        if self._on_publish is None:
            return None
        inbound = InboundPublish(client_id, username, topic, incoming.payload, incoming.qos, incoming.retain,
                                 incoming.dup, incoming.packet_id)  # fmt: skip
        try:
            running = self._on_publish(inbound)
            # iotvault's hook hands over the ingest pipeline's own future; a coroutine gets a task
            hook = running if isinstance(running, asyncio.Future) else asyncio.ensure_future(running)
        except Exception as exc:  # noqa: BLE001 -- any failure means "not stored": do not ack
            _log.debug("publish hook error details", exc_info=exc)
            _drop(stream, f"publish hook failed ({type(exc).__name__})", topic)
            return None
        self._hooks.add(hook)
        return hook

    async def _wait_for_hook(
        self, stream: PacketStream, incoming: Incoming, hook: asyncio.Future[Any]
    ) -> bool:
        """For amqtt's own flow (PUBREC and PUBREL, or keeping a retained message) after the hook.

        The shield keeps a dropped connection's cancellation of this task from reaching the hook.
        """
        topic = incoming.topic
        hook.add_done_callback(self._hooks.discard)
        try:
            await asyncio.shield(hook)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any failure means "not stored": do not ack
            _log.debug("publish hook error details", exc_info=exc)
            return _drop(stream, f"publish hook failed ({type(exc).__name__})", topic)
        if isinstance(refused := hook.result(), Refused):
            return _answer_refused(stream, incoming, refused)
        if hook.result() == NOT_FORWARDED:  # amqtt's QoS 2 and retain flows would forward it
            return _drop(stream, "a message not to be forwarded sent with QoS 2 or retained", topic)
        return True

    def _stored(
        self, stream: PacketStream, incoming: Incoming, message: Any, flow: Flow, hook: asyncio.Future[Any]
    ) -> None:
        """The hook of a QoS 0 or 1 PUBLISH is done: acknowledge, forward, or drop the connection."""
        self._hooks.discard(hook)
        if hook.cancelled():
            failure = "publish hook cancelled"
        elif (exc := hook.exception()) is not None:
            _log.debug("publish hook error details", exc_info=exc)
            failure = f"publish hook failed ({type(exc).__name__})"
        elif stream.closed:
            return  # the device went meanwhile: stored, not acknowledged, so it sends it again
        elif isinstance(refused := hook.result(), Refused):
            _answer_refused(stream, incoming, refused)
            return
        elif hook.result() != NOT_FORWARDED and self._subscribed.may_match(incoming.topic):
            # Someone may receive it: amqtt's flow queues it for its subscribers and then
            # acknowledges it. Decided now, so a subscription made meanwhile still gets it.
            forward = asyncio.ensure_future(_forward(flow, message))
            self._hooks.add(forward)
            forward.add_done_callback(self._hooks.discard)
            return
        else:
            if incoming.qos == 1 and incoming.packet_id is not None:
                stream.send(_PUBACK.pack(0x40, 2, incoming.packet_id))
            return
        if not stream.closed:
            _drop(stream, failure, incoming.topic)

    @contextlib.asynccontextmanager
    async def connection(
        self, client_id: str, username: str | None, stream: PacketStream
    ) -> AsyncIterator[None]:
        """Presence and registration of one connection that amqtt serves; ends its predecessor."""
        await self._count_connection(client_id, username, +1)  # first, so a take-over does not flap
        try:
            live = self._by_client.setdefault(client_id, set())
            ending = [old.task for old in live if old.task is not None]
            for old in live:
                _log.info("MQTT client %r connected again; closing its previous connection", client_id)
                old.abort()
            live.add(stream)
            if ending:
                await asyncio.wait(ending, timeout=_TAKE_OVER_GRACE)
            try:
                yield
            finally:
                live.discard(stream)
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


def _drop(stream: PacketStream, reason: str, topic: str, code: int = UNSPECIFIED) -> bool:
    _log.warning("MQTT client %r: %s on topic %r; dropping the connection without acknowledging",
                 stream.client_id, reason, topic)  # fmt: skip
    stream.disconnect(code)  # MQTT 5: DISCONNECT with ``code`` first
    return False


def _answer_refused(stream: PacketStream, incoming: Incoming, refused: Refused) -> bool:
    """Answer a message its hook refused for good: nothing stored, nothing forwarded, and the
    sender told so it does not resend — MQTT 5 by the reason code of its PUBACK or PUBREC, MQTT
    3.1.1 by a plain PUBACK (the hook recorded why). A 3.1.1 QoS 2 message cannot be answered so
    (its PUBREC would start a flow that delivers it): its connection is dropped. Always False:
    amqtt's own flow does not run."""
    packet_id = incoming.packet_id
    if not incoming.qos or packet_id is None:
        return False
    if stream.v5 is not None:
        stream.send(refusal_ack(incoming.qos, packet_id, refused.reason_code))
        if incoming.qos == 2:
            stream.refused_qos2(packet_id)
    elif incoming.qos == 1:
        stream.send(_PUBACK.pack(0x40, 2, packet_id))
    else:
        _drop(stream, f"refused ({refused.reason}) at QoS 2", incoming.topic)
    return False


async def _forward(amqtt_flow: Flow, message: Any) -> None:
    """amqtt's flow for a stored message that a subscriber may receive: deliver, then acknowledge."""
    try:
        await amqtt_flow(message)
    except Exception as exc:  # noqa: BLE001 -- the connection is ending; the device resends it
        _log.debug("MQTT delivery of a stored message failed", exc_info=exc)
