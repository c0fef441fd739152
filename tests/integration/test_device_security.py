"""Device security end to end, on the embedded broker and on Mosquitto 2 with dynamic security.

A real iotvault node runs in the test's event loop (HTTP, ingest, and the embedded broker or a
subscriber to Mosquitto); devices are real MQTT clients (gmqtt, and the SDK's DeviceClient);
API calls go over HTTP with API keys. Each test gets its own database, broker and ports.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gmqtt
import httpx
import pytest
from helpers import free_port
from sqlalchemy import func, select
from typer.testing import CliRunner

from gmqttclient import GmqttClient as RawClient
from iotvault import wiring
from iotvault.accounts import create_api_key
from iotvault.broker.acl import SERVICE_USERNAME
from iotvault.broker.publisher import CommandPublisher
from iotvault.broker.tls import client_context
from iotvault.cli.main import app as cli_app
from iotvault.commands.keys import broker_service_password, command_signing_key
from iotvault.commands.service import CommandService
from iotvault.config import Settings, load_settings
from iotvault.context import Context, open_context
from iotvault.crypto.signing import CommandPublicKey, CommandSigningKey, b64url
from iotvault.device import Command, CommandRejectedError, DeviceClient
from iotvault.devices import (
    delete_device,
    register_device,
    revoke_device_credential,
    rotate_device_credential,
)
from iotvault.domain.accounts import Roles
from iotvault.domain.commands import command_message
from iotvault.errors import BrokerUnavailableError
from iotvault.node import Node, Role
from iotvault.simulator import (
    CommandSupport,
    DeviceCredential,
    DeviceRefusedError,
    SimulationPlan,
    run_simulation,
)
from iotvault.storage.schema import commands
from secure_brokers import DynsecMosquitto

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HOST = "127.0.0.1"
NEVER = -2  # gmqtt: no automatic reconnection


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---- the platform under test ------------------------------------------------------------------
@dataclass
class Platform:
    kind: str
    settings: Settings
    ctx: Context
    node: Node
    http: httpx.AsyncClient
    mqtt_port: int
    mosquitto: DynsecMosquitto | None
    clients: list[Any] = field(default_factory=list)

    def register(self, device_id: str, type_id: str = "thermo") -> DeviceCredential:
        new = register_device(self.ctx, type_id, device_id)
        return DeviceCredential(new.device_id, new.type_id, new.credential)

    def api_key(self, *, devices: tuple[str, ...] = (), roles: Roles) -> dict[str, str]:
        new = create_api_key(self.ctx, roles=roles, devices=devices, created_by="test")
        token = base64.b64encode(f"{new.key}:{new.password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    @property
    def platform_key(self) -> CommandPublicKey:
        return command_signing_key(self.ctx.store, self.ctx.master).public

    def service_publisher(self) -> CommandPublisher:
        """iotvault's own account, to put hand-made messages on a command topic."""
        password = broker_service_password(self.ctx.store, self.ctx.master)
        return CommandPublisher(HOST, self.mqtt_port, username=SERVICE_USERNAME, password=password)

    def device(self, cred: DeviceCredential, **kwargs: Any) -> DeviceClient:
        kwargs.setdefault("platform_key", self.platform_key)
        kwargs.setdefault("state_file", None)
        kwargs.setdefault("on_command", None)
        client = DeviceClient(cred, HOST, self.mqtt_port, reconnect_max=0.5, **kwargs)
        self.clients.append(client)
        return client

    async def raw(self, client_id: str, username: str | None, password: str | None) -> RawClient:
        raw = RawClient(client_id)
        self.clients.append(raw)
        await raw.connect(self.mqtt_port, username, password)
        return raw

    async def security_events(self, **params: Any) -> list[dict[str, Any]]:
        admin = self.api_key(roles=Roles(admin=True))
        r = await self.http.get("/iotf/security/events", headers=admin, params={"count": 1000, **params})
        assert r.status_code == 200, r.text
        return list(r.json()["events"])


async def refused(platform: Platform, client_id: str, username: str | None, password: str | None) -> int:
    """Connect and expect a refusal; return the CONNACK code."""
    raw = RawClient(client_id)
    platform.clients.append(raw)
    with pytest.raises(gmqtt.MQTTConnectError) as info:
        await raw.connect(platform.mqtt_port, username, password)
    return int(info.value.args[0])


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {within}s: {what}")


@pytest.fixture(params=["embedded", "mosquitto"])
async def platform(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Platform]:
    monkeypatch.setattr(wiring, "REVALIDATE_S", 0.5)
    env = {
        "IOTVAULT_DATA_DIR": str(tmp_path / "data"),
        "IOTVAULT_HTTP_PORT": str(free_port()),
        "IOTVAULT_MQTT_PORT": str(free_port()),
        "IOTVAULT_INGEST_CLIENT_ID": f"ingest-{uuid.uuid4().hex[:8]}",
    }
    mosquitto = None
    if request.param == "mosquitto":
        mosquitto = DynsecMosquitto(tmp_path / "mosquitto")
        mosquitto.start()
        env |= {
            "IOTVAULT_BROKER_URL": f"mqtt://{HOST}:{mosquitto.port}",
            "IOTVAULT_BROKER_ADMIN_USERNAME": mosquitto.admin_username,
            "IOTVAULT_BROKER_ADMIN_PASSWORD": mosquitto.admin_password,
            "IOTVAULT_BROKER_LOG_FILE": str(mosquitto.log),
        }
    settings = load_settings(environ=env)
    async with running(settings, mosquitto) as p:
        yield p


@contextlib.asynccontextmanager
async def running(
    settings: Settings, mosquitto: DynsecMosquitto | None, *, role: Role = Role.ALL
) -> AsyncIterator[Platform]:
    ctx = await asyncio.to_thread(open_context, settings)
    node = Node(settings, role)
    ready = asyncio.Event()
    task = asyncio.create_task(node.run(lambda _n: ready.set()))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED, timeout=30)
    loop = asyncio.get_running_loop()
    try:
        if task.done():
            task.result()
        assert ready.is_set(), "the node did not start"
        port = mosquitto.port if mosquitto is not None else settings.mqtt_port
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{settings.http_port}", timeout=10) as http:
            kind = "embedded" if mosquitto is None else "mosquitto"
            p = Platform(kind, settings, ctx, node, http, port, mosquitto)
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
        if mosquitto is not None:
            mosquitto.stop()


# ---- credentials ------------------------------------------------------------------------------
async def test_wrong_password_and_unknown_devices_are_refused(platform: Platform) -> None:
    cred = platform.register("door-1")
    assert await refused(platform, "door-1", "door-1", "not-the-credential") == 5
    assert await refused(platform, "ghost", "ghost", cred.password) == 5
    assert await refused(platform, "door-1", "door-1", None) == 5
    assert await refused(platform, "door-1", None, None) == 5
    ok = await platform.raw("door-1", "door-1", cred.password)
    await ok.close()

    async def recorded() -> bool:
        # identical refusals (door-1 from this address) are one row until the window closes
        subjects = {e["subject"] for e in await platform.security_events() if e["kind"] == "login_failed"}
        return subjects >= ({"door-1", "ghost"} if platform.kind == "embedded" else {"<unknown>"})

    await eventually(recorded, what="failed logins as security events")
    failed = [e for e in await platform.security_events() if e["kind"] == "login_failed"]
    # four refusals; repeats of one (subject, address, reason) are counted in a later row
    if platform.kind == "embedded":
        assert sorted(e["subject"] for e in failed) == ["door-1", "ghost"]
        assert all(e["address"].startswith("127.0.0.1:") for e in failed)
    else:  # from Mosquitto's log, which names the address but not the client
        assert [(e["subject"], e["address"]) for e in failed] == [("<unknown>", "127.0.0.1")]


async def test_a_device_cannot_reach_beyond_its_own_topics(platform: Platform) -> None:
    a, b = platform.register("unit-a"), platform.register("unit-b")
    dev_b = await platform.raw("unit-b", "unit-b", b.password)
    assert await dev_b.subscribe("iot-2/type/thermo/id/unit-b/cmd/+/fmt/json") == (1,)
    dev_a = await platform.raw("unit-a", "unit-a", a.password)
    assert await dev_a.subscribe("#") == (0x80,)
    assert await dev_a.subscribe("iot-2/type/+/id/+/cmd/+/fmt/json") == (0x80,)
    assert await dev_a.subscribe("iot-2/type/thermo/id/unit-b/cmd/+/fmt/json") == (0x80,)
    assert await dev_a.subscribe("iot-2/type/thermo/id/unit-a/cmd/#") == (0x80,)
    assert await dev_a.subscribe("$SYS/#") == (0x80,)
    assert await dev_a.subscribe("iot-2/type/thermo/id/unit-a/cmd/+/fmt/json") == (1,)

    # A cannot take B's client id, and trying does not disturb B
    assert await refused(platform, "unit-b", "unit-a", a.password) == 5
    assert await refused(platform, "unit-b", "unit-b", a.password) == 5
    assert not dev_b.disconnected.is_set()

    # A publishes as B, on B's command topic, as another type: nothing is stored or delivered.
    # Each from a connection of its own: the embedded broker ends an offender's connection, and
    # a publish sent while that end was still on its way was lost (seen once on a loaded machine)
    for topic in (
        "iot-2/type/thermo/id/unit-b/evt/reading/fmt/json",
        "iot-2/type/thermo/id/unit-b/cmd/open/fmt/json",
        "iot-2/type/other/id/unit-a/evt/reading/fmt/json",
    ):
        dev_a = await platform.raw("unit-a", "unit-a", a.password)
        dev_a.client.publish(topic, b'{"forged": true}', qos=1)
        await asyncio.sleep(0.3)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(dev_b.messages.get(), 0.5)
    assert platform.ctx.store.count_events() == 0

    async def denied() -> bool:
        events = await platform.security_events()
        return sum(e["kind"] == "acl_denied" and e.get("action") == "publish" for e in events) >= 3

    await eventually(denied, what="publish denials as security events")
    publish_denials = [
        (e["subject"], e["topic"])
        for e in await platform.security_events()
        if e["kind"] == "acl_denied" and e["action"] == "publish"
    ]
    assert sorted(publish_denials) == sorted(
        ("unit-a", t)
        for t in (
            "iot-2/type/thermo/id/unit-b/evt/reading/fmt/json",
            "iot-2/type/thermo/id/unit-b/cmd/open/fmt/json",
            "iot-2/type/other/id/unit-a/evt/reading/fmt/json",
        )
    )
    if platform.kind == "embedded":
        await asyncio.wait_for(dev_a.disconnected.wait(), 10)  # the last offender's connection ended
        subscribe_denials = [
            e
            for e in await platform.security_events()
            if e["kind"] == "acl_denied" and e["action"] == "subscribe"
        ]
        assert {e["topic"] for e in subscribe_denials} >= {"#", "$SYS/#"}

    # and its own event goes through
    dev_a2 = await platform.raw("unit-a", "unit-a", a.password)
    dev_a2.client.publish("iot-2/type/thermo/id/unit-a/evt/reading/fmt/json", b'{"t": 21}', qos=1)

    async def stored() -> bool:
        return platform.ctx.store.count_events("unit-a") == 1

    await eventually(stored, what="A's own event stored")
    assert platform.ctx.store.count_events() == 1


async def test_rotation_grace_revocation_and_deletion(platform: Platform) -> None:
    cred = platform.register("valve-1")
    early = await platform.raw("valve-1", "valve-1", cred.password)
    new = rotate_device_credential(platform.ctx, "valve-1", grace_s=2)
    rotated_at = time.monotonic()
    if platform.kind == "embedded":
        # the old credential works during the grace period ...
        during = await platform.raw("valve-1", "valve-1", cred.password)
        await asyncio.sleep(max(0.0, 2.3 - (time.monotonic() - rotated_at)))
        # ... and not after it; a connection made with it is ended
        assert await refused(platform, "valve-1", "valve-1", cred.password) == 5
        await asyncio.wait_for(during.disconnected.wait(), 3)
        assert early.disconnected.is_set()
    else:
        # Mosquitto keeps one password per client: the change is immediate, and drops the device
        await asyncio.wait_for(early.disconnected.wait(), 3)
        assert await refused(platform, "valve-1", "valve-1", cred.password) == 5
    current = await platform.raw("valve-1", "valve-1", new)

    revoke_device_credential(platform.ctx, "valve-1")
    await asyncio.wait_for(current.disconnected.wait(), 5)
    assert await refused(platform, "valve-1", "valve-1", new) == 5
    newest = rotate_device_credential(platform.ctx, "valve-1")
    again = await platform.raw("valve-1", "valve-1", newest)

    delete_device(platform.ctx, "valve-1")
    await asyncio.wait_for(again.disconnected.wait(), 5)
    assert await refused(platform, "valve-1", "valve-1", newest) == 5


# ---- commands ---------------------------------------------------------------------------------
async def test_a_writers_command_is_obeyed_and_a_readers_never_leaves(platform: Platform) -> None:
    cred = platform.register("lamp-1")
    platform.register("lamp-2")
    seen: list[Command] = []

    async def handler(command: Command) -> dict[str, Any]:
        seen.append(command)
        return {"brightness": command.payload["brightness"]}

    device = platform.device(cred, on_command=handler)
    await device.connect()
    writer = platform.api_key(devices=("lamp-1",), roles=Roles(reader=True, writer=True))
    reader = platform.api_key(devices=("lamp-1",), roles=Roles(reader=True))
    assert await device.wait_commands_ready(5)

    r = await platform.http.post(
        "/iotf/devices/lamp-1/commands",
        headers=writer,
        json={"command": "dim", "payload": {"brightness": 40}, "expiresInSeconds": 60},
    )
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "sent"
    command_id = r.json()["commandId"]

    async def acknowledged() -> bool:
        s = await platform.http.get(f"/iotf/devices/lamp-1/commands/{command_id}", headers=writer)
        assert s.status_code == 200, s.text
        return bool(s.json()["status"] == "acknowledged")

    await eventually(acknowledged, what="the command acknowledged")
    assert [(c.name, dict(c.payload), c.command_id) for c in seen] == [
        ("dim", {"brightness": 40}, command_id)
    ]
    status = (await platform.http.get(f"/iotf/devices/lamp-1/commands/{command_id}", headers=writer)).json()
    assert status["deviceId"] == "lamp-1"
    assert status["command"] == "dim"
    assert status["issued"].endswith("Z")
    # the answer updated the command; it is not stored as an event
    assert platform.ctx.store.count_events("lamp-1") == 0

    # a reader: 403, nothing signed, recorded or published
    r = await platform.http.post(
        "/iotf/devices/lamp-1/commands", headers=reader, json={"command": "dim", "payload": {"brightness": 1}}
    )
    assert r.status_code == 403
    assert r.headers["content-type"] == "application/problem+json"
    r = await platform.http.get(f"/iotf/devices/lamp-1/commands/{command_id}", headers=reader)
    assert r.status_code == 403
    # a device the writer may not read: as if it did not exist
    r = await platform.http.post("/iotf/devices/lamp-2/commands", headers=writer, json={"command": "dim"})
    assert r.status_code == 404
    # what cannot be signed or sent is refused before anything is recorded
    for body in (
        b'{"command": "dim", "payload": {"x": "' + b"y" * 20_000 + b'"}}',
        b'{"command": "dim", "payload": {"x": NaN}}',
        b'{"command": "dim/../x"}',
        b'{"command": "dim", "expiresInSeconds": 0}',
    ):
        r = await platform.http.post(
            "/iotf/devices/lamp-1/commands",
            headers={**writer, "content-type": "application/json"},
            content=body,
        )
        assert r.status_code == 422, (body[:40], r.text)
    await asyncio.sleep(1.0)
    assert len(seen) == 1
    assert device._commands is not None
    assert device._commands.accepted + device._commands.rejected == 1
    with platform.ctx.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(commands)).scalar_one() == 1

    # audited with who sent it
    audit = [e for e in await platform.security_events() if e["kind"] == "command"]
    assert len(audit) == 1
    assert audit[0]["subject"].startswith("api_key:")
    assert audit[0]["commandId"] == command_id

    # the public key devices verify with
    r = await platform.http.get("/iotf/commands/public-key", headers=reader)
    assert r.status_code == 200
    assert CommandPublicKey.from_text(r.json()["pem"]) == platform.platform_key
    r = await platform.http.get("/iotf/commands/public-key")
    assert r.status_code == 401


async def test_forged_unsigned_expired_and_replayed_commands_are_refused_and_reported(
    platform: Platform, tmp_path: Path
) -> None:
    cred = platform.register("safe-1")
    obeyed: list[str] = []

    def handler(command: Command) -> None:
        if command.name == "explode":
            raise CommandRejectedError("not_today")
        obeyed.append(command.command_id)

    state = tmp_path / "device-state" / "safe-1.json"
    device = platform.device(cred, on_command=handler, state_file=state)
    await device.connect()
    assert await device.wait_commands_ready(5)
    topic = "iot-2/type/thermo/id/safe-1/cmd/open/fmt/json"
    service = CommandService(platform.ctx)
    publisher = platform.service_publisher()
    platform.clients.append(publisher)

    genuine = service.prepare("safe-1", "open", {"door": 1}, sent_by="test")
    refused_ = service.prepare("safe-1", "explode", {}, sent_by="test")
    short = service.prepare("safe-1", "open", {"door": 2}, sent_by="test", expires_in_s=1)
    jws = json.loads(genuine.message)["jws"]
    header, body, signature = jws.split(".")
    other_key = CommandSigningKey.generate()
    tampered_body = b64url(
        json.dumps({**json.loads(base64.urlsafe_b64decode(body + "==")), "payload": {"door": 99}}).encode()
    )
    forged_id = str(uuid.uuid4())

    await publisher.publish(topic, json.dumps({"command": "open", "commandId": forged_id}).encode())
    await publisher.publish(topic, command_message(other_key.sign({"commandId": forged_id})))
    await publisher.publish(topic, command_message(f"{header}.{tampered_body}.{signature}"))
    await publisher.publish(topic, genuine.message)
    await publisher.publish(topic, genuine.message)  # replayed
    await publisher.publish("iot-2/type/thermo/id/safe-1/cmd/explode/fmt/json", refused_.message)
    await publisher.publish("iot-2/type/thermo/id/safe-1/cmd/close/fmt/json", genuine.message)  # wrong topic
    await asyncio.sleep(1.2)
    await publisher.publish(topic, short.message)  # expired on arrival

    async def all_answered() -> bool:
        return len(await _command_events(platform)) >= 7

    await eventually(all_answered, within=15, what="every refusal reported")
    reasons = sorted((e["reason"], e["verified"], e["matched"]) for e in await _command_events(platform))
    assert reasons == sorted(
        [
            ("unsigned", False, False),
            ("unknown_key", False, False),
            ("bad_signature", False, False),
            ("replayed", True, False),
            ("not_today", True, True),
            ("wrong_topic", True, False),
            ("expired", True, True),
        ]
    )
    assert obeyed == [genuine.record.command_id]

    async def status(command_id: str) -> str:
        return str(platform.ctx.store.get_command("safe-1", command_id).status)  # type: ignore[union-attr]

    assert await status(genuine.record.command_id) == "acknowledged"  # a replay does not undo it
    assert await status(refused_.record.command_id) == "rejected"
    assert await status(short.record.command_id) == "expired"
    assert platform.ctx.store.get_command("safe-1", refused_.record.command_id).reason == "not_today"  # type: ignore[union-attr]

    # the replay state survives a restart of the device
    await device.close()
    again = platform.device(cred, on_command=handler, state_file=state)
    await again.connect()
    assert await again.wait_commands_ready(5)
    await publisher.publish(topic, genuine.message)

    async def replay_refused() -> bool:
        return sum(e["reason"] == "replayed" for e in await _command_events(platform)) == 2

    await eventually(replay_refused, what="the replay refused after a restart")
    assert obeyed == [genuine.record.command_id]


async def _command_events(platform: Platform) -> list[dict[str, Any]]:
    return [e for e in await platform.security_events() if e["kind"] == "command_rejected"]


# ---- presence ---------------------------------------------------------------------------------
async def test_connect_and_disconnect_set_online_offline_and_last_seen(platform: Platform) -> None:
    cred = platform.register("probe-1")
    reader = platform.api_key(devices=("probe-1",), roles=Roles(reader=True))

    async def status() -> dict[str, Any]:
        r = await platform.http.get("/iotf/devices", headers=reader)
        return dict(r.json()["devices"][0])

    assert (await status())["status"] == "offline"
    raw = RawClient("probe-1")
    raw.client._will_message = gmqtt.Message(  # what every device sets: its will, on its status topic
        "iot-2/type/thermo/id/probe-1/mon", b'{"status":"disconnected"}', qos=1
    )
    platform.clients.append(raw)
    await raw.connect(platform.mqtt_port, "probe-1", cred.password)
    raw.client.publish("iot-2/type/thermo/id/probe-1/mon", b'{"status":"connected"}', qos=1)

    async def online() -> bool:
        return (await status())["status"] == "online"

    await eventually(online, what="online after connecting")
    first_seen = (await status())["lastSeen"]
    assert first_seen is not None
    if platform.kind == "embedded":  # presence is the broker's: a connected device's claim is ignored
        raw.client.publish("iot-2/type/thermo/id/probe-1/mon", b'{"status":"disconnected"}', qos=1)
        await asyncio.sleep(1.0)
        assert (await status())["status"] == "online"
    # the connection is lost without a DISCONNECT: the will (Mosquitto) or the broker says offline
    raw.client._connection._transport.abort()

    async def offline() -> bool:
        return (await status())["status"] == "offline"

    await eventually(offline, what="offline after the connection was lost")
    assert (await status())["lastSeen"] >= first_seen


# ---- the embedded broker's throttle -----------------------------------------------------------
async def test_repeated_failures_are_throttled_and_recorded(tmp_path: Path) -> None:
    env = {
        "IOTVAULT_DATA_DIR": str(tmp_path / "data"),
        "IOTVAULT_HTTP_PORT": str(free_port()),
        "IOTVAULT_MQTT_PORT": str(free_port()),
        "IOTVAULT_SECURITY_EVENTS_WINDOW_S": "1",
    }
    async with running(load_settings(environ=env), None) as platform:
        cred = platform.register("gate-1")
        for _ in range(5):
            assert await refused(platform, "gate-1", "gate-1", "guess") == 5
        # now even the right password is refused from this address, without being checked
        assert await refused(platform, "gate-1", "gate-1", cred.password) == 5
        other = platform.register("gate-2")
        ok = await platform.raw("gate-2", "gate-2", other.password)  # other devices still connect
        await ok.close()

        async def counted() -> bool:
            events = await platform.security_events()
            return any(e["kind"] == "login_throttled" for e in events) and any(
                e["kind"] == "login_failed" and e.get("repeated") for e in events
            )

        await eventually(counted, what="a throttled login, and the repeated failures counted")
        rows = [e for e in await platform.security_events() if e.get("subject") == "gate-1"]
        # five failures in one window: the first as it happened, then one row counting the other four
        failed = [e.get("count", 1) for e in rows if e["kind"] == "login_failed"]
        assert sorted(failed) == [1, 4]
        assert [e["kind"] for e in rows].count("login_throttled") == 1


# ---- TLS ----------------------------------------------------------------------------------------
def _certs(directory: Path) -> dict[str, str]:
    result = CliRunner().invoke(
        cli_app, ["certs", str(directory), "--host", "127.0.0.1", "--host", "localhost", "--json"]
    )
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


async def test_mqtts_to_mosquitto_with_a_private_ca_from_iotvault_certs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = _certs(tmp_path / "pki")
    mosquitto = DynsecMosquitto(
        tmp_path / "mosquitto", tls=(Path(pki["server_cert"]), Path(pki["server_key"]))
    )
    mosquitto.start()
    env = {
        "IOTVAULT_DATA_DIR": str(tmp_path / "data"),
        "IOTVAULT_HTTP_PORT": str(free_port()),
        "IOTVAULT_BROKER_URL": f"mqtts://127.0.0.1:{mosquitto.port}",
        "IOTVAULT_BROKER_ADMIN_USERNAME": mosquitto.admin_username,
        "IOTVAULT_BROKER_ADMIN_PASSWORD": mosquitto.admin_password,
        "IOTVAULT_BROKER_CA_FILE": pki["ca_cert"],
        "IOTVAULT_INGEST_CLIENT_ID": f"ingest-{uuid.uuid4().hex[:8]}",
    }
    try:
        # without the CA, iotvault does not trust the broker and says so at start
        wrong = load_settings(environ={**env, "IOTVAULT_BROKER_CA_FILE": ""})
        with pytest.raises(BrokerUnavailableError, match="certificate verify failed"):
            async with running(wrong, None):
                pass
        async with running(load_settings(environ=env), mosquitto) as platform:
            cred = platform.register("tls-1")  # the account is made over TLS too
            seen: list[str] = []
            device = platform.device(
                cred, ssl=client_context(pki["ca_cert"]), on_command=lambda c: seen.append(c.name)
            )
            await device.connect()
            await device.publish_event("reading", {"t": 20})
            assert await device.wait_acknowledged(10)

            async def stored() -> bool:
                return platform.ctx.store.count_events("tls-1") == 1

            await eventually(stored, what="an event over TLS stored")
            writer = platform.api_key(devices=("tls-1",), roles=Roles(reader=True, writer=True))
            assert await device.wait_commands_ready(5)
            r = await platform.http.post(
                "/iotf/devices/tls-1/commands", headers=writer, json={"command": "ping"}
            )
            assert r.status_code == 202, r.text

            async def obeyed() -> bool:
                return seen == ["ping"]

            await eventually(obeyed, what="a command over TLS")
            # a device that does not trust the CA refuses the broker
            stranger = DeviceClient(
                cred,
                HOST,
                mosquitto.port,
                platform_key=platform.platform_key,
                state_file=None,
                on_command=None,
                ssl=client_context(),
            )
            with pytest.raises(DeviceRefusedError, match="not trusted"):
                await stranger.connect()
            await stranger.close()
            # and plaintext MQTT is not spoken on the TLS port
            with pytest.raises((TimeoutError, OSError, gmqtt.MQTTConnectError)):
                await platform.raw("tls-1", "tls-1", cred.password)
    finally:
        mosquitto.stop()


async def test_the_embedded_broker_serves_tls(tmp_path: Path) -> None:
    pki = _certs(tmp_path / "pki")
    env = {
        "IOTVAULT_DATA_DIR": str(tmp_path / "data"),
        "IOTVAULT_HTTP_PORT": str(free_port()),
        "IOTVAULT_MQTT_PORT": str(free_port()),
        "IOTVAULT_MQTT_TLS_CERT_FILE": pki["server_cert"],
        "IOTVAULT_MQTT_TLS_KEY_FILE": pki["server_key"],
    }
    async with running(load_settings(environ=env), None) as platform:
        cred = platform.register("tls-2")
        device = platform.device(cred, ssl=client_context(pki["ca_cert"]))
        await device.connect()
        await device.publish_event("reading", {"t": 21})
        assert await device.wait_acknowledged(10)
        assert platform.ctx.store.count_events("tls-2") == 1


def test_command_key_on_the_command_line_is_the_one_that_signs(tmp_path: Path) -> None:
    env = {"IOTVAULT_DATA_DIR": str(tmp_path / "data")}
    runner = CliRunner()
    pem = runner.invoke(cli_app, ["devices", "command-key"], env=env)
    assert pem.exit_code == 0, pem.output
    doc = runner.invoke(cli_app, ["devices", "command-key", "--json"], env=env)
    key = CommandPublicKey.from_text(pem.stdout)
    assert json.loads(doc.stdout)["kid"] == key.kid
    settings = load_settings(environ=env)
    ctx = open_context(settings)
    try:
        register_device(ctx, "thermo", "k-1")
        outgoing = CommandService(ctx).prepare("k-1", "open", {}, sent_by="test")
        jws = json.loads(outgoing.message)["jws"]
        assert key.verify(jws)["deviceId"] == "k-1"
        # it is not the OpenID Connect key, and it is stored only wrapped by the master key
        stored = ctx.store.get_meta("command_signing_key")
        assert stored is not None
        assert stored.startswith("v1:")
        raw = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("iotvault.db*"))
        assert command_signing_key(ctx.store, ctx.master).seed() not in raw
    finally:
        ctx.close()
    revoked = runner.invoke(cli_app, ["devices", "revoke-credential", "k-1", "--yes"], env=env)
    assert revoked.exit_code == 0, revoked.output
    ctx = open_context(settings)
    try:
        assert ctx.store.device_credentials(["k-1"])["k-1"].credential_hash is None
    finally:
        ctx.close()


async def test_simulated_devices_obey_and_acknowledge_commands(platform: Platform, tmp_path: Path) -> None:
    creds = [platform.register(f"sim-{i}") for i in range(2)]
    writer = platform.api_key(devices=("sim-1",), roles=Roles(reader=True, writer=True))
    plan = SimulationPlan(devices=creds, rate=5.0, count=None, event_type="reading")
    support = CommandSupport(platform.platform_key, tmp_path / "simulator")
    sim = asyncio.create_task(run_simulation(HOST, platform.mqtt_port, plan, commands=support))
    try:

        async def publishing() -> bool:
            return platform.ctx.store.count_events("sim-1") > 0

        await eventually(publishing, what="the simulated device publishing")
        r = await platform.http.post(
            "/iotf/devices/sim-1/commands", headers=writer, json={"command": "reboot", "payload": {"in": 0}}
        )
        assert r.status_code == 202, r.text
        url = f"/iotf/devices/sim-1/commands/{r.json()['commandId']}"

        async def acknowledged() -> bool:
            return (await platform.http.get(url, headers=writer)).json()["status"] == "acknowledged"

        await eventually(acknowledged, what="the simulated device's answer")
        state = json.loads((tmp_path / "simulator" / "sim-1.json").read_text())
        assert state["deviceId"] == "sim-1"
        assert state["maxSeq"] == 1
        assert not (tmp_path / "simulator" / "sim-0.json").exists()
    finally:
        sim.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sim


async def test_an_api_node_sends_commands_through_the_ingest_nodes_embedded_broker(tmp_path: Path) -> None:
    """Scale-out: the API node has no broker; it sends as iotvault's own broker account."""
    env = {
        "IOTVAULT_DATA_DIR": str(tmp_path / "data"),
        "IOTVAULT_HTTP_PORT": str(free_port()),
        "IOTVAULT_MQTT_PORT": str(free_port()),
    }
    settings = load_settings(environ=env)
    ingest = Node(settings, Role.INGEST)
    started = asyncio.Event()
    ingest_task = asyncio.create_task(ingest.run(lambda _n: started.set()))
    try:
        await asyncio.wait_for(started.wait(), 30)
        async with running(settings, None, role=Role.API) as platform:
            assert platform.node.broker is None
            cred = platform.register("relay-1")
            seen: list[str] = []
            device = platform.device(cred, on_command=lambda c: seen.append(c.name))
            await device.connect()
            assert await device.wait_commands_ready(5)
            writer = platform.api_key(devices=("relay-1",), roles=Roles(reader=True, writer=True))
            r = await platform.http.post(
                "/iotf/devices/relay-1/commands", headers=writer, json={"command": "on"}
            )
            assert r.status_code == 202, r.text
            url = f"/iotf/devices/relay-1/commands/{r.json()['commandId']}"

            async def acknowledged() -> bool:
                return (await platform.http.get(url, headers=writer)).json()["status"] == "acknowledged"

            await eventually(acknowledged, what="acknowledged through the other node")
            assert seen == ["on"]
            # the service account may publish commands, and nothing else
            password = broker_service_password(platform.ctx.store, platform.ctx.master)
            service = await platform.raw("iotvault:spy", SERVICE_USERNAME, password)
            assert await service.subscribe("iot-2/type/+/id/+/cmd/+/fmt/json") == (0x80,)
            assert await refused(platform, "relay-1", SERVICE_USERNAME, password) == 5  # not as a device
    finally:
        ingest.stop()
        await asyncio.wait_for(ingest_task, 20)


async def test_ingest_in_a_share_group_passes_mosquittos_dynamic_security(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service account's ACL names the plain event filter; Mosquitto must accept the
    ``$share/<group>/`` subscription of an ingest node under it (docs/design/cluster.md)."""
    mosquitto = DynsecMosquitto(tmp_path / "mosquitto")
    mosquitto.start()
    env = {
        "IOTVAULT_DATA_DIR": str(tmp_path / "data"),
        "IOTVAULT_HTTP_PORT": str(free_port()),
        "IOTVAULT_INGEST_CLIENT_ID": f"ingest-{uuid.uuid4().hex[:8]}",
        "IOTVAULT_INGEST_SHARE_GROUP": "ingest",
        "IOTVAULT_BROKER_URL": f"mqtt://{HOST}:{mosquitto.port}",
        "IOTVAULT_BROKER_ADMIN_USERNAME": mosquitto.admin_username,
        "IOTVAULT_BROKER_ADMIN_PASSWORD": mosquitto.admin_password,
    }
    async with running(load_settings(environ=env), mosquitto) as platform:
        cred = platform.register("shared-1")
        dev = await platform.raw("shared-1", "shared-1", cred.password)
        dev.client.publish("iot-2/type/thermo/id/shared-1/evt/reading/fmt/json", b'{"t": 1}', qos=1)

        async def stored() -> bool:
            return platform.ctx.store.count_events("shared-1") == 1

        await eventually(stored, what="an event through the shared subscription")
    # A restart (or a second node) finds the service account made: its start must not fail
    # (Mosquitto 2.0 answers "Internal error" to adding a role the client already holds). The
    # broker comes back with its dynamic-security file, which holds the account.
    mosquitto.start()
    async with running(load_settings(environ=env), mosquitto) as again:

        async def ready() -> bool:
            return (await again.http.get("/readyz")).status_code == 200

        await eventually(ready, within=20.0, what="the second start ready on the same broker")
