"""The unmodified Watson IoT Platform SDK (``wiotp-sdk`` 1.0.1) against a real iotvault node.

The SDK connects only to ``<org>.messaging.<domain>`` on 1883 or 8883 (TLS verified against
``options.mqtt.caFile``): the embedded broker serves TLS on a loopback address of its own, port
8883, with a certificate from ``iotvault.certs`` for that name, and the name resolves there for
the SDK's process only (``tests/wiotp_venv.py``). Every SDK process ends by itself, and is
killed if it does not: the SDK reconnects forever after a refusal.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import signal
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
from helpers import free_port

from iotvault.accounts import create_api_key
from iotvault.certs import write_certs
from iotvault.config import Settings, load_settings
from iotvault.context import Context, open_context
from iotvault.devices import register_device
from iotvault.domain.accounts import Roles
from iotvault.node import Node, Role
from wiotp_venv import sdk_command

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

ORG = "myorg"
DOMAIN = "iotvault.test"
NAME = f"{ORG}.messaging.{DOMAIN}"
PORT = 8883  # the only TLS port the SDK accepts


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Platform:
    settings: Settings
    ctx: Context
    http: httpx.AsyncClient
    address: str
    ca_file: Path
    workdir: Path
    transport: str

    def basic(self, key: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{key}:{password}".encode()).decode()}

    def sdk_config(self, **values: Any) -> dict[str, Any]:
        return {"domain": DOMAIN, "caFile": str(self.ca_file), "workdir": str(self.workdir), **values}


@pytest.fixture
async def platform(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Platform]:
    """A node whose broker serves TLS on ``<address>:8883``: MQTT, or MQTT over WebSocket when
    the test asks for ``"websockets"`` (the SDK's ``transport``), its MQTT port then elsewhere."""
    transport = getattr(request, "param", "tcp")
    # a loopback address of this test's own: 127.0.0.1:8883 may be taken, and so may another's
    address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"  # noqa: S311
    files = write_certs(tmp_path / "certs", [NAME])
    ports = {"IOTVAULT_MQTT_PORT": str(PORT)}
    if transport == "websockets":
        ports = {"IOTVAULT_MQTT_PORT": str(free_port()), "IOTVAULT_MQTT_WS_PORT": str(PORT)}
    settings = load_settings(
        environ={
            "IOTVAULT_DATA_DIR": str(tmp_path / "data"),
            "IOTVAULT_HTTP_PORT": str(free_port()),
            "IOTVAULT_MQTT_HOST": address,
            **ports,
            "IOTVAULT_MQTT_TLS_CERT_FILE": str(files.server_cert),
            "IOTVAULT_MQTT_TLS_KEY_FILE": str(files.server_key),
            "IOTVAULT_BROKER_CA_FILE": str(files.ca_cert),
            "IOTVAULT_ORG_ID": ORG,
        }
    )
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
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=10) as http:
            yield Platform(settings, ctx, http, address, files.ca_cert, tmp_path, transport)
    finally:
        waiter.cancel()
        node.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 20)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        ctx.close()


class Sdk:
    """One SDK process; its JSON lines as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.seen: list[dict[str, Any]] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def run(cls, platform: Platform, role: str, **config: Any) -> AsyncIterator[Sdk]:
        argv = await asyncio.to_thread(
            sdk_command, role, platform.sdk_config(**config), address=platform.address, name=NAME
        )
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        sdk = cls(proc)
        try:
            yield sdk
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()

    async def line(self, timeout: float = 20.0) -> dict[str, Any]:  # noqa: ASYNC109 -- per line
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            raise AssertionError(f"the SDK process ended: {await self.stderr()}")
        got: dict[str, Any] = json.loads(raw)
        self.seen.append(got)
        if "error" in got:
            raise AssertionError(f"the SDK says: {got['error']}\n{await self.stderr()}")
        return got

    async def until_finished(self) -> list[dict[str, Any]]:
        lines = []
        while "finished" not in (got := await self.line(40)):
            lines.append(got)
        return lines

    async def stderr(self) -> str:
        if self.proc.returncode is None:
            self.proc.kill()
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode(errors="replace")[-3000:]


@pytest.mark.parametrize("platform", ["tcp", "websockets"], indirect=True)
async def test_sdk_device_publishes_over_tls_and_gets_a_signed_command(platform: Platform) -> None:
    device = register_device(platform.ctx, "rpi", "sdkdev1")
    admin = create_api_key(
        platform.ctx, roles=Roles(reader=True, writer=True), devices=("sdkdev1",), created_by="test"
    )
    config = {
        "org": ORG,
        "typeId": "rpi",
        "deviceId": "sdkdev1",
        "token": device.credential,
        "events": [["temp", "json", {"t": 21.5}]],
        "stop_after": 1,
        "timeout_s": 30,
        "transport": platform.transport,
    }
    async with Sdk.run(platform, "device", **config) as sdk:
        assert await sdk.line() == {"ready": True}
        assert await sdk.line() == {"published": "temp", "acknowledged": True}  # QoS 1: stored
        r = await platform.http.get("/iotf/devices/sdkdev1", headers=platform.basic(*admin))
        assert r.status_code == 200
        (event,) = r.json()["events"]
        assert (event["eventType"], event["format"], event["payload"]) == ("temp", "json", {"t": 21.5})
        r = await platform.http.post(
            "/iotf/devices/sdkdev1/commands",
            headers=platform.basic(*admin),
            json={"command": "blink", "payload": {"times": 3}},
        )
        assert r.status_code == 202, r.text
        got = await sdk.line()
        assert got["command"]["commandId"] == "blink"
        assert got["command"]["format"] == "json"
        assert set(got["command"]["data"]) == {"jws"}  # signed by iotvault: the default
        assert "finished" in await sdk.line()


async def test_sdk_device_sends_text_and_bytes_and_gets_unsigned_commands_as_sent(platform: Platform) -> None:
    from iotvault.devices import set_command_delivery  # noqa: PLC0415
    from iotvault.domain.commands import Delivery  # noqa: PLC0415

    device = register_device(platform.ctx, "rpi", "sdkdev9")
    set_command_delivery(platform.ctx, "sdkdev9", Delivery.UNSIGNED)
    admin = create_api_key(
        platform.ctx, roles=Roles(reader=True, writer=True), devices=("sdkdev9",), created_by="test"
    )
    config = {
        "org": ORG,
        "typeId": "rpi",
        "deviceId": "sdkdev9",
        "token": device.credential,
        "events": [["note", "utf8", "door open"]],  # the SDK's text codec
        "stop_after": 1,
        "timeout_s": 30,
    }
    async with Sdk.run(platform, "device", **config) as sdk:
        assert await sdk.line() == {"ready": True}
        assert await sdk.line() == {"published": "note", "acknowledged": True}
        r = await platform.http.get("/iotf/devices/sdkdev9", headers=platform.basic(*admin))
        shown = {
            e["eventType"]: (e["format"], e["payloadEncoding"], e["payload"]) for e in r.json()["events"]
        }
        assert shown["note"] == ("utf8", "text", "door open")
        r = await platform.http.post(
            "/iotf/devices/sdkdev9/commands",
            headers=platform.basic(*admin),
            json={"command": "blink", "payload": {"times": 3}},
        )
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "delivered"
        got = await sdk.line()
        assert got["command"]["commandId"] == "blink"
        assert got["command"]["data"] == {"times": 3}  # as sent: what a Watson device expects
        assert "finished" in await sdk.line()


async def test_sdk_device_with_a_wrong_token_is_refused_and_does_not_hang(platform: Platform) -> None:
    register_device(platform.ctx, "rpi", "sdkdev2")
    config = {
        "org": ORG,
        "typeId": "rpi",
        "deviceId": "sdkdev2",
        "token": "not-the-credential",
        "timeout_s": 5,
    }
    async with Sdk.run(platform, "device", **config) as sdk:
        with pytest.raises((AssertionError, TimeoutError)):
            await sdk.line(timeout=8)  # never "ready": refused, and the SDK keeps retrying
    r = await platform.http.get(
        "/iotf/security/events",
        headers=platform.basic(*_admin_key(platform)),
        params={"kind": "login_failed"},
    )
    assert any(e["subject"] == f"d:{ORG}:rpi:sdkdev2" for e in r.json()["events"])


def _admin_key(platform: Platform) -> tuple[str, str]:
    return create_api_key(platform.ctx, roles=Roles(admin=True), created_by="test")


async def test_sdk_application_receives_exactly_its_keys_devices(platform: Platform) -> None:
    creds = {d: register_device(platform.ctx, "rpi", d).credential for d in ("a1", "a2", "b1")}
    key = create_api_key(
        platform.ctx, roles=Roles(reader=True), devices=("a1", "a2"), created_by="test", watson_org=ORG
    )
    config = {"appId": "watcher", "key": key.key, "token": key.password, "timeout_s": 6}
    async with Sdk.run(platform, "app", **config) as sdk:
        assert await sdk.line() == {"ready": True}
        for device_id in ("b1", "a1", "b1", "a2"):
            await _publish(platform, device_id, creds[device_id])
        lines = await sdk.until_finished()
    assert sorted((e["event"]["deviceId"], e["event"]["data"]["n"]) for e in lines) == [
        ("a1", "a1"),
        ("a2", "a2"),
    ]


async def _publish(platform: Platform, device_id: str, credential: str) -> None:
    """One event from ``device_id`` the Watson way, over TLS, acknowledged (QoS 1)."""
    await asyncio.to_thread(_publish_blocking, platform, device_id, credential)


def _publish_blocking(platform: Platform, device_id: str, credential: str) -> None:
    context = ssl.create_default_context(cafile=str(platform.ca_file))
    context.check_hostname = False  # verified against the CA; the address is not the name
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, f"d:{ORG}:rpi:{device_id}")
    client.username_pw_set("use-token-auth", credential)
    client.tls_set_context(context)
    client.connect(platform.address, PORT)
    client.loop_start()
    try:
        info = client.publish("iot-2/evt/temp/fmt/json", json.dumps({"n": device_id}).encode(), qos=1)
        info.wait_for_publish(10)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


async def test_sdk_application_commands_a_device_through_iotvault(platform: Platform) -> None:
    """ApplicationClient.publishCommand with a writer key: the SDK device gets iotvault's signed command."""
    device = register_device(platform.ctx, "rpi", "sdkdev3")
    key = create_api_key(
        platform.ctx,
        roles=Roles(reader=True, writer=True),
        devices=("sdkdev3",),
        created_by="t",
        watson_org=ORG,
    )
    device_config = {"org": ORG, "typeId": "rpi", "deviceId": "sdkdev3", "token": device.credential}
    async with Sdk.run(platform, "device", **device_config, stop_after=1, timeout_s=30) as dev:
        assert await dev.line() == {"ready": True}
        commands = [["rpi", "sdkdev3", "reboot", "json", {"delay": 5}]]
        app_config = {"appId": "ops", "key": key.key, "token": key.password, "timeout_s": 1}
        async with Sdk.run(platform, "app", **app_config, commands=commands) as app:
            assert await app.line() == {"ready": True}
            assert await app.line() == {"commanded": "reboot", "acknowledged": True}
            got = await dev.line()
            assert got["command"]["commandId"] == "reboot"
            assert set(got["command"]["data"]) == {"jws"}  # iotvault's, not the application's bytes
    r = await platform.http.get(
        "/iotf/security/events", headers=platform.basic(*_admin_key(platform)), params={"kind": "command"}
    )
    assert [e["subject"] for e in r.json()["events"]] == [f"api_key:{key.key}"]


async def test_sdk_application_commands_an_unsigned_device_in_text_as_sent(platform: Platform) -> None:
    """ApplicationClient.publishCommand in the SDK's text format (``utf8``) reaches an unsigned SDK
    device's commandCallback as sent; the same for a signed device is refused and recorded."""
    from iotvault.devices import set_command_delivery  # noqa: PLC0415
    from iotvault.domain.commands import Delivery  # noqa: PLC0415

    device = register_device(platform.ctx, "rpi", "sdkdev4")
    set_command_delivery(platform.ctx, "sdkdev4", Delivery.UNSIGNED)
    register_device(platform.ctx, "rpi", "sdkdev5")  # signed: the default
    key = create_api_key(
        platform.ctx,
        roles=Roles(reader=True, writer=True),
        devices=("sdkdev4", "sdkdev5"),
        created_by="t",
        watson_org=ORG,
    )
    device_config = {"org": ORG, "typeId": "rpi", "deviceId": "sdkdev4", "token": device.credential}
    async with Sdk.run(platform, "device", **device_config, stop_after=1, timeout_s=30) as dev:
        assert await dev.line() == {"ready": True}
        commands = [
            ["rpi", "sdkdev5", "say", "utf8", "not for a signed device"],
            ["rpi", "sdkdev4", "say", "utf8", "grüß dich, sdkdev4"],
        ]
        app_config = {"appId": "ops", "key": key.key, "token": key.password, "timeout_s": 1}
        async with Sdk.run(platform, "app", **app_config, commands=commands) as app:
            assert await app.line() == {"ready": True}
            # both acknowledged: the refused one too, so the SDK does not send it again
            assert await app.line() == {"commanded": "say", "acknowledged": True}
            assert await app.line() == {"commanded": "say", "acknowledged": True}
            got = await dev.line()
            assert got["command"] == {"commandId": "say", "format": "utf8", "data": "grüß dich, sdkdev4"}
            assert await app.until_finished() == []  # nothing else: no error, no event
    admin = platform.basic(*_admin_key(platform))
    r = await platform.http.get("/iotf/security/events", headers=admin, params={"count": 100})
    kinds = [(e["kind"], e.get("deviceId"), e.get("format")) for e in r.json()["events"]]
    assert ("command", "sdkdev4", "utf8") in kinds
    assert ("command_refused", "sdkdev5", "utf8") in kinds
    assert not any(k == "command" and d == "sdkdev5" for k, d, _ in kinds)
