"""Contract tests of every private gmqtt touch (:mod:`iotvault.adapters.gmqtt`), on a real Mosquitto.

Each test names the touch it pins. When a gmqtt upgrade changes one of these internals, the
test of that touch fails here, loudly, instead of ingest losing an acknowledgement or a device
resending under a new packet id. The version check itself is tested first.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path
from typing import Any

import gmqtt
import pytest
from gmqtt.mqtt.constants import MQTTv50, MQTTv311
from helpers import Mosquitto

from iotvault.adapters import gmqtt as adapter
from iotvault.errors import UnsupportedLibraryError

HOST = "127.0.0.1"
# MQTT 5 PUBACK, reason code 0, no properties; MQTT DISCONNECT (makes the broker drop us)
_PUBACK = struct.Struct("!BBHBB")
_DISCONNECT = b"\xe0\x00"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # gmqtt is asyncio-only


def test_the_installed_gmqtt_is_the_supported_minor() -> None:
    adapter.check_version.cache_clear()
    assert adapter.check_version() == metadata.version("gmqtt")


def test_another_minor_is_refused_with_one_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapter.metadata, "version", lambda _name: "0.9.1")
    adapter.check_version.cache_clear()
    try:
        with pytest.raises(UnsupportedLibraryError) as caught:
            adapter.check_version()
        assert (caught.value.library, caught.value.installed, caught.value.supported) == (
            "gmqtt",
            "0.9.1",
            "0.8.*",
        )
        assert "gmqtt==0.8.*" in str(caught.value)
        with pytest.raises(UnsupportedLibraryError):
            adapter.OneConnectionClient("refused")  # a touch refuses to run on it
    finally:
        adapter.check_version.cache_clear()


def topic() -> str:
    return f"contract/{uuid.uuid4().hex}"


async def subscribed(client: gmqtt.Client, topic_filter: str) -> None:
    done = asyncio.Event()
    client.on_subscribe = lambda *_args: done.set()
    client.subscribe(topic_filter, qos=1)
    await asyncio.wait_for(done.wait(), 5)


@pytest.fixture
async def publisher(mosquitto: Mosquitto) -> AsyncIterator[gmqtt.Client]:
    client = gmqtt.Client(f"contract-pub-{uuid.uuid4().hex[:8]}")
    await client.connect(HOST, mosquitto.port, version=MQTTv311)
    yield client
    await client.disconnect()


async def qos1_subscriber(port: int, client_id: str, received: list[tuple[Any, ...]]) -> gmqtt.Client:
    """A persistent MQTT 5 session whose QoS 1 messages go to ``take_qos1``'s handler."""
    client = gmqtt.Client(
        client_id, clean_session=False, optimistic_acknowledgement=False, session_expiry_interval=300
    )
    client.on_message = lambda *_args: pytest.fail("a QoS 1 message reached on_message")

    def handler(mid: int, payload: bytes, topic: str, properties: dict[str, Any]) -> None:
        received.append((mid, payload, topic, properties.get("dup")))

    adapter.take_qos1(client, handler)
    await client.connect(HOST, port, version=MQTTv50)
    return client


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a poll with a bound
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - gmqtt's callbacks set no event we could await
            await asyncio.sleep(0.02)


async def test_take_qos1_and_write_raw_the_acknowledgement_is_ours_to_send(
    mosquitto: Mosquitto, publisher: gmqtt.Client
) -> None:
    """Touches ``_package_handler._handle_qos_1_publish_packet`` and ``_connection._protocol.write_data``.

    The handler gets (packet id, payload, topic, properties with ``dup``); gmqtt itself sends
    no PUBACK, so the broker redelivers (DUP) until :func:`write_raw` writes one.
    """
    name, client_id = topic(), f"contract-sub-{uuid.uuid4().hex[:8]}"
    received: list[tuple[Any, ...]] = []
    sub = await qos1_subscriber(mosquitto.port, client_id, received)
    await subscribed(sub, name)
    publisher.publish(name, b"first", qos=1)
    await wait_for(lambda: len(received) == 1)
    mid, payload, got_topic, dup = received[0]
    assert (payload, got_topic, dup) == (b"first", name, 0)
    assert 1 <= mid <= 65535
    await sub.disconnect()  # without a PUBACK

    again: list[tuple[Any, ...]] = []
    sub = await qos1_subscriber(mosquitto.port, client_id, again)
    await wait_for(lambda: len(again) == 1)
    assert again[0][1:] == (b"first", name, 1)  # redelivered, DUP set: gmqtt sent no PUBACK
    assert adapter.write_raw(sub, _PUBACK.pack(0x40, 4, again[0][0], 0, 0)) is True
    await asyncio.sleep(0.2)
    await sub.disconnect()

    after: list[tuple[Any, ...]] = []
    sub = await qos1_subscriber(mosquitto.port, client_id, after)
    await asyncio.sleep(0.5)
    assert after == []  # our PUBACK counted
    await sub.disconnect()
    assert adapter.write_raw(gmqtt.Client("never-connected"), b"") is False  # no connection yet


class RecordingStore:
    """An :class:`~iotvault.adapters.gmqtt.InflightStore` that records gmqtt's calls."""

    def __init__(self) -> None:
        self.pushed: list[int] = []
        self.removed: list[int] = []

    def push_message(self, mid: int, raw_package: bytes) -> None:
        self.pushed.append(mid)

    def remove_message_by_mid(self, mid: int) -> None:
        self.removed.append(mid)

    def get_all(self) -> list[tuple[int, bytes]]:
        return []

    def clear(self) -> None:
        pass

    @property
    def is_empty(self) -> bool:
        return len(self.pushed) == len(self.removed)

    async def wait_empty(self) -> None:
        return None


async def test_pinned_packet_ids_and_the_inflight_store(mosquitto: Mosquitto) -> None:
    """Touches ``_package_handler.id_generator``, ``IdGenerator._used_ids`` and the storage calls.

    A pinned id is the id the PUBLISH carries; gmqtt tells the store of it on publish and
    removes it on the broker's PUBACK; a reserved id is never drawn.
    """
    store, ids = RecordingStore(), adapter.PinnedIds()
    client = adapter.OneConnectionClient(f"contract-dev-{uuid.uuid4().hex[:8]}", persistent_storage=store)
    adapter.use_packet_ids(client, ids)
    await client.connect(HOST, mosquitto.port, version=MQTTv311)
    try:
        ids.pinned = 4242
        client.publish(gmqtt.Message(topic(), b"pinned", qos=1))
        await wait_for(lambda: store.removed == [4242])
        assert store.pushed == [4242]
        ids.reserve({1, 2})
        client.publish(gmqtt.Message(topic(), b"drawn", qos=1))
        await wait_for(lambda: len(store.removed) == 2)
        assert store.pushed[1] not in (1, 2, 4242)
        assert store.removed == store.pushed
    finally:
        await client.disconnect()


async def test_one_connection_client_never_reconnects_by_itself(mosquitto: Mosquitto) -> None:
    """Touches ``Client.reconnect``: gmqtt's way back after a lost connection goes through it."""
    connects: list[int] = []
    client = adapter.OneConnectionClient(f"contract-once-{uuid.uuid4().hex[:8]}")
    client.on_connect = lambda *_args: connects.append(1)
    client.set_config({"reconnect_delay": 0})
    await client.connect(HOST, mosquitto.port, version=MQTTv311)
    assert adapter.write_raw(client, _DISCONNECT)  # the broker closes the connection
    await wait_for(lambda: not client.is_connected)
    await asyncio.sleep(0.5)
    assert connects == [1]
    assert not client.is_connected
    await client.disconnect()

    # the control: a plain client with the same settings does reconnect, so the test can fail
    plain = gmqtt.Client(f"contract-plain-{uuid.uuid4().hex[:8]}")
    plain_connects: list[int] = []
    plain.on_connect = lambda *_args: plain_connects.append(1)
    plain.set_config({"reconnect_delay": 0})
    await plain.connect(HOST, mosquitto.port, version=MQTTv311)
    adapter.write_raw(plain, _DISCONNECT)
    await wait_for(lambda: len(plain_connects) == 2)
    await plain.disconnect()


async def test_no_reconnect_setting_keeps_a_client_down(mosquitto: Mosquitto) -> None:
    """Touches the meaning of ``reconnect_retries``: :data:`NO_RECONNECT` allows no attempt."""
    connects: list[int] = []
    client = gmqtt.Client(f"contract-noretry-{uuid.uuid4().hex[:8]}")
    client.on_connect = lambda *_args: connects.append(1)
    client.set_config({"reconnect_retries": adapter.NO_RECONNECT, "reconnect_delay": 0})
    await client.connect(HOST, mosquitto.port, version=MQTTv311)
    adapter.write_raw(client, _DISCONNECT)
    await wait_for(lambda: not client.is_connected)
    await asyncio.sleep(0.5)
    assert connects == [1]
    await client.disconnect()


GMQTT_PRIVATE_NAMES = (
    "_package_handler",
    "_handle_qos_1_publish_packet",
    "_protocol",
    "_used_ids",
    "id_generator",
    "IdGenerator",
    "_connection_state",
)


def test_no_private_gmqtt_name_is_used_outside_the_adapter() -> None:
    """The adapter is the only place that reaches past gmqtt's public API (a new touch goes there).

    Every module that imports gmqtt is read for gmqtt's private names.
    """
    src = Path(adapter.__file__).resolve().parents[1]
    users = [
        p for p in src.rglob("*.py") if "import gmqtt" in (text := p.read_text()) or "from gmqtt" in text
    ]
    assert len(users) >= 4  # ingest, the command publisher, the device connection, the adapter
    offenders = [
        f"{path.relative_to(src.parent)}: {name}"
        for path in users
        if path != Path(adapter.__file__).resolve()
        for name in GMQTT_PRIVATE_NAMES
        if name in path.read_text(encoding="utf-8")
    ]
    assert offenders == []
