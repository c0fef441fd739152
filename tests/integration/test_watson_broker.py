"""Watson IoT clients on the embedded broker, end to end: a real node, real MQTT clients.

``d:<org>:<typeId>:<deviceId>`` devices with ``use-token-auth``, their device-relative topics
and what they may not reach; ``a:<org>:<appId>`` applications with API keys, what the policy
lets them receive and command, and their revocation. The unmodified ``wiotp-sdk`` runs in
``test_wiotp_sdk.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gmqtt
import httpx
import paho.mqtt.client as paho
import pytest
import websockets.exceptions
import websockets.sync.client
from gmqtt.mqtt.constants import MQTTv311
from helpers import free_port
from typer.testing import CliRunner
from websockets.typing import Subprotocol

from gmqttclient import GmqttClient as Client
from iotvault import wiring
from iotvault.accounts import create_api_key, revoke_api_key
from iotvault.certs import write_certs
from iotvault.cli.main import app as cli_app
from iotvault.config import Settings, load_settings
from iotvault.context import Context, open_context
from iotvault.devices import register_device
from iotvault.domain.accounts import Roles
from iotvault.node import Node, Role

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HOST = "127.0.0.1"
ORG = "myorg"
NEVER = -2  # gmqtt: no automatic reconnection


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Platform:
    settings: Settings
    ctx: Context
    http: httpx.AsyncClient
    port: int
    clients: list[Client] = field(default_factory=list)

    def register(self, device_id: str, type_id: str = "rpi") -> str:
        return register_device(self.ctx, type_id, device_id).credential

    def key(self, *, devices: tuple[str, ...], roles: Roles) -> tuple[str, str]:
        new = create_api_key(self.ctx, roles=roles, devices=devices, created_by="test")
        return new.key, new.password

    @staticmethod
    def basic(key: tuple[str, str]) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{key[0]}:{key[1]}".encode()).decode()}

    async def connect(self, client_id: str, username: str | None, password: str | None) -> Client:
        c = Client(client_id)
        self.clients.append(c)
        await c.connect(self.port, username, password)
        return c

    async def refused(self, client_id: str, username: str | None, password: str | None) -> int:
        c = Client(client_id)
        self.clients.append(c)
        with pytest.raises(gmqtt.MQTTConnectError) as info:
            await c.connect(self.port, username, password)
        return int(info.value.args[0])

    async def device(self, device_id: str, credential: str, type_id: str = "rpi") -> Client:
        return await self.connect(f"d:{ORG}:{type_id}:{device_id}", "use-token-auth", credential)

    async def security_events(self) -> list[dict[str, Any]]:
        admin = self.basic(self.key(devices=(), roles=Roles(admin=True)))
        r = await self.http.get("/iotf/security/events", headers=admin, params={"count": 1000})
        assert r.status_code == 200, r.text
        return list(r.json()["events"])


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {within}s: {what}")


@pytest.fixture
async def platform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Platform]:
    monkeypatch.setattr(wiring, "REVALIDATE_S", 0.5)
    settings = load_settings(
        environ={
            "IOTVAULT_DATA_DIR": str(tmp_path / "data"),
            "IOTVAULT_HTTP_PORT": str(free_port()),
            "IOTVAULT_MQTT_PORT": str(free_port()),
            "IOTVAULT_ORG_ID": ORG,
        }
    )
    async with running(settings) as p:
        yield p


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Platform]:
    ctx = await asyncio.to_thread(open_context, settings)
    node = Node(settings, Role.ALL)
    ready = asyncio.Event()
    task = asyncio.create_task(node.run(lambda _n: ready.set()))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED, timeout=30)
    loop = asyncio.get_running_loop()
    try:
        if task.done():
            task.result()
        assert ready.is_set(), "the node did not start"
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{settings.http_port}", timeout=10) as http:
            p = Platform(settings, ctx, http, settings.mqtt_port)
            try:
                yield p
            finally:
                for c in p.clients:
                    await c.close()
    finally:
        waiter.cancel()
        node.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 20)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        ctx.close()


async def next_message(client: Client) -> tuple[str, bytes]:
    return await asyncio.wait_for(client.messages.get(), 5.0)


async def events_of(platform: Platform, key: tuple[str, str], device_id: str) -> list[dict[str, Any]]:
    r = await platform.http.get(f"/iotf/devices/{device_id}", headers=platform.basic(key))
    assert r.status_code == 200, r.text
    return list(r.json()["events"])


# ---- login ------------------------------------------------------------------------------------
async def test_watson_login_and_its_refusals(platform: Platform) -> None:
    cred = platform.register("dev1")
    other_cred = platform.register("dev2", type_id="cam")
    ok = await platform.device("dev1", cred)
    await ok.close()
    legacy = await platform.connect("dev1", "dev1", cred)  # today's form keeps working
    await legacy.close()
    assert await platform.refused("d:other:rpi:dev1", "use-token-auth", cred) == 5  # another org
    assert await platform.refused(f"d:{ORG}:cam:dev1", "use-token-auth", cred) == 5  # another type
    assert await platform.refused(f"d:{ORG}:rpi:dev1", "use-token-auth", "wrong") == 5
    assert await platform.refused(f"d:{ORG}:rpi:dev1", "dev1", cred) == 5  # not use-token-auth
    assert await platform.refused(f"d:{ORG}:rpi:dev1", "use-token-auth", other_cred) == 5  # dev2's
    assert await platform.refused(f"d:{ORG}:rpi:ghost", "use-token-auth", cred) == 5
    assert await platform.refused(f"d:{ORG}:cam:dev2", "use-token-auth", cred) == 5
    assert await platform.refused("dev1", "use-token-auth", cred) == 5  # the Watson user, old form

    async def recorded() -> bool:
        failed = [e for e in await platform.security_events() if e["kind"] == "login_failed"]
        return {"d:other:rpi:dev1", f"d:{ORG}:cam:dev1", f"d:{ORG}:rpi:ghost"} <= {
            e["subject"] for e in failed
        }

    await eventually(recorded, what="refused Watson logins as security events")


async def test_a_second_connection_with_the_client_id_ends_the_first(platform: Platform) -> None:
    cred = platform.register("dev1")
    first = await platform.device("dev1", cred)
    second = await platform.device("dev1", cred)
    await asyncio.wait_for(first.disconnected.wait(), 5)
    assert await second.subscribe("iot-2/cmd/+/fmt/+") == (1,)  # the second one goes on


# ---- a device's relative topics ---------------------------------------------------------------
async def test_relative_events_are_stored_and_commands_arrive_relative(platform: Platform) -> None:
    cred = platform.register("dev1")
    reader = platform.key(devices=("dev1",), roles=Roles(reader=True, writer=True))
    dev = await platform.device("dev1", cred)
    assert await dev.subscribe("iot-2/cmd/+/fmt/+") == (1,)
    dev.publish("iot-2/evt/temp/fmt/json", b'{"t": 21.5}')

    async def stored() -> bool:
        return len(await events_of(platform, reader, "dev1")) == 1

    await eventually(stored, what="the relative event stored")
    (event,) = await events_of(platform, reader, "dev1")
    assert (event["eventType"], event["typeId"], event["payload"]) == ("temp", "rpi", {"t": 21.5})
    r = await platform.http.post(
        "/iotf/devices/dev1/commands",
        headers=platform.basic(reader),
        json={"command": "blink", "payload": {"n": 2}},
    )
    assert r.status_code == 202, r.text
    topic, payload = await next_message(dev)
    assert topic == "iot-2/cmd/blink/fmt/json"
    assert set(json.loads(payload)) == {"jws"}  # signed, the default


async def test_a_watson_device_speaking_mqtt5(platform: Platform) -> None:
    """The relative topics under the MQTT 5 translation: mapped in, mapped back, refused with 0x87."""
    cred = platform.register("dev1")
    platform.register("dev2")
    writer = platform.key(devices=("dev1",), roles=Roles(reader=True, writer=True))
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, f"d:{ORG}:rpi:dev1", protocol=paho.MQTTv5)
    client.username_pw_set("use-token-auth", cred)
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    client.on_message = lambda _c, _u, m: loop.call_soon_threadsafe(received.put_nowait, (m.topic, m.payload))
    acks: dict[int, int] = {}
    client.on_publish = lambda _c, _u, mid, reason, _p: acks.__setitem__(mid, reason.value)
    await asyncio.to_thread(client.connect, HOST, platform.port)
    client.loop_start()
    try:
        client.subscribe("iot-2/cmd/+/fmt/+", qos=1)
        mine = client.publish("iot-2/evt/temp/fmt/json", b'{"t": 5}', qos=1)
        theirs = client.publish("iot-2/type/rpi/id/dev2/evt/temp/fmt/json", b'{"t": 6}', qos=1)

        async def answered() -> bool:
            return {mine.mid, theirs.mid} <= set(acks)

        await eventually(answered, 5, "both PUBACKs")
        assert (acks[mine.mid], acks[theirs.mid]) == (0, 0x87)  # MQTT 5 keeps the session
        # QoS 2: PUBREC 0x87; paho sends its PUBREL anyway, which gets PUBCOMP 0x92 (not found)
        theirs2 = client.publish("iot-2/type/rpi/id/dev2/evt/temp/fmt/json", b'{"t": 7}', qos=2)

        async def completed() -> bool:
            return theirs2.mid in acks

        await eventually(completed, 5, "the refused QoS 2 flow ended")
        assert acks[theirs2.mid] == 0x92
        assert [e["eventType"] for e in await events_of(platform, writer, "dev1")] == ["temp"]
        command = {"command": "open", "payload": {}}
        r = await platform.http.post(
            "/iotf/devices/dev1/commands", headers=platform.basic(writer), json=command
        )
        assert r.status_code == 202
        topic, _ = await asyncio.wait_for(received.get(), 5)
        assert topic == "iot-2/cmd/open/fmt/json"
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize(
    "topic_filter",
    [
        "#",
        "iot-2/#",
        "iot-2/cmd/#",
        "iot-2/type/+/id/+/cmd/+/fmt/+",
        "iot-2/type/rpi/id/+/cmd/+/fmt/+",
        "iot-2/type/+/id/dev1/cmd/+/fmt/+",
        "iot-2/type/rpi/id/dev2/cmd/+/fmt/+",
        "iot-2/type/cam/id/dev1/cmd/+/fmt/+",
        "iot-2/type/+/id/+/evt/+/fmt/+",
        "iot-2/evt/+/fmt/+",
        "$SYS/#",
    ],
)
async def test_a_watson_device_subscribes_to_nothing_beyond_its_commands(
    platform: Platform, topic_filter: str
) -> None:
    cred = platform.register("dev1")
    platform.register("dev2")
    dev = await platform.device("dev1", cred)
    assert await dev.subscribe(topic_filter) == (0x80,)
    assert await dev.subscribe("iot-2/cmd/+/fmt/+") == (1,)  # the session goes on


@pytest.mark.parametrize(
    "topic",
    [
        "iot-2/type/rpi/id/dev2/evt/temp/fmt/json",  # another device's full topic
        "iot-2/type/cam/id/dev1/evt/temp/fmt/json",  # its own id under another type
        "iot-2/type/rpi/id/dev2/mon",
        "iot-2/cmd/reboot/fmt/json",  # a command, as if iotvault had sent it
        "iot-2/type/rpi/id/dev1/cmd/reboot/fmt/json",
        "iot-2/evt/temp/fmt/json/extra",
        "iot-2/other",
        "other/topic",
    ],
)
async def test_a_watson_device_publishes_nothing_beyond_its_own(platform: Platform, topic: str) -> None:
    cred = platform.register("dev1")
    cred2 = platform.register("dev2")
    watcher = await platform.device("dev2", cred2)
    assert await watcher.subscribe("iot-2/cmd/+/fmt/+") == (1,)
    reader = platform.key(devices=("dev1", "dev2"), roles=Roles(reader=True))
    dev = await platform.device("dev1", cred)
    dev.publish(topic, b'{"t": 1}')
    await asyncio.wait_for(dev.disconnected.wait(), 5)  # 3.1.1: a refused publish ends it
    assert await events_of(platform, reader, "dev2") == []
    assert [e for e in await events_of(platform, reader, "dev1") if e["eventType"] == "temp"] == []
    assert watcher.messages.empty()

    async def denied() -> bool:
        return any(
            e["kind"] == "acl_denied" and e["subject"] == f"d:{ORG}:rpi:dev1"
            for e in await platform.security_events()
        )

    await eventually(denied, what="the refused publish as a security event")


async def test_a_devices_commands_reach_only_its_own_session(platform: Platform) -> None:
    cred1, cred2 = platform.register("dev1"), platform.register("dev2")
    writer = platform.key(devices=("dev1", "dev2"), roles=Roles(reader=True, writer=True))
    one, two = await platform.device("dev1", cred1), await platform.device("dev2", cred2)
    assert await one.subscribe("iot-2/cmd/+/fmt/+") == (1,)
    assert await two.subscribe("iot-2/cmd/+/fmt/+") == (1,)
    r = await platform.http.post(
        "/iotf/devices/dev2/commands", headers=platform.basic(writer), json={"command": "go", "payload": {}}
    )
    assert r.status_code == 202
    assert (await next_message(two))[0] == "iot-2/cmd/go/fmt/json"
    await asyncio.sleep(0.5)
    assert one.messages.empty()


# ---- applications -----------------------------------------------------------------------------
async def test_an_application_receives_exactly_the_devices_its_key_may_read(platform: Platform) -> None:
    creds = {d: platform.register(d) for d in ("a1", "a2", "b1")}
    key = platform.key(devices=("a1", "a2"), roles=Roles(reader=True))
    app = await platform.connect(f"a:{ORG}:app1", *key)
    assert await app.subscribe("iot-2/type/+/id/+/evt/+/fmt/+") == (1,)
    assert await app.subscribe("iot-2/type/rpi/id/b1/evt/+/fmt/+") == (0x80,)  # named, not readable
    assert await app.subscribe("#") == (0x80,)
    assert await app.subscribe("iot-2/type/+/id/+/cmd/+/fmt/+") == (0x80,)
    devices = {d: await platform.device(d, c) for d, c in creds.items()}
    for device_id in ("b1", "a1", "b1", "a2"):
        devices[device_id].publish("iot-2/evt/temp/fmt/json", json.dumps({"from": device_id}).encode())
    got = [await next_message(app) for _ in range(2)]
    assert sorted(topic for topic, _ in got) == [
        "iot-2/type/rpi/id/a1/evt/temp/fmt/json",
        "iot-2/type/rpi/id/a2/evt/temp/fmt/json",
    ]
    await asyncio.sleep(0.5)
    assert app.messages.empty()  # nothing of b1


async def test_an_application_sees_the_connections_of_the_devices_it_may_read(platform: Platform) -> None:
    creds = {d: platform.register(d) for d in ("a1", "b1")}
    key = platform.key(devices=("a1",), roles=Roles(reader=True))
    app = await platform.connect(f"a:{ORG}:app1", *key)
    assert await app.subscribe("iot-2/type/+/id/+/mon") == (1,)
    other = await platform.device("b1", creds["b1"])
    mine = await platform.device("a1", creds["a1"])
    topic, payload = await next_message(app)
    assert topic == "iot-2/type/rpi/id/a1/mon"
    assert json.loads(payload)["Action"] == "Connect"
    await mine.close()
    topic, payload = await next_message(app)
    assert (topic, json.loads(payload)["status"]) == ("iot-2/type/rpi/id/a1/mon", "disconnected")
    await other.close()
    await asyncio.sleep(0.5)
    assert app.messages.empty()  # nothing of b1, connected or not


async def test_application_logins_are_checked(platform: Platform) -> None:
    key = platform.key(devices=(), roles=Roles(reader=True))
    assert await platform.refused(f"a:{ORG}:app1", key[0], "wrong") == 5
    assert await platform.refused("a:other:app1", *key) == 5
    assert await platform.refused("app1", *key) == 5  # a key is for a: client ids only
    assert await platform.refused(f"d:{ORG}:rpi:app1", *key) == 5
    assert await platform.refused(f"a:{ORG}:app1", "use-token-auth", key[1]) == 5


async def test_an_applications_command_goes_out_signed_and_a_reader_cannot_send_one(
    platform: Platform,
) -> None:
    cred = platform.register("dev1")
    dev = await platform.device("dev1", cred)
    assert await dev.subscribe("iot-2/cmd/+/fmt/+") == (1,)
    reader = platform.key(devices=("dev1",), roles=Roles(reader=True))
    app = await platform.connect(f"a:{ORG}:reader", *reader)
    app.publish("iot-2/type/rpi/id/dev1/cmd/reboot/fmt/json", b'{"now": true}')
    await asyncio.wait_for(app.disconnected.wait(), 5)  # refused: a reader commands nothing
    writer = platform.key(devices=("dev1",), roles=Roles(reader=True, writer=True))
    app = await platform.connect(f"a:{ORG}:writer", *writer)
    app.publish("iot-2/type/rpi/id/dev1/cmd/reboot/fmt/json", b'{"now": true}')
    topic, payload = await next_message(dev)
    assert topic == "iot-2/cmd/reboot/fmt/json"
    assert set(json.loads(payload)) == {"jws"}  # iotvault's signed command, not the app's bytes
    assert dev.messages.empty()  # and only that one: the app's own message was not forwarded
    events = [e for e in await platform.security_events() if e["kind"] == "command"]
    assert [e["subject"] for e in events] == [f"api_key:{writer[0]}"]


class PahoApp:
    """A Watson application as paho connects it (MQTT 3.1.1 or 5): what each PUBLISH got back."""

    def __init__(self, platform: Platform, key: tuple[str, str], protocol: int) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, f"a:{ORG}:ops", protocol=protocol)
        self.client.username_pw_set(*key)
        self.acks: dict[int, int] = {}
        self.client.on_publish = lambda _c, _u, mid, reason, _p: self.acks.__setitem__(mid, reason.value)
        self.port = platform.port

    async def __aenter__(self) -> PahoApp:
        await asyncio.to_thread(self.client.connect, HOST, self.port)
        self.client.loop_start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    async def answer(self, topic: str, payload: bytes, qos: int = 1, *, retain: bool = False) -> int:
        """The reason code of the PUBACK (QoS 1) or PUBREC (QoS 2) for one command."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)

        async def answered() -> bool:
            return info.mid in self.acks

        await eventually(answered, 5, f"an answer to {topic}")
        return self.acks[info.mid]


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5])
async def test_a_refused_application_command_is_answered_once_and_recorded(
    platform: Platform, protocol: int
) -> None:
    """Refused for good: answered (MQTT 5 with a reason code), so a QoS 1 sender does not resend it
    forever; recorded as a security event; the session goes on; nothing reaches the device."""
    cred = platform.register("dev1")  # takes signed commands only: the default
    dev = await platform.device("dev1", cred)
    assert await dev.subscribe("iot-2/cmd/+/fmt/+") == (1,)
    writer = platform.key(devices=("dev1",), roles=Roles(reader=True, writer=True))
    v5 = protocol == paho.MQTTv5
    refused = [
        ("iot-2/type/rpi/id/dev1/cmd/say/fmt/text", b"hello", 0x99),  # iotvault signs JSON only
        ("iot-2/type/rpi/id/dev1/cmd/say/fmt/bin", bytes(range(256)), 0x99),
        ("iot-2/type/rpi/id/dev1/cmd/reboot/fmt/json", b"not json", 0x99),
        ("iot-2/type/rpi/id/dev1/cmd/reboot/fmt/json", b"[1, 2]", 0x99),  # not a JSON object
        ("iot-2/type/cam/id/dev1/cmd/reboot/fmt/json", b"{}", 0x90),  # not its registered type
    ]
    async with PahoApp(platform, writer, protocol) as app:
        for topic, payload, code in refused:
            assert await app.answer(topic, payload) == (code if v5 else 0)
        if v5:  # QoS 2: PUBREC 0x83 ends the flow (3.1.1 has no such answer: see below); paho
            # ignores that code, sends its PUBREL anyway and reports the PUBCOMP's: 0x92, id not found
            assert await app.answer("iot-2/type/rpi/id/dev1/cmd/reboot/fmt/json", b"{}", qos=2) == 0x92
        retained = "iot-2/type/rpi/id/dev1/cmd/kept/fmt/json"
        assert await app.answer(retained, b"{}", retain=True) == (0x83 if v5 else 0)
        await asyncio.sleep(0.5)
        assert len(app.acks) == len(refused) + v5 + 1  # each answered once: nothing was sent again
        assert dev.messages.empty()
        late = await platform.device("dev1", cred)  # takes over the session: a new subscription
        assert await late.subscribe("iot-2/cmd/+/fmt/+") == (1,)
        await asyncio.sleep(0.3)
        assert late.messages.empty()  # the retained command was not kept either
        dev = late
        # the same session goes on, and a good command still goes out
        assert await app.answer("iot-2/type/rpi/id/dev1/cmd/reboot/fmt/json", b'{"now": true}') == 0
        topic, payload = await next_message(dev)
        assert (topic, set(json.loads(payload))) == ("iot-2/cmd/reboot/fmt/json", {"jws"})

    async def recorded() -> list[dict[str, Any]]:
        return [e for e in await platform.security_events() if e["kind"] == "command_refused"]

    await eventually(lambda: _at_least(recorded, len(refused) + v5 + 1), what="the refusals recorded")
    events = await recorded()
    assert {e["subject"] for e in events} == {f"api_key:{writer[0]}"}
    text = next(e for e in events if e["format"] == "text")
    assert text["deviceId"] == "dev1"
    assert text["delivery"] == "signed"
    assert "signed command" in text["reason"]
    assert "hello" not in json.dumps(events)  # what was refused is named, never kept
    assert len([e for e in await platform.security_events() if e["kind"] == "command"]) == 1  # the good one


async def _at_least(found: Callable[[], Awaitable[list[Any]]], n: int) -> bool:
    return len(await found()) >= n


async def test_a_31_application_command_at_qos_2_is_refused_by_dropping_it(platform: Platform) -> None:
    """MQTT 3.1.1 cannot refuse a QoS 2 PUBLISH and answer it (a PUBREC starts a delivery)."""
    cred = platform.register("dev1")
    dev = await platform.device("dev1", cred)
    assert await dev.subscribe("iot-2/cmd/+/fmt/+") == (1,)
    writer = platform.key(devices=("dev1",), roles=Roles(reader=True, writer=True))
    app = await platform.connect(f"a:{ORG}:writer", *writer)
    app.publish("iot-2/type/rpi/id/dev1/cmd/reboot/fmt/json", b'{"now": true}', qos=2)
    await asyncio.wait_for(app.disconnected.wait(), 5)
    await asyncio.sleep(0.3)
    assert dev.messages.empty()


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5])
async def test_an_applications_command_in_any_format_reaches_an_unsigned_device_as_sent(
    platform: Platform, protocol: int
) -> None:
    from iotvault.devices import set_command_delivery  # noqa: PLC0415
    from iotvault.domain.commands import Delivery  # noqa: PLC0415

    cred = platform.register("dev1")
    set_command_delivery(platform.ctx, "dev1", Delivery.UNSIGNED)
    plain_cred = platform.register("dev2")  # iotvault's own login form, its full topics
    set_command_delivery(platform.ctx, "dev2", Delivery.UNSIGNED)
    dev = await platform.device("dev1", cred)
    assert await dev.subscribe("iot-2/cmd/+/fmt/+") == (1,)
    plain = await platform.connect("dev2", "dev2", plain_cred)
    assert await plain.subscribe("iot-2/type/rpi/id/dev2/cmd/+/fmt/+") == (1,)
    other = await platform.device("dev3", platform.register("dev3"))  # may not see dev1's commands
    assert await other.subscribe("iot-2/cmd/+/fmt/+") == (1,)
    writer = platform.key(devices=("dev1", "dev2"), roles=Roles(reader=True, writer=True))
    sent = [
        ("say", "text", "grüß dich".encode()),
        ("blob", "bin", bytes(range(256))),
        ("cfg", "xml", b"<a x='1'/>"),
        ("list", "json", b"[1, 2]"),  # JSON but no object: as sent, too
    ]
    async with PahoApp(platform, writer, protocol) as app:
        for command, fmt, payload in sent:
            assert await app.answer(f"iot-2/type/rpi/id/dev1/cmd/{command}/fmt/{fmt}", payload) == 0
            assert await next_message(dev) == (f"iot-2/cmd/{command}/fmt/{fmt}", payload)
        assert await app.answer("iot-2/type/rpi/id/dev2/cmd/say/fmt/text", b"hi") == 0
        assert await next_message(plain) == ("iot-2/type/rpi/id/dev2/cmd/say/fmt/text", b"hi")
    await asyncio.sleep(0.3)
    assert other.messages.empty()
    assert dev.messages.empty()
    events = [e for e in await platform.security_events() if e["kind"] == "command"]
    assert sorted(e["format"] for e in events) == ["bin", "json", "text", "text", "xml"]
    assert {e["delivery"] for e in events} == {"unsigned"}


async def test_a_watson_key_made_and_revoked_through_the_api(platform: Platform) -> None:
    admin = platform.basic(platform.key(devices=(), roles=Roles(admin=True)))
    r = await platform.http.post("/iotf/apikeys", headers=admin, json={"roleReader": True, "watson": True})
    assert r.status_code == 201, r.text
    key, password = r.json()["key"], r.json()["password"]
    assert key.split("-")[:2] == ["a", ORG]
    app = await platform.connect(f"a:{ORG}:app1", key, password)
    r = await platform.http.delete(f"/iotf/apikeys/{key}", headers=admin)
    assert r.status_code == 204
    await asyncio.wait_for(app.disconnected.wait(), 5)
    assert await platform.refused(f"a:{ORG}:app1", key, password) == 5

    async def recorded() -> bool:
        return any(
            e["kind"] == "session_revoked" and e["subject"] == f"a:{ORG}:app1"
            for e in await platform.security_events()
        )

    await eventually(recorded, what="the ended session as a security event")


async def test_a_revoked_key_ends_the_session_and_cannot_log_in_again(platform: Platform) -> None:
    key = platform.key(devices=(), roles=Roles(reader=True))
    app = await platform.connect(f"a:{ORG}:app1", *key)
    revoke_api_key(platform.ctx, key[0])
    await asyncio.wait_for(app.disconnected.wait(), 5)
    assert await platform.refused(f"a:{ORG}:app1", *key) == 5


# ---- MQTT over WebSocket ----------------------------------------------------------------------
@pytest.fixture
async def ws_platform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Platform]:
    monkeypatch.setattr(wiring, "REVALIDATE_S", 0.5)
    settings = load_settings(
        environ={
            "IOTVAULT_DATA_DIR": str(tmp_path / "data"),
            "IOTVAULT_HTTP_PORT": str(free_port()),
            "IOTVAULT_MQTT_PORT": str(free_port()),
            "IOTVAULT_MQTT_WS_PORT": str(free_port()),
            "IOTVAULT_ORG_ID": ORG,
            "IOTVAULT_MQTT_MAX_PACKET_BYTES": "4096",
        }
    )
    async with running(settings) as p:
        yield p


class WsClient:
    """A paho client over WebSocket (path /mqtt, subprotocol mqtt: paho's defaults)."""

    def __init__(self, platform: Platform, client_id: str, username: str, password: str) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id, transport="websockets")
        self.client.username_pw_set(username, password)
        self.connack: int | None = None
        self.loop = asyncio.get_running_loop()
        self.received: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, m: self.loop.call_soon_threadsafe(
            self.received.put_nowait, (m.topic, m.payload)
        )
        self.port = platform.settings.mqtt_ws_port

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connack = reason.value

    async def connect(self) -> int:
        """CONNACK's reason code (paho 2 says a 3.1.1 refusal, code 5, as 0x87)."""
        await asyncio.to_thread(self.client.connect, HOST, self.port)
        self.client.loop_start()

        async def answered() -> bool:
            return self.connack is not None

        await eventually(answered, 5, "CONNACK over WebSocket")
        assert self.connack is not None
        return self.connack

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_a_watson_device_over_websocket(ws_platform: Platform) -> None:
    platform = ws_platform
    cred = platform.register("dev1")
    reader = platform.key(devices=("dev1",), roles=Roles(reader=True, writer=True))
    bad = WsClient(platform, f"d:{ORG}:rpi:dev1", "use-token-auth", "wrong")
    try:
        assert await bad.connect() == 0x87  # the same door: refused
    finally:
        bad.close()
    client = WsClient(platform, f"d:{ORG}:rpi:dev1", "use-token-auth", cred)
    try:
        assert await client.connect() == 0
        client.client.subscribe("iot-2/cmd/+/fmt/+", qos=1)
        info = client.client.publish("iot-2/evt/temp/fmt/json", b'{"t": 3}', qos=1)
        await asyncio.to_thread(info.wait_for_publish, 5)

        async def stored() -> bool:
            return len(await events_of(platform, reader, "dev1")) == 1

        await eventually(stored, what="the event sent over WebSocket stored")
        command = {"command": "blink", "payload": {}}
        r = await platform.http.post(
            "/iotf/devices/dev1/commands", headers=platform.basic(reader), json=command
        )
        assert r.status_code == 202
        topic, payload = await asyncio.wait_for(client.received.get(), 5)
        assert topic == "iot-2/cmd/blink/fmt/json"
        assert set(json.loads(payload)) == {"jws"}
    finally:
        client.close()


def _ws_refusal(port: int, **kwargs: Any) -> int:
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        websockets.sync.client.connect(f"ws://{HOST}:{port}{kwargs.pop('path', '/mqtt')}", **kwargs)
    return int(info.value.response.status_code)


def _closed_after(port: int, message: bytes | str) -> bool:
    """Send ``message`` after the handshake; True if the broker then closes the connection."""
    ws = websockets.sync.client.connect(f"ws://{HOST}:{port}/mqtt", subprotocols=[Subprotocol("mqtt")])
    try:
        ws.send(message)
        try:
            ws.recv(timeout=5)
        except websockets.exceptions.ConnectionClosed:
            return True
        return False
    finally:
        ws.close()


def _not_http_is_closed(port: int) -> bool:
    """Plain MQTT bytes on the WebSocket port: closed at once, nothing kept."""
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00\r\n\r\n")
        started = time.monotonic()
        return sock.recv(1024) == b"" and time.monotonic() - started < 2


async def test_websocket_attacks_are_refused(ws_platform: Platform) -> None:
    port = ws_platform.settings.mqtt_ws_port
    assert (
        await asyncio.to_thread(_ws_refusal, port, path="/other", subprotocols=[Subprotocol("mqtt")]) == 404
    )
    assert await asyncio.to_thread(_ws_refusal, port) == 400  # no "mqtt" subprotocol
    assert await asyncio.to_thread(_closed_after, port, "text is not MQTT")
    big = b"\x30" + bytes([0xFF, 0xFF, 0x7F]) + b"\x00" * 16  # a PUBLISH announcing 2 MB
    assert await asyncio.to_thread(_closed_after, port, big)
    assert await asyncio.to_thread(_closed_after, port, b"\x30\x02\x00\x00")  # not CONNECT first
    assert await asyncio.to_thread(_not_http_is_closed, port)

    async def recorded() -> bool:
        kinds = [e["kind"] for e in await ws_platform.security_events()]
        return kinds.count("protocol_violation") >= 2

    await eventually(recorded, what="the oversized and out-of-order packets as protocol violations")


def _open_descriptors() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))  # the node runs in this process


def _abandon_websockets(port: int, rounds: int) -> None:
    """Each round: a half-sent handshake dropped, a whole one closed, one kept mute."""
    mute: list[socket.socket] = []
    for _ in range(rounds):
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: web")  # and gone
        ws = websockets.sync.client.connect(f"ws://{HOST}:{port}/mqtt", subprotocols=[Subprotocol("mqtt")])
        ws.close()
        mute.append(socket.create_connection((HOST, port), timeout=5))  # says nothing at all
    for sock in mute:
        sock.close()


async def test_abandoned_and_mute_websocket_clients_leave_no_descriptor(ws_platform: Platform) -> None:
    port = ws_platform.settings.mqtt_ws_port
    await asyncio.to_thread(_abandon_websockets, port, 2)  # warm: the first of each kind
    await asyncio.sleep(0.5)
    baseline = _open_descriptors()
    await asyncio.to_thread(_abandon_websockets, port, 100)

    async def back_to_baseline() -> bool:
        return _open_descriptors() <= baseline

    await eventually(back_to_baseline, within=15, what="descriptors back to the baseline")
    device = await ws_platform.device("after-flood", ws_platform.register("after-flood"))  # still serving
    await device.close()


async def test_tls_on_a_port_of_its_own_beside_plain_mqtt(tmp_path: Path) -> None:
    files = write_certs(tmp_path / "certs", ["localhost"])
    settings = load_settings(
        environ={
            "IOTVAULT_DATA_DIR": str(tmp_path / "data"),
            "IOTVAULT_HTTP_PORT": str(free_port()),
            "IOTVAULT_MQTT_PORT": str(free_port()),
            "IOTVAULT_MQTT_TLS_PORT": str(free_port()),
            "IOTVAULT_MQTT_TLS_CERT_FILE": str(files.server_cert),
            "IOTVAULT_MQTT_TLS_KEY_FILE": str(files.server_key),
            "IOTVAULT_ORG_ID": ORG,
        }
    )
    async with running(settings) as platform:
        cred = platform.register("dev1")
        plain = await platform.device("dev1", cred)  # mqtt_port stays plain
        await plain.close()
        context = ssl.create_default_context(cafile=str(files.ca_cert))
        tls = Client(f"d:{ORG}:rpi:dev1")
        platform.clients.append(tls)
        tls.client.set_auth_credentials("use-token-auth", cred)
        await asyncio.wait_for(
            tls.client.connect("localhost", settings.mqtt_tls_port, ssl=context, version=MQTTv311), 5
        )
        assert await tls.subscribe("iot-2/cmd/+/fmt/+") == (1,)
        with pytest.raises(ssl.SSLError):  # the system's CAs do not know this certificate
            await asyncio.to_thread(_tls_handshake, settings.mqtt_tls_port, ssl.create_default_context())
        await asyncio.to_thread(_tls_handshake, settings.mqtt_tls_port, context)


def _tls_handshake(port: int, context: ssl.SSLContext) -> None:
    with (
        socket.create_connection((HOST, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost"),
    ):
        pass


def test_watson_form_api_keys_on_the_command_line(tmp_path: Path) -> None:
    env = {"IOTVAULT_DATA_DIR": str(tmp_path / "data"), "IOTVAULT_ORG_ID": ORG}
    runner = CliRunner()
    made = runner.invoke(
        cli_app, ["apikeys", "add", "--watson", "--reader", "--device", "d1", "--json"], env=env
    )
    assert made.exit_code == 0, made.output
    key = json.loads(made.stdout)["key"]
    assert key.startswith(f"a-{ORG}-")
    assert key.split("-")[1] == ORG  # what Watson's SDK reads
    plain = runner.invoke(cli_app, ["apikeys", "add", "--reader", "--device", "d1", "--json"], env=env)
    assert json.loads(plain.stdout)["key"].startswith("k-")
