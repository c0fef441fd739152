"""The embedded MQTT broker over real sockets, with gmqtt (MQTT 3.1.1) playing the device.

A few checks speak raw MQTT over a socket, where gmqtt cannot misbehave on purpose (a client
that goes silent, a packet header that announces too much).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from gmqtt import Client, MQTTConnectError
from gmqtt.mqtt.constants import MQTTv311
from gmqtt.storage import PersistentStorage

from iotvault.broker.embedded import EmbeddedBroker, InboundPublish, TopicAction
from iotvault.errors import PortInUseError

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
TIMEOUT = 5.0
QUIET = 0.3  # how long "nothing happens" is watched for; localhost answers in milliseconds
NEVER = -2  # gmqtt reconnects while its failed attempts <= reconnect_retries; -1 is "always"
BROKER_LOGGER = "iotvault.broker.embedded"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # amqtt and gmqtt are asyncio libraries


class DupMarkingStorage(PersistentStorage):  # type: ignore[misc]
    """gmqtt 0.8 resends the stored bytes as they were, without the DUP flag that
    [MQTT-3.3.1-1] requires on a redelivery; this storage sets it, like a compliant device."""

    def get_all(self) -> list[tuple[int, bytes]]:
        return [(mid, bytes([package[0] | 0x08]) + bytes(package[1:])) for mid, package in super().get_all()]


class Device:
    """A gmqtt client, with what it observed kept for the test to look at."""

    def __init__(
        self,
        client_id: str,
        *,
        clean_session: bool = True,
        storage: PersistentStorage | None = None,
        reconnect_delay: float | None = None,
    ) -> None:
        self.storage = storage if storage is not None else PersistentStorage()
        self.client = Client(client_id, clean_session=clean_session, persistent_storage=self.storage)
        if reconnect_delay is None:  # no automatic reconnection, unless the test wants it
            self.client.set_config({"reconnect_retries": NEVER})
        else:
            self.client.set_config({"reconnect_delay": reconnect_delay})
        self.disconnected = asyncio.Event()
        self.unacked_when_disconnected: int | None = None
        self.messages: asyncio.Queue[tuple[str, bytes, int]] = asyncio.Queue()
        self.subacks: asyncio.Queue[tuple[int, ...]] = asyncio.Queue()
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_disconnect(self, client: Any, packet: Any, exc: Any = None) -> None:
        self.unacked_when_disconnected = len(self.storage.get_all())
        self.disconnected.set()

    def _on_message(self, client: Any, topic: str, payload: bytes, qos: int, properties: Any) -> int:
        self.messages.put_nowait((topic, payload, qos))
        return 0

    def _on_subscribe(self, client: Any, mid: int, qos: tuple[int, ...], properties: Any) -> None:
        self.subacks.put_nowait(tuple(qos))

    async def connect(self, port: int, username: str | None = None, password: str | None = None) -> None:
        if username is not None:
            self.client.set_auth_credentials(username, password)
        await asyncio.wait_for(self.client.connect(HOST, port, version=MQTTv311, keepalive=30), TIMEOUT)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> tuple[int, ...]:
        self.client.subscribe(topic_filter, qos=qos)
        return await asyncio.wait_for(self.subacks.get(), TIMEOUT)

    async def acknowledged(self) -> None:
        await asyncio.wait_for(self.storage.wait_empty(), TIMEOUT)

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # it may never have connected, or been refused
            await self.client.disconnect()


class Mqtt:
    """Makes brokers and devices; the devices disconnect before their broker stops, as they
    would in life (otherwise gmqtt schedules reconnects that outlive the test)."""

    def __init__(self) -> None:
        self._devices: list[Device] = []

    def device(self, client_id: str, **kwargs: Any) -> Device:
        device = Device(client_id, **kwargs)
        self._devices.append(device)
        return device

    @contextlib.asynccontextmanager
    async def broker(self, **kwargs: Any) -> AsyncIterator[EmbeddedBroker]:
        async with EmbeddedBroker(HOST, 0, **kwargs) as broker:
            try:
                yield broker
            finally:
                for device in self._devices:
                    await device.close()


@pytest.fixture
def mqtt() -> Mqtt:
    return Mqtt()


def connect_packet(client_id: str, keepalive: int) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02" + struct.pack("!HH", keepalive, len(cid)) + cid
    return bytes([0x10, len(body)]) + body


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def raw_connect(port: int, client_id: str, keepalive: int = 30) -> tuple[Any, Any]:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(connect_packet(client_id, keepalive))
    connack = await asyncio.wait_for(reader.readexactly(4), TIMEOUT)
    assert connack == b"\x20\x02\x00\x00", connack
    return reader, writer


@pytest.mark.parametrize("qos", [1, 2])
async def test_publish_is_acknowledged_and_forwarded_only_after_the_hook(mqtt: Mqtt, qos: int) -> None:
    called, release = asyncio.Event(), asyncio.Event()
    seen: list[InboundPublish] = []

    async def store(message: InboundPublish) -> None:
        seen.append(message)
        called.set()
        await release.wait()

    topic = f"iot-2/type/sensor/id/dev-1/evt/reading/fmt/json/q{qos}"
    async with mqtt.broker(on_publish=store) as broker:
        watcher = mqtt.device("watcher")
        await watcher.connect(broker.port)
        assert await watcher.subscribe(topic, qos=1) == (1,)
        device = mqtt.device("dev-1")
        await device.connect(broker.port, username="dev-1", password="secret")

        device.client.publish(topic, b'{"t": 21.5}', qos=qos)
        await asyncio.wait_for(called.wait(), TIMEOUT)
        await asyncio.sleep(QUIET)
        assert not device.storage.is_empty, "acknowledged before the hook finished"
        assert watcher.messages.empty(), "forwarded before the hook finished"

        release.set()
        await device.acknowledged()
        assert await asyncio.wait_for(watcher.messages.get(), TIMEOUT) == (topic, b'{"t": 21.5}', 1)

    [message] = seen
    assert message.client_id == "dev-1"
    assert message.username == "dev-1"
    assert message.topic == topic
    assert message.payload == b'{"t": 21.5}'
    assert message.qos == qos
    assert message.retain is False
    assert message.dup is False
    assert isinstance(message.packet_id, int)
    assert message.packet_id > 0


async def test_failing_hook_withholds_the_ack_and_the_resend_is_stored(
    mqtt: Mqtt, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[InboundPublish] = []

    async def store(message: InboundPublish) -> None:
        attempts.append(message)
        if len(attempts) == 1:
            raise ConnectionError("database unavailable")

    topic = "iot-2/type/sensor/id/dev-2/evt/reading/fmt/json"
    payload = b'{"secret-reading": 42}'
    async with mqtt.broker(on_publish=store) as broker:
        # A persistent session, as a device that wants redelivery uses [MQTT-4.4.0-1].
        device = mqtt.device("dev-2", clean_session=False, storage=DupMarkingStorage(), reconnect_delay=0.1)
        await device.connect(broker.port)
        device.client.publish(topic, payload, qos=1)

        await asyncio.wait_for(device.disconnected.wait(), TIMEOUT)
        assert device.unacked_when_disconnected == 1, "the failed message was acknowledged"
        await device.acknowledged()  # after the automatic reconnect and resend

    first, second = attempts
    assert (first.topic, first.payload, first.dup) == (topic, payload, False)
    assert (second.topic, second.payload, second.dup) == (topic, payload, True)
    assert second.packet_id == first.packet_id
    warnings = [r for r in caplog.records if r.name == BROKER_LOGGER and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "dev-2" in warnings[0].getMessage()
    assert all("secret-reading" not in r.getMessage() for r in caplog.records)


def publish_packet(topic: str, payload: bytes, qos: int, packet_id: int = 7) -> bytes:
    packet_id_field = struct.pack("!H", packet_id) if qos else b""
    body = struct.pack("!H", len(topic)) + topic.encode() + packet_id_field + payload
    return bytes([0x30 | qos << 1]) + remaining_length(len(body)) + body


async def nothing_arrives(reader: asyncio.StreamReader) -> bool:
    try:
        await asyncio.wait_for(reader.read(1), QUIET)
    except TimeoutError:
        return True
    return False


@pytest.mark.parametrize("qos", [0, 1])
async def test_the_hook_runs_to_completion_when_the_device_leaves_meanwhile(
    qos: int, caplog: pytest.LogCaptureFixture
) -> None:
    # A device that publishes and disconnects at once (QoS 0, typically): the event is stored.
    called, release, done = asyncio.Event(), asyncio.Event(), asyncio.Event()
    finished: list[bytes] = []

    async def store(message: InboundPublish) -> None:
        called.set()
        await release.wait()
        finished.append(message.payload)
        done.set()

    async with EmbeddedBroker(HOST, 0, on_publish=store) as broker:
        reader, writer = await raw_connect(broker.port, "dev-12")
        writer.write(publish_packet("iot-2/type/sensor/id/dev-12/evt/e/fmt/json", b"{}", qos))
        writer.write(b"\xe0\x00")  # DISCONNECT
        await asyncio.wait_for(called.wait(), TIMEOUT)
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # the broker closed it
        writer.close()
        await asyncio.sleep(QUIET)  # amqtt has ended the session
        release.set()
        await asyncio.wait_for(done.wait(), TIMEOUT)
    assert finished == [b"{}"]
    # nothing went wrong; what the start says of the machine (a `ulimit -n` of 1024, as a
    # user's shell often has, lowers the connection limit) is not about this device
    warned = [
        r for r in caplog.records if r.levelno >= logging.WARNING and r.name != "iotvault.broker.limits"
    ]
    assert [r.getMessage() for r in warned] == []


async def test_a_hook_may_hand_over_a_future_and_its_outcome_decides_the_ack() -> None:
    # iotvault's own hook returns the ingest pipeline's future rather than a coroutine.
    pending: asyncio.Queue[asyncio.Future[object]] = asyncio.Queue()

    def store(message: InboundPublish) -> asyncio.Future[object]:
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        pending.put_nowait(future)
        return future

    topic = "iot-2/type/sensor/id/dev-13/evt/e/fmt/json"
    async with EmbeddedBroker(HOST, 0, on_publish=store) as broker:
        reader, writer = await raw_connect(broker.port, "dev-13")
        writer.write(publish_packet(topic, b"{}", 1, packet_id=7))
        writer.write(publish_packet(topic, b"{}", 1, packet_id=8))
        first = await asyncio.wait_for(pending.get(), TIMEOUT)
        second = await asyncio.wait_for(pending.get(), TIMEOUT)
        assert await nothing_arrives(reader), "acknowledged before the hook finished"
        second.set_result("stored")  # hooks may finish, and be acknowledged, out of order
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"\x40\x02\x00\x08"
        first.set_exception(ConnectionError("database unavailable"))
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"", "a failed message was acknowledged"
        writer.close()


async def test_a_hook_that_raises_at_once_withholds_the_ack() -> None:
    def store(message: InboundPublish) -> asyncio.Future[object]:
        raise RuntimeError("not ready")

    async with EmbeddedBroker(HOST, 0, on_publish=store) as broker:
        reader, writer = await raw_connect(broker.port, "dev-14")
        writer.write(publish_packet("iot-2/type/sensor/id/dev-14/evt/e/fmt/json", b"{}", 1))
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()


async def test_a_subscription_made_while_the_hook_runs_still_receives_the_message(mqtt: Mqtt) -> None:
    called, release = asyncio.Event(), asyncio.Event()

    async def store(message: InboundPublish) -> None:
        called.set()
        await release.wait()

    topic = "iot-2/type/sensor/id/dev-15/evt/reading/fmt/json"
    async with mqtt.broker(on_publish=store) as broker:
        device = mqtt.device("dev-15")
        await device.connect(broker.port)
        device.client.publish(topic, b"{}", qos=1)
        await asyncio.wait_for(called.wait(), TIMEOUT)  # nobody subscribed yet
        watcher = mqtt.device("watcher-15")
        await watcher.connect(broker.port)
        assert await watcher.subscribe("iot-2/type/sensor/id/+/evt/#", qos=1) == (1,)
        release.set()
        await device.acknowledged()
        assert await asyncio.wait_for(watcher.messages.get(), TIMEOUT) == (topic, b"{}", 1)


async def test_a_client_that_sends_its_packets_with_the_connect_is_served() -> None:
    stored: list[bytes] = []

    async def store(message: InboundPublish) -> None:
        stored.append(message.payload)

    topic = "iot-2/type/sensor/id/dev-16/evt/e/fmt/json"
    async with EmbeddedBroker(HOST, 0, on_publish=store) as broker:
        reader, writer = await asyncio.open_connection(HOST, broker.port)
        writer.write(connect_packet("dev-16", 30) + publish_packet(topic, b"[1]", 1, packet_id=1))
        writer.write(publish_packet(topic, b"[2]", 1, packet_id=2))
        answer = await asyncio.wait_for(reader.readexactly(12), TIMEOUT)
        assert answer[:4] == b"\x20\x02\x00\x00"  # CONNACK
        assert sorted([answer[4:8], answer[8:12]]) == [b"\x40\x02\x00\x01", b"\x40\x02\x00\x02"]
        writer.close()
    assert sorted(stored) == [b"[1]", b"[2]"]


async def test_a_client_that_keeps_talking_within_its_keepalive_stays() -> None:
    async with EmbeddedBroker(HOST, 0) as broker:
        reader, writer = await raw_connect(broker.port, "dev-17", keepalive=1)
        for _ in range(4):  # 2 s: beyond 1.5 x keep-alive
            await asyncio.sleep(0.5)
            writer.write(b"\xc0\x00")  # PINGREQ
            assert await asyncio.wait_for(reader.readexactly(2), TIMEOUT) == b"\xd0\x00"  # PINGRESP
        writer.close()


async def test_authenticate_refuses_a_bad_password(mqtt: Mqtt) -> None:
    asked: list[tuple[str, str | None, str | None]] = []
    presence: list[tuple[str, str | None, bool]] = []

    async def authenticate(client_id: str, username: str | None, password: str | None) -> bool:
        asked.append((client_id, username, password))
        return password == "right"

    async def on_connection(client_id: str, username: str | None, connected: bool) -> None:
        presence.append((client_id, username, connected))

    async with mqtt.broker(authenticate=authenticate, on_connection=on_connection) as broker:
        intruder = mqtt.device("dev-3")
        with pytest.raises(MQTTConnectError):
            await intruder.connect(broker.port, username="dev-3", password="wrong")
        assert asked == [("dev-3", "dev-3", "wrong")]
        assert presence == []

        device = mqtt.device("dev-3")
        await device.connect(broker.port, username="dev-3", password="right")
        assert presence == [("dev-3", "dev-3", True)]


async def test_refused_client_cannot_disturb_a_connected_device(mqtt: Mqtt) -> None:
    # amqtt on its own authenticates late: a CONNECT with the wrong password would first take
    # over the device's persistent session (disconnecting it), or delete it (clean session).
    stored: list[InboundPublish] = []
    presence: list[bool] = []

    async def authenticate(client_id: str, username: str | None, password: str | None) -> bool:
        return password == "right"

    async def store(message: InboundPublish) -> None:
        stored.append(message)

    async def on_connection(client_id: str, username: str | None, connected: bool) -> None:
        presence.append(connected)

    command_topic = "iot-2/type/sensor/id/dev-4/cmd/reboot/fmt/json"
    async with mqtt.broker(
        authenticate=authenticate, on_publish=store, on_connection=on_connection
    ) as broker:
        device = mqtt.device("dev-4", clean_session=False)
        await device.connect(broker.port, username="dev-4", password="right")
        assert await device.subscribe(command_topic) == (1,)
        for clean_session in (False, True):
            intruder = mqtt.device("dev-4", clean_session=clean_session)
            with pytest.raises(MQTTConnectError):
                await intruder.connect(broker.port, username="dev-4", password="wrong")

        await broker.publish(command_topic, b"{}")
        assert await asyncio.wait_for(device.messages.get(), TIMEOUT) == (command_topic, b"{}", 1)
        device.client.publish("iot-2/type/sensor/id/dev-4/evt/reading/fmt/json", b"{}", qos=1)
        await device.acknowledged()
        assert not device.disconnected.is_set()
        assert [m.client_id for m in stored] == ["dev-4"]
        assert presence == [True]


async def test_authorize_refuses_forbidden_publish_and_subscribe(mqtt: Mqtt) -> None:
    asked: list[tuple[str, str | None, str, TopicAction]] = []
    stored: list[InboundPublish] = []

    async def authorize(client_id: str, username: str | None, topic: str, action: TopicAction) -> bool:
        asked.append((client_id, username, topic, action))
        return topic.startswith(f"own/{client_id}/")

    async def store(message: InboundPublish) -> None:
        stored.append(message)

    async with mqtt.broker(on_publish=store, authorize=authorize) as broker:
        subscriber = mqtt.device("dev-5")
        await subscriber.connect(broker.port)
        assert await subscriber.subscribe("own/dev-6/#") == (0x80,)
        assert await subscriber.subscribe("own/dev-5/#") == (1,)

        publisher = mqtt.device("dev-6")
        await publisher.connect(broker.port)
        publisher.client.publish("own/dev-5/cmd", b"{}", qos=1)
        await asyncio.wait_for(publisher.disconnected.wait(), TIMEOUT)
        assert publisher.unacked_when_disconnected == 1
        await asyncio.sleep(QUIET)
        assert subscriber.messages.empty()

        allowed = mqtt.device("dev-5b")
        await allowed.connect(broker.port)
        allowed.client.publish("own/dev-5b/evt", b"{}", qos=1)
        await allowed.acknowledged()

    assert [m.topic for m in stored] == ["own/dev-5b/evt"]
    assert ("dev-5", None, "own/dev-6/#", "subscribe") in asked
    assert ("dev-6", None, "own/dev-5/cmd", "publish") in asked


async def test_reconnecting_client_replaces_its_previous_connection(mqtt: Mqtt) -> None:
    # A device that lost its network connects again before the broker noticed [MQTT-3.1.4-2].
    presence: list[bool] = []

    async def on_connection(client_id: str, username: str | None, connected: bool) -> None:
        presence.append(connected)

    command_topic = "iot-2/type/sensor/id/dev-11/cmd/reboot/fmt/json"
    async with mqtt.broker(on_connection=on_connection) as broker:
        before = mqtt.device("dev-11", clean_session=False)
        await before.connect(broker.port)
        assert await before.subscribe(command_topic) == (1,)

        after = mqtt.device("dev-11", clean_session=False)
        await after.connect(broker.port)
        await asyncio.wait_for(before.disconnected.wait(), TIMEOUT)
        await broker.publish(command_topic, b"{}")
        assert await asyncio.wait_for(after.messages.get(), TIMEOUT) == (command_topic, b"{}", 1)
        assert not after.disconnected.is_set()
        assert presence == [True]


async def test_on_connection_sees_connect_and_disconnect(mqtt: Mqtt) -> None:
    presence: asyncio.Queue[tuple[str, str | None, bool]] = asyncio.Queue()

    async def on_connection(client_id: str, username: str | None, connected: bool) -> None:
        presence.put_nowait((client_id, username, connected))

    async with mqtt.broker(on_connection=on_connection) as broker:
        device = mqtt.device("dev-7")
        await device.connect(broker.port, username="dev-7", password="x")
        assert await asyncio.wait_for(presence.get(), TIMEOUT) == ("dev-7", "dev-7", True)
        await device.client.disconnect()
        assert await asyncio.wait_for(presence.get(), TIMEOUT) == ("dev-7", "dev-7", False)


async def test_silent_client_is_dropped_after_one_and_a_half_keepalives() -> None:
    presence: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()

    async def on_connection(client_id: str, username: str | None, connected: bool) -> None:
        presence.put_nowait((client_id, connected))

    async with EmbeddedBroker(HOST, 0, on_connection=on_connection) as broker:
        reader, writer = await raw_connect(broker.port, "dev-8", keepalive=1)
        assert await asyncio.wait_for(presence.get(), TIMEOUT) == ("dev-8", True)
        loop = asyncio.get_running_loop()
        silent_since = loop.time()
        assert await asyncio.wait_for(presence.get(), TIMEOUT) == ("dev-8", False)
        assert loop.time() - silent_since >= 1.0
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # the broker closed it
        writer.close()


async def test_oversized_packet_is_refused_from_its_header() -> None:
    stored: list[InboundPublish] = []

    async def store(message: InboundPublish) -> None:
        stored.append(message)

    async with EmbeddedBroker(HOST, 0, on_publish=store, max_packet_size=1024) as broker:
        reader, writer = await raw_connect(broker.port, "dev-9")
        topic = b"\x00\x01t"
        # A QoS 1 PUBLISH that announces 10 MiB; the body is never sent.
        writer.write(b"\x32" + remaining_length(10 * 1024 * 1024) + topic + b"\x00\x01")
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()

        # Exactly at the limit is fine: 1 + 2 (fixed header) + 3 (topic) + 2 (packet id) + payload.
        reader, writer = await raw_connect(broker.port, "dev-9b")
        payload = b"x" * (1024 - 1 - 2 - len(topic) - 2)
        body = topic + b"\x00\x01" + payload
        packet = b"\x32" + remaining_length(len(body)) + body
        assert len(packet) == 1024
        writer.write(packet)
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"\x40\x02\x00\x01"  # PUBACK
        writer.close()

    assert [m.payload for m in stored] == [payload]


async def test_port_in_use_raises_port_in_use_error(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=rf"\b{port}\b") as caught:
            async with EmbeddedBroker(HOST, port):
                pass
    assert caught.value.port == port
    assert caught.value.setting == "IOTVAULT_MQTT_PORT"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_publish_from_the_broker_reaches_a_subscriber(mqtt: Mqtt) -> None:
    topic = "iot-2/type/sensor/id/dev-10/cmd/reboot/fmt/json"
    async with mqtt.broker() as broker:
        device = mqtt.device("dev-10")
        await device.connect(broker.port)
        assert await device.subscribe(topic, qos=1) == (1,)
        await broker.publish(topic, b'{"delay": 0}', qos=1)
        assert await asyncio.wait_for(device.messages.get(), TIMEOUT) == (topic, b'{"delay": 0}', 1)


async def test_only_iotvaults_own_amqtt_plugins_are_loaded() -> None:
    async with EmbeddedBroker(HOST, 0) as broker:
        assert broker._core is not None
        plugins = {type(p).__module__ for p in broker._core._broker.plugins_manager.plugins}
    assert plugins == {"iotvault.broker.amqtt_adapter"}
