"""Simulated devices against a real Mosquitto: topics, payloads, acknowledgements, restarts.

Each test starts its own ``mosquitto`` on a free port and uses its own typeId, so tests never
see each other's messages. Without the binary the tests skip, except under CI (``CI=true``),
where they fail: the at-least-once guarantee must not go untested.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from gmqtt import Client, Subscription
from gmqtt.mqtt.constants import MQTTv311
from helpers import require_mosquitto

from iotvault.device import DeviceConnection
from iotvault.domain.topics import EventTopic, StatusTopic, parse_topic
from iotvault.errors import ValidationError
from iotvault.simulator import (
    DeviceCredential,
    DeviceRefusedError,
    SimulationPlan,
    make_payload,
    run_simulation,
)

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

HOST = "127.0.0.1"
PASSWORD = "not-a-real-credential"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # gmqtt is asyncio-only


# -- a real broker ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mosquitto_binary() -> str:
    return require_mosquitto()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Mosquitto:
    """One mosquitto process on a fixed port that a test can pause, kill and start again."""

    def __init__(self, binary: str, workdir: Path, *, persistent: bool = False, anonymous: bool = True):
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        self.db = workdir / "mosquitto.db"
        self.log = workdir / "mosquitto.log"
        self.config = workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {HOST}",
            f"allow_anonymous {'true' if anonymous else 'false'}",
            # Run as whoever runs the tests (only applies when that is root, which mosquitto
            # would otherwise leave for a "mosquitto" user that cannot write workdir).
            f"user {getpass.getuser()}",
        ]
        if persistent:
            # Save after every change, so that a SIGKILL loses (almost) nothing the broker had.
            lines += [
                "persistence true",
                f"persistence_location {workdir}{os.sep}",
                "autosave_on_changes true",
                "autosave_interval 1",
            ]
        else:
            lines.append("persistence false")
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mosquitto exited with {self.proc.returncode}:\n{self.log.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=0.5):
                return
            time.sleep(0.02)
        pytest.fail(f"mosquitto did not listen on port {self.port}:\n{self.log.read_text()}")

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def pause(self) -> None:
        """SIGSTOP: connections stay open, but nothing is read or acknowledged."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: no goodbye, no will messages, no final save."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def broker(mosquitto_binary: str, tmp_path: Path) -> Iterator[Mosquitto]:
    mosquitto = Mosquitto(mosquitto_binary, tmp_path)
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


# -- a subscriber that records what arrives --------------------------------------------------


class Subscriber:
    """A gmqtt QoS 1 subscriber that records every message and reconnects by itself."""

    def __init__(self, port: int, filters: list[str], *, client_id: str, persistent: bool = False):
        self.port = port
        self.filters = filters
        self.messages: list[tuple[str, bytes]] = []
        self._subscribed = asyncio.Event()
        self._arrived = asyncio.Event()
        self.client = Client(client_id, clean_session=not persistent)
        self.client.reconnect_delay = 0.2
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()

    def _on_message(self, _client: object, topic: str, payload: bytes, _qos: int, _props: object) -> int:
        self.messages.append((topic, payload))
        self._arrived.set()
        return 0

    async def start(self) -> None:
        await self.client.connect(HOST, self.port, keepalive=10, version=MQTTv311)
        self.client.subscribe([Subscription(f, qos=1) for f in self.filters])
        async with asyncio.timeout(10):
            await self._subscribed.wait()

    async def stop(self) -> None:
        await self.client.disconnect()

    def events(self) -> dict[str, list[int]]:
        """The ``seq`` numbers received, per device, in arrival order."""
        seqs: dict[str, list[int]] = {}
        for topic, payload in self.messages:
            parsed = parse_topic(topic)
            if isinstance(parsed, EventTopic):
                seqs.setdefault(parsed.device_id, []).append(json.loads(payload)["d"]["seq"])
        return seqs

    def statuses(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for topic, payload in self.messages:
            parsed = parse_topic(topic)
            if isinstance(parsed, StatusTopic):
                found.setdefault(parsed.device_id, []).append(json.loads(payload)["status"])
        return found

    async def wait_until(self, condition: Callable[[], bool], within: float = 20.0) -> None:
        """Wait until *condition* holds or *within* seconds pass; the caller asserts after."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while not condition():
                    self._arrived.clear()
                    await self._arrived.wait()


@contextlib.asynccontextmanager
async def subscribed(
    port: int, type_id: str, *, persistent: bool = False, events_only: bool = False
) -> AsyncIterator[Subscriber]:
    filters = [f"iot-2/type/{type_id}/id/+/evt/+/fmt/+"]
    if not events_only:
        filters.append(f"iot-2/type/{type_id}/id/+/mon")
    subscriber = Subscriber(port, filters, client_id=f"{type_id}-subscriber", persistent=persistent)
    await subscriber.start()
    try:
        yield subscriber
    finally:
        await subscriber.stop()


def fleet(type_id: str, n: int) -> list[DeviceCredential]:
    return [DeviceCredential(f"{type_id}-dev{i}", type_id, PASSWORD) for i in range(n)]


def seeded(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311  # reproducible test data, not a secret


def unique_type() -> str:
    return f"sim{uuid.uuid4().hex[:10]}"


# -- tests -----------------------------------------------------------------------------------


async def test_events_and_status_arrive_on_the_contract_topics(broker: Mosquitto) -> None:
    type_id = unique_type()
    devices, count = fleet(type_id, 3), 5
    progress: list[tuple[int, int]] = []
    async with subscribed(broker.port, type_id) as subscriber:
        report = await run_simulation(
            HOST,
            broker.port,
            SimulationPlan(devices, rate=50, count=count, event_type="env"),
            on_progress=lambda published, acked: progress.append((published, acked)),
            ack_timeout=30,
        )
        await subscriber.wait_until(
            lambda: (
                sum(map(len, subscriber.statuses().values())) == 2 * len(devices)
                and sum(map(len, subscriber.events().values())) == len(devices) * count
            )
        )

    assert report.published == report.acknowledged == len(devices) * count
    assert report.complete
    assert report.elapsed > 0
    assert progress[-1] == (report.published, report.acknowledged)
    assert progress == sorted(progress), "progress never goes backwards"

    events = [(t, p) for t, p in subscriber.messages if "/evt/" in t]
    for topic, payload in events:
        parsed = parse_topic(topic)
        assert isinstance(parsed, EventTopic)
        assert (parsed.type_id, parsed.event_type, parsed.fmt) == (type_id, "env", "json")
        assert b" " not in payload, "compact JSON"
        body = json.loads(payload)
        assert set(body) == {"d", "ts"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["ts"])
    assert subscriber.events() == {cred.device_id: list(range(count)) for cred in devices}
    # "connected" after the connect, "disconnected" from the clean close.
    assert subscriber.statuses() == {cred.device_id: ["connected", "disconnected"] for cred in devices}


async def test_an_event_counts_as_acknowledged_only_once_the_broker_acks_it(broker: Mosquitto) -> None:
    cred = fleet(unique_type(), 1)[0]
    device = DeviceConnection(cred, HOST, broker.port)
    try:
        await device.connect()
        broker.pause()
        try:
            for seq in range(3):
                await device.publish_event("status", make_payload(cred.device_id, seq, seeded(seq)))
            assert not await device.wait_acknowledged(timeout=0.5)
            assert (device.published, device.acknowledged) == (3, 0)
        finally:
            broker.resume()
        assert await device.wait_acknowledged(timeout=10)
        assert (device.published, device.acknowledged) == (3, 3)
    finally:
        await device.close()


@pytest.mark.slow
@pytest.mark.parametrize("broker_forgets", [False, True], ids=["broker-remembers", "broker-forgets"])
async def test_no_event_is_lost_when_the_broker_is_killed_mid_run(
    mosquitto_binary: str, tmp_path: Path, broker_forgets: bool
) -> None:
    """SIGKILL the broker while events are in flight, start it again on the same port.

    The broker is paused first, so some events are certainly sent but never acknowledged when
    it dies. "broker-forgets" restarts it from a snapshot taken before the devices connected:
    it has no session for them (CONNACK session present = 0, where gmqtt alone would drop its
    unacknowledged messages). The subscriber's session and subscription are in both, so it
    sees what the devices re-publish even before it has reconnected itself.
    """
    broker = Mosquitto(mosquitto_binary, tmp_path, persistent=True)
    await asyncio.to_thread(broker.start)
    type_id = unique_type()
    devices, count = fleet(type_id, 5), 30
    try:
        # Leave a subscription on disk (a clean stop saves it), and keep it for "forgets".
        async with subscribed(broker.port, type_id, persistent=True):
            pass
        await asyncio.to_thread(broker.stop)
        snapshot = broker.db.read_bytes()
        await asyncio.to_thread(broker.start)
        async with subscribed(broker.port, type_id, persistent=True) as subscriber:
            run = asyncio.create_task(
                run_simulation(
                    HOST, broker.port, SimulationPlan(devices, rate=10, count=count), ack_timeout=60
                )
            )
            await asyncio.sleep(1.0)
            broker.pause()
            await asyncio.sleep(0.5)  # the devices go on sending into the void
            await asyncio.to_thread(broker.kill)
            if broker_forgets:
                broker.db.write_bytes(snapshot)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(broker.start)

            async with asyncio.timeout(90):
                report = await run
            expected = {cred.device_id: set(range(count)) for cred in devices}
            await subscriber.wait_until(
                lambda: {d: set(s) for d, s in subscriber.events().items()} == expected, within=30
            )
    finally:
        broker.stop()

    assert report.published == report.acknowledged == len(devices) * count
    seen = subscriber.events()
    missing = {d: sorted(want - set(seen.get(d, []))) for d, want in expected.items()}
    assert not any(missing.values()), f"never delivered: {missing}"
    for cred in devices:
        # Connected before the kill and again after it.
        assert subscriber.statuses()[cred.device_id].count("connected") >= 2


async def test_the_will_says_disconnected_when_the_connection_is_lost(broker: Mosquitto) -> None:
    type_id = unique_type()
    cred = fleet(type_id, 1)[0]
    async with subscribed(broker.port, type_id) as subscriber:
        async with DeviceConnection(cred, HOST, broker.port) as device:
            # Another client with the device's id takes the session over: the broker drops the
            # device's connection without a DISCONNECT and publishes its will.
            intruder = Client(cred.device_id)
            await intruder.connect(HOST, broker.port, version=MQTTv311)
            await intruder.disconnect()
            await subscriber.wait_until(lambda: len(subscriber.statuses().get(cred.device_id, [])) >= 3)
            await device.publish_event("status", {"d": {"seq": 0}})
            assert await device.wait_acknowledged(timeout=10)
            assert device.connections == 2
        await subscriber.wait_until(lambda: len(subscriber.statuses()[cred.device_id]) >= 4)
    assert subscriber.statuses()[cred.device_id] == ["connected", "disconnected", "connected", "disconnected"]


async def test_connect_waits_for_a_broker_that_starts_later(mosquitto_binary: str, tmp_path: Path) -> None:
    broker = Mosquitto(mosquitto_binary, tmp_path)
    device = DeviceConnection(fleet(unique_type(), 1)[0], HOST, broker.port)
    try:
        connecting = asyncio.create_task(device.connect())
        await asyncio.sleep(0.5)
        assert not connecting.done()
        await device.publish_event("status", {"d": {"seq": 0}})  # queued while offline
        await asyncio.to_thread(broker.start)
        async with asyncio.timeout(15):
            await connecting
        assert await device.wait_acknowledged(timeout=10)
        assert (device.published, device.acknowledged) == (1, 1)
    finally:
        await device.close()
        broker.stop()


async def test_close_stops_a_device_that_is_still_connecting() -> None:
    device = DeviceConnection(fleet(unique_type(), 1)[0], HOST, _free_port())
    connecting = asyncio.create_task(device.connect())
    await asyncio.sleep(0.3)
    await device.close()
    async with asyncio.timeout(5):
        await connecting
    assert not device.connected
    with pytest.raises(RuntimeError, match="closed"):
        await device.publish_event("status", {})


async def test_a_refused_credential_fails_fast(mosquitto_binary: str, tmp_path: Path) -> None:
    broker = Mosquitto(mosquitto_binary, tmp_path, anonymous=False)  # nobody may connect
    await asyncio.to_thread(broker.start)
    try:
        devices = fleet(unique_type(), 2)
        device = DeviceConnection(devices[0], HOST, broker.port)
        try:
            async with asyncio.timeout(10):
                with pytest.raises(DeviceRefusedError) as refused:
                    await device.connect()
        finally:
            await device.close()
        assert refused.value.device_id == devices[0].device_id
        assert refused.value.code in (4, 5)
        assert PASSWORD not in str(refused.value)

        async with asyncio.timeout(10):
            with pytest.raises(DeviceRefusedError):
                await run_simulation(HOST, broker.port, SimulationPlan(devices, count=1))
    finally:
        broker.stop()


def test_payloads_and_credentials() -> None:
    rng = seeded(7)
    payloads = [make_payload("device-7", seq, rng) for seq in range(100)]
    assert [p["d"]["seq"] for p in payloads] == list(range(100))
    sizes = {len(json.dumps(p, separators=(",", ":"))) for p in payloads}
    assert min(sizes) >= 100
    assert max(sizes) <= 200
    cred = DeviceCredential("device-7", "sensor", PASSWORD)
    assert PASSWORD not in repr(cred)
    assert PASSWORD not in repr(DeviceConnection(cred, HOST, 1883))
    with pytest.raises(ValidationError, match="twice"):
        SimulationPlan([cred, cred])
