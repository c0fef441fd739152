"""A device's MQTT connection, delivering every event at least once: the SDK's and the simulator's.

Why the device keeps its own outbox rather than trusting gmqtt's (read from gmqtt 0.8):

* gmqtt stores each unacknowledged QoS 1 packet in its "persistent storage" and replays the
  stored bytes only when a CONNACK says the session is present. When the broker has forgotten
  the session (it restarted without persistence, or was killed before it saved) gmqtt *clears*
  that storage: the messages are silently dropped, and their packet ids are never freed.
* There is no timer resend, replays carry no DUP flag, its own reconnects wait a fixed delay
  (no backoff, no jitter), and ``stop_reconnect()`` still allows one more attempt.
* ``Client.publish`` returns nothing; the only sign of a PUBACK is the storage being told to
  forget that packet id.

So a device keeps every event until a PUBACK for it arrives, and uses one gmqtt client per
network connection with gmqtt's own reconnect switched off; a supervisor task reconnects with
exponential backoff and jitter. After every CONNACK, whatever the broker says about the
session, the device publishes ``{"status": "connected"}`` and then re-publishes its whole
outbox in order, with the DUP flag on what an earlier connection already sent, and with its
*original packet id* (MQTT 3.1.1 section 4.4, [MQTT-4.4.0-1]): iotvault recognises a
redelivery by sender, packet id and content, so a device that changed ids on resend would be
stored twice. gmqtt always draws a new id, so each connection gets an id allocator that can be
told which id the next PUBLISH must carry (:class:`PinnedIds`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from ssl import SSLCertVerificationError, SSLContext
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from gmqtt import Message, MQTTConnectError
from gmqtt.mqtt.constants import MQTTv311

from iotvault.adapters.gmqtt import OneConnectionClient, PinnedIds, use_packet_ids
from iotvault.domain.ids import check_identifier
from iotvault.domain.topics import EventTopic, StatusTopic
from iotvault.errors import BrokerError, ValidationError

if TYPE_CHECKING:
    from iotvault.device.processor import CommandProcessor

logger = logging.getLogger(__name__)

_CONNECTED = b'{"status":"connected"}'
_DISCONNECTED = b'{"status":"disconnected"}'

# MQTT 3.1.1 CONNACK codes that retrying cannot fix: unacceptable protocol version, identifier
# rejected, bad user name or password, not authorised. 3 (server unavailable) is transient.
_REFUSED_FOR_GOOD = {
    1: "unacceptable protocol version",
    2: "client id rejected",
    4: "bad user name or password",
    5: "not authorised",
}

_jitter = random.SystemRandom()


class DeviceRefusedError(BrokerError):
    """The broker refused the device's first connection for a reason retrying cannot fix."""

    def __init__(self, device_id: str, reason: str, code: int | None = None) -> None:
        self.device_id = device_id
        self.reason = reason
        self.code = code
        super().__init__(f"the MQTT broker refused device {device_id!r}: {reason}")


@dataclass(frozen=True, slots=True)
class DeviceCredential:
    """What a device needs to connect: its ids and its credential (hidden from ``repr``)."""

    device_id: str
    type_id: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        check_identifier("deviceId", self.device_id)
        check_identifier("typeId", self.type_id)
        if not isinstance(self.password, str) or not self.password:
            raise ValidationError("password", "a device credential must be a non-empty string")


class _AckTracker:
    """gmqtt's persistent storage for one connection, used to learn which publish a PUBACK answers.

    gmqtt calls ``push_message(mid, packet)`` from inside ``Client.publish`` and
    ``remove_message_by_mid(mid)`` on PUBACK. The device says which outbox key the next publish
    carries (``expect``), so each packet id maps to its key. ``get_all`` is always empty: the
    device, not gmqtt, decides what to resend. No ``__len__``: gmqtt tests the storage with
    ``or`` and would replace an empty one by its own.
    """

    def __init__(self, on_ack: Callable[[int], None]) -> None:
        self._on_ack = on_ack
        self._expected: int | None = None
        self.last_mid: int | None = None
        self._inflight: dict[int, int | None] = {}
        self._drained = asyncio.Event()
        self._drained.set()

    def expect(self, key: int | None) -> None:
        self._expected = key

    def push_message(self, mid: int, raw_package: bytes) -> None:
        self.last_mid = mid
        self._inflight[mid] = self._expected
        self._expected = None
        self._drained.clear()

    def remove_message_by_mid(self, mid: int) -> None:
        if mid not in self._inflight:
            return
        key = self._inflight.pop(mid)
        if not self._inflight:
            self._drained.set()
        if key is not None:
            self._on_ack(key)

    @property
    def is_empty(self) -> bool:
        return not self._inflight

    async def wait_empty(self) -> None:
        await self._drained.wait()

    def clear(self) -> None:
        # Called on a CONNACK without a session: the broker forgot what was in flight. The
        # device's outbox still holds those events and re-publishes them.
        self._inflight.clear()
        self._drained.set()

    def get_all(self) -> list[tuple[int, bytes]]:
        return []


@dataclass(slots=True)
class _Outgoing:
    topic: str
    payload: bytes
    sent: bool = False
    mid: int | None = None  # the packet id it was first sent with, reused on every resend


@dataclass(eq=False, slots=True)
class _Session:
    """One network connection and the gmqtt client that owns it."""

    client: Any
    tracker: _AckTracker
    ids: PinnedIds
    lost: asyncio.Event
    opened_at: float = 0.0
    session_present: bool = False

    @property
    def usable(self) -> bool:
        return not self.lost.is_set()


class DeviceConnection:
    """One device: one MQTT connection (client id = username = device_id, password = credential),
    MQTT 3.1.1, clean_session=False, keepalive 30 s, will message ``{"status": "disconnected"}``
    (QoS 1) on its status topic, and ``{"status": "connected"}`` there after each connect.

    Events are QoS 1 and stay in an outbox until the broker acknowledges them; the outbox is
    re-published after every reconnect, so a broker restart loses nothing. At most
    ``max_unacked`` events wait at once: ``publish_event`` waits for room beyond that.
    """

    def __init__(
        self,
        cred: DeviceCredential,
        host: str,
        port: int,
        *,
        ssl: SSLContext | None = None,
        keepalive: int = 30,
        connect_timeout: float = 10.0,
        reconnect_min: float = 0.1,
        reconnect_max: float = 5.0,
        max_unacked: int = 1000,
        commands: CommandProcessor | None = None,
    ) -> None:
        if not 1 <= max_unacked <= 60_000:
            # Every unacknowledged event holds one of the 65535 MQTT packet ids.
            raise ValidationError("max_unacked", "must be between 1 and 60000")
        if not 0 < reconnect_min <= reconnect_max:
            raise ValidationError("reconnect_min", "must be positive and at most reconnect_max")
        self._cred = cred
        self._host = host
        self._port = port
        self._ssl = ssl
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max
        self._max_unacked = max_unacked
        self._status_topic = str(StatusTopic(cred.type_id, cred.device_id))
        # commands (iotvault.device): subscribed after every connect, answered as cmdack events
        self._commands = commands
        self._command_filter = f"iot-2/type/{cred.type_id}/id/{cred.device_id}/cmd/+/fmt/json"
        self._command_tasks: set[asyncio.Task[None]] = set()
        self._commands_ready = asyncio.Event()  # the command subscription of this connection holds
        self._event_topics: dict[str, str] = {}

        self._outbox: dict[int, _Outgoing] = {}
        self._next_key = 0
        self._published = 0
        self._acknowledged = 0
        self._connections = 0
        self._session: _Session | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._failure: BrokerError | None = None
        self._closed = False
        self._settled = asyncio.Event()  # first connected, refused for good, or closed
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        self._room = asyncio.Event()
        self._room.set()

    def __repr__(self) -> str:
        return f"DeviceConnection({self._cred.device_id!r}, {self._host}:{self._port})"

    @property
    def device_id(self) -> str:
        return self._cred.device_id

    @property
    def type_id(self) -> str:
        return self._cred.type_id

    @property
    def published(self) -> int:
        """Events handed to :meth:`publish_event` so far."""
        return self._published

    @property
    def acknowledged(self) -> int:
        """Events the broker has acknowledged (PUBACK) at least once."""
        return self._acknowledged

    @property
    def connections(self) -> int:
        """Successful connections so far (1 + the number of reconnects)."""
        return self._connections

    @property
    def connected(self) -> bool:
        return self._session is not None and self._session.usable

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Return once connected, retrying with exponential backoff and jitter; stay connected.

        Returns at once if the device is closed meanwhile. Raises :class:`DeviceRefusedError`
        if the broker refuses the credential or client id (a mistake retrying cannot fix); once
        a device has connected, later refusals are retried like any other failure.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name=f"mqtt {self.device_id}")
        await self._settled.wait()
        if self._failure is not None:
            raise self._failure

    async def publish_event(self, event_type: str, payload: dict[str, object]) -> None:
        """Queue one event (QoS 1, compact JSON) and send it if connected; return when queued.

        Waits while ``max_unacked`` events are unacknowledged. Events queued while offline (or
        before :meth:`connect`) go out, in order, as soon as a connection is up.
        """
        topic = self._event_topics.get(event_type)
        if topic is None:
            topic = str(EventTopic(self._cred.type_id, self._cred.device_id, event_type, "json"))
            self._event_topics[event_type] = topic
        try:
            data = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise ValidationError("payload", f"not serializable as JSON: {exc}") from exc
        while True:
            self._check_usable()
            if len(self._outbox) < self._max_unacked:
                break
            await self._room.wait()
        key = self._next_key
        self._next_key += 1
        outgoing = _Outgoing(topic, data)
        self._outbox[key] = outgoing
        self._published += 1
        self._all_acked.clear()
        if len(self._outbox) >= self._max_unacked:
            self._room.clear()
        session = self._session
        if session is not None and session.usable:
            self._send(session, outgoing, key)

    async def wait_commands_ready(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109  # answers a bool
        """Wait until the broker has confirmed the command subscription; False if *timeout* passes.

        Commands sent before that reach the device only if its session already held the
        subscription (a reconnect with a persistent session).
        """
        if self._commands is None:
            raise RuntimeError(f"{self!r} does not take commands")
        try:
            async with asyncio.timeout(timeout):
                await self._commands_ready.wait()
        except TimeoutError:
            return False
        return True

    async def wait_acknowledged(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109  # the API answers a bool
        """Wait until every event published so far is acknowledged; False if *timeout* passes."""
        if self._failure is not None:
            raise self._failure
        try:
            async with asyncio.timeout(timeout):
                await self._all_acked.wait()
        except TimeoutError:
            return False
        if self._failure is not None:
            raise self._failure
        return not self._outbox

    async def close(self) -> None:
        """Say ``disconnected`` on the status topic, disconnect cleanly and stop reconnecting.

        A clean DISCONNECT makes the broker drop the will, hence the explicit status message.
        Events still unacknowledged are given up (and stay counted as unacknowledged).
        """
        if self._closed:
            return
        if self._command_tasks:  # answers to commands being handled are queued first
            await asyncio.wait(set(self._command_tasks), timeout=2.0)
        self._closed = True
        for task in self._command_tasks:
            task.cancel()
        session = self._session
        if session is not None and session.usable:
            self._send(session, _Outgoing(self._status_topic, _DISCONNECTED), None)
        supervisor = self._supervisor
        if supervisor is not None:
            supervisor.cancel()
            await asyncio.wait([supervisor])
            if not supervisor.cancelled() and (exc := supervisor.exception()) is not None:
                logger.error("device %s: connection supervisor failed", self.device_id, exc_info=exc)
        # Wake everyone waiting on this device; they see it is closed.
        self._settled.set()
        self._room.set()
        self._all_acked.set()

    # -- internals -----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

    def _send(self, session: _Session, outgoing: _Outgoing, key: int | None) -> None:
        message = Message(outgoing.topic, outgoing.payload, qos=1)
        message.dup = outgoing.sent
        session.tracker.expect(key)
        session.ids.pinned = outgoing.mid
        try:
            session.client.publish(message)
        finally:
            session.tracker.expect(None)
            session.ids.pinned = None
        outgoing.sent = True
        outgoing.mid = session.tracker.last_mid

    def _on_command_message(
        self, _client: object, topic: str, payload: bytes, _qos: int, _properties: object
    ) -> int:
        """A command arrived: answer it in a task (gmqtt has already acknowledged it)."""
        task = asyncio.create_task(self._answer_command(topic, payload), name=f"command {self.device_id}")
        self._command_tasks.add(task)
        task.add_done_callback(self._command_tasks.discard)
        return 0

    async def _answer_command(self, topic: str, payload: bytes) -> None:
        commands = self._commands
        if commands is None or self._closed:
            return
        ack = await commands.process(topic, payload)
        try:
            await self.publish_event("cmdack", ack.to_json())
        except (BrokerError, RuntimeError) as exc:  # closed or failed meanwhile
            logger.warning(
                "device %s: answer to command %s not sent: %s", self.device_id, ack.command_id, exc
            )

    def _on_puback(self, key: int) -> None:
        if self._outbox.pop(key, None) is None:
            return  # a duplicate's acknowledgement: counted already
        self._acknowledged += 1
        if not self._outbox:
            self._all_acked.set()
        if len(self._outbox) < self._max_unacked:
            self._room.set()

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self._reconnect_max, self._reconnect_min * 2.0 ** min(attempt, 30))
        return ceiling / 2 + _jitter.uniform(0, ceiling / 2)

    async def _supervise(self) -> None:
        try:
            await self._keep_connected()
        except Exception as exc:
            # A bug, not a network failure: make every waiter see it rather than hang.
            self._failure = BrokerError(f"device {self.device_id!r}: connection supervisor failed: {exc!r}")
            self._failure.__cause__ = exc
            self._settled.set()
            self._room.set()
            self._all_acked.set()
            raise

    async def _keep_connected(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            try:
                session = await self._open()
            except (OSError, TimeoutError, MQTTConnectError) as exc:
                refusal = self._refusal(exc)
                if refusal is not None and self._connections == 0:
                    self._failure = refusal
                    self._settled.set()
                    return
                delay = self._backoff(failures)
                level = logging.WARNING if failures == 0 else logging.DEBUG
                logger.log(
                    level,
                    "device %s: cannot connect to %s:%s (%s); retrying in %.2f s",
                    self.device_id,
                    self._host,
                    self._port,
                    str(exc) or type(exc).__name__,
                    delay,
                )
                failures += 1
                await asyncio.sleep(delay)
                continue
            if failures:
                logger.info("device %s: connected after %d failed attempts", self.device_id, failures)
            await self._serve(session)
            # A connection that stayed up a while resets the backoff; one that keeps dropping
            # right after CONNACK (say, the broker kicks it) backs off like a refused one.
            stable = loop.time() - session.opened_at >= self._reconnect_max
            failures = 0 if stable else failures + 1
            await asyncio.sleep(self._backoff(failures))

    def _refusal(self, exc: BaseException) -> DeviceRefusedError | None:
        if isinstance(exc, SSLCertVerificationError):
            return DeviceRefusedError(self.device_id, f"TLS certificate not trusted: {exc}")
        if isinstance(exc, MQTTConnectError) and exc.args and exc.args[0] in _REFUSED_FOR_GOOD:
            code = int(exc.args[0])
            return DeviceRefusedError(self.device_id, _REFUSED_FOR_GOOD[code], code)
        return None

    async def _open(self) -> _Session:
        session = _Session(
            client=None, tracker=_AckTracker(self._on_puback), ids=PinnedIds(), lost=asyncio.Event()
        )
        client = OneConnectionClient(
            self._cred.device_id,
            clean_session=False,
            will_message=Message(self._status_topic, _DISCONNECTED, qos=1),
            persistent_storage=session.tracker,
        )
        client.set_auth_credentials(self._cred.device_id, self._cred.password)
        use_packet_ids(client, session.ids)  # before connect: gmqtt hands it to the connection

        def on_connect(_client: object, flags: int, _rc: int, _properties: object) -> None:
            session.session_present = bool(flags)

        def on_disconnect(_client: object, _packet: object, _exc: object = None) -> None:
            session.lost.set()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        if self._commands is not None:
            client.on_message = self._on_command_message
            client.on_subscribe = lambda *_args: self._commands_ready.set()
        session.client = client
        try:
            async with asyncio.timeout(self._connect_timeout):
                await client.connect(
                    self._host,
                    self._port,
                    ssl=self._ssl or False,
                    keepalive=self._keepalive,
                    version=MQTTv311,
                )
        except BaseException:
            await self._shutdown(session)
            raise
        if not session.usable:
            raise ConnectionResetError("connection closed right after CONNACK")
        session.opened_at = asyncio.get_running_loop().time()
        return session

    async def _serve(self, session: _Session) -> None:
        """Announce the device, re-publish the outbox, and hold the connection until it drops."""
        self._session = session
        self._connections += 1
        resent = sum(1 for outgoing in self._outbox.values() if outgoing.sent)
        logger.info(
            "device %s: connected (session present: %s; resending %d, sending %d queued events)",
            self.device_id,
            session.session_present,
            resent,
            len(self._outbox) - resent,
        )
        session.ids.reserve({o.mid for o in self._outbox.values() if o.mid is not None})
        self._send(session, _Outgoing(self._status_topic, _CONNECTED), None)
        if self._commands is not None:
            self._commands_ready.clear()
            session.client.subscribe(self._command_filter, qos=1)
        for key, outgoing in list(self._outbox.items()):
            self._send(session, outgoing, key)
        self._settled.set()
        try:
            await session.lost.wait()
            logger.warning(
                "device %s: connection lost; %d unacknowledged events kept for resending",
                self.device_id,
                len(self._outbox),
            )
        finally:
            self._session = None
            await self._shutdown(session)

    @staticmethod
    async def _shutdown(session: _Session) -> None:
        """Disconnect cleanly if the connection is still open; a lost one needs nothing."""
        if session.client is None or session.lost.is_set():
            return
        with suppress(OSError, TimeoutError):
            async with asyncio.timeout(2.0):
                await session.client.disconnect()
