"""MQTT 5 devices on a real ``iotvault serve`` (embedded broker): paho's v5 client, mosquitto's
``-V mqttv5`` clients and raw sockets.

What is checked is what a device sees: CONNACK reason codes and the limits announced in it,
events stored (read back through the API) only after a PUBACK, another device's topic refused
with reason code 0x87 while the connection goes on, a signed command received and verified,
a wrong password refused with 0x86 and recorded, protocol errors answered with a DISCONNECT
that names the reason before the connection is closed.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from helpers import ServerProcess, server_env, unavailable
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iotvault.accounts import create_api_key
from iotvault.broker.codec5 import Connect5, Disconnect5, Publish5, decode5, encode5
from iotvault.commands.keys import command_signing_key
from iotvault.config import Settings, load_settings
from iotvault.context import context
from iotvault.device import CommandVerifier
from iotvault.devices import register_device
from iotvault.domain.accounts import Roles
from iotvault.storage.repository import SecurityEvent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

HOST = "127.0.0.1"
TIMEOUT = 10.0
MAX_PACKET = 65_536
MAX_INFLIGHT = 16
DEVICES = ("v5-paho", "v5-other", "v5-mosq")


def evt(device: str, event: str = "reading") -> str:
    return f"iot-2/type/thermo/id/{device}/evt/{event}/fmt/json"


def cmd(device: str, command: str = "+") -> str:
    return f"iot-2/type/thermo/id/{device}/cmd/{command}/fmt/json"


class Server:
    def __init__(self, process: ServerProcess, settings: Settings, creds: dict[str, str], auth: str) -> None:
        self.process = process
        self.settings = settings
        self.creds = creds
        self.port = settings.mqtt_port
        self.http = httpx.Client(
            base_url=f"http://{HOST}:{settings.http_port}", headers={"Authorization": auth}
        )

    def events(self, device: str) -> list[dict[str, Any]]:
        r = self.http.get(f"/iotf/devices/{device}", params={"count": 100})
        assert r.status_code == 200, r.text
        events: list[dict[str, Any]] = r.json()["events"]
        return events

    def security_events(self) -> list[SecurityEvent]:
        with context(self.settings) as ctx:
            return ctx.store.list_security_events(limit=10_000)

    def verifier(self, device: str) -> CommandVerifier:
        with context(self.settings) as ctx:
            key = command_signing_key(ctx.store, ctx.master).public
        return CommandVerifier(key, device, type_id="thermo")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("mqtt5")
    env = server_env(tmp, mqtt_max_packet_bytes=str(MAX_PACKET), mqtt_max_inflight=str(MAX_INFLIGHT))
    settings = load_settings(environ=env)
    with context(settings) as ctx:
        creds = {d: register_device(ctx, "thermo", d).credential for d in DEVICES}
        key = create_api_key(ctx, roles=Roles(reader=True, writer=True), devices=DEVICES, created_by="test")
    auth = "Basic " + base64.b64encode(f"{key.key}:{key.password}".encode()).decode()
    process = ServerProcess(env, tmp / "server.log")
    process.start()
    try:
        served = Server(process, settings, creds, auth)
        yield served
        served.http.close()
    finally:
        process.stop()


def eventually(check: Callable[[], bool], what: str, within: float = TIMEOUT) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {within}s: {what}")


class PahoV5:
    """paho-mqtt's MQTT 5 client, its callbacks turned into values a test can wait for."""

    def __init__(self, client_id: str, password: str, *, session_expiry: int = 0) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(client_id, password)
        self.session_expiry = session_expiry
        self.connack: tuple[int, Any] | None = None
        self.disconnected: int | None = None
        self.acks: dict[int, int] = {}  # mid -> PUBACK reason code
        self.subacks: dict[int, list[int]] = {}
        self.messages: list[mqtt.MQTTMessage] = []
        self.changed = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, props: Any) -> None:
        self.connack = (reason.value, props)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.disconnected = reason.value

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        self.acks[mid] = reason.value

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        self.subacks[mid] = [r.value for r in reasons]

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.append(message)

    def connect(self, port: int) -> tuple[int, Any]:
        props = Properties(PacketTypes.CONNECT)
        if self.session_expiry:
            props.SessionExpiryInterval = self.session_expiry
        self.client.connect(HOST, port, keepalive=30, properties=props)
        self.client.loop_start()
        eventually(lambda: self.connack is not None or self.disconnected is not None, "CONNACK")
        assert self.connack is not None
        return self.connack

    def publish(self, topic: str, payload: dict[str, Any], qos: int = 1) -> int:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        props.UserProperty = ("source", "paho-v5")
        info = self.client.publish(topic, json.dumps(payload), qos=qos, properties=props)
        eventually(lambda: info.mid in self.acks or self.disconnected is not None, f"PUBACK of {topic}")
        return self.acks[info.mid]

    def subscribe(self, topic_filter: str) -> list[int]:
        _, mid = self.client.subscribe(topic_filter, qos=1)
        eventually(lambda: mid in self.subacks, f"SUBACK of {topic_filter}")
        return self.subacks[mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_paho_v5_device_connects_publishes_is_refused_elsewhere_and_gets_a_signed_command(
    server: Server,
) -> None:
    device = PahoV5("v5-paho", server.creds["v5-paho"], session_expiry=3600)
    reason, props = device.connect(server.port)
    try:
        assert reason == 0
        announced = props.json()
        assert announced["MaximumPacketSize"] == MAX_PACKET
        assert announced["ReceiveMaximum"] == MAX_INFLIGHT
        assert announced["SessionExpiryInterval"] == 0  # capped, and said so
        assert announced.get("TopicAliasMaximum", 0) == 0
        assert announced["SharedSubscriptionAvailable"] == 0

        for n in range(3):
            assert device.publish(evt("v5-paho"), {"n": n, "celsius": 20 + n}) == 0
        stored = sorted(e["payload"]["n"] for e in server.events("v5-paho"))
        assert stored == [0, 1, 2]  # acknowledged means stored: readable at once

        # another device's topic: PUBACK 0x87, nothing stored, and the connection goes on
        assert device.publish(evt("v5-other"), {"n": 99}) == 0x87
        assert device.subscribe(cmd("v5-other")) == [0x87]
        assert device.publish(evt("v5-paho"), {"n": 3}) == 0
        assert device.disconnected is None
        assert server.events("v5-other") == []
        eventually(
            lambda: any(e.detail.get("topic") == evt("v5-other") for e in server.security_events()),
            "the refused publish as a security event",
        )

        assert device.subscribe(cmd("v5-paho")) == [1]
        r = server.http.post("/iotf/devices/v5-paho/commands", json={"command": "dim", "payload": {"to": 3}})
        assert r.status_code == 202, r.text
        eventually(lambda: bool(device.messages), "the command")
        message = device.messages[0]
        assert message.topic == cmd("v5-paho", "dim")
        command = server.verifier("v5-paho").verify(message.topic, message.payload)
        assert (command.name, dict(command.payload)) == ("dim", {"to": 3})
        assert command.command_id == r.json()["commandId"]
    finally:
        device.close()


def test_a_paho_v5_client_with_a_wrong_password_gets_0x86_and_is_recorded(server: Server) -> None:
    device = PahoV5("v5-other", "not-the-credential")
    try:
        reason, _ = device.connect(server.port)
    finally:
        device.client.loop_stop()
    assert reason == 0x86
    eventually(
        lambda: any(e.kind == "login_failed" and e.subject == "v5-other" for e in server.security_events()),
        "the refused login as a security event",
    )


def mosquitto(tool: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    path = shutil.which(tool)
    if path is None:
        unavailable(f"{tool} is not installed (Debian package mosquitto-clients)")
    return subprocess.run(
        [path, "-V", "mqttv5", "-h", HOST, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_mosquitto_v5_clients_publish_are_refused_and_receive_commands(server: Server) -> None:
    port, secret = str(server.port), server.creds["v5-mosq"]
    login = ["-p", port, "-i", "v5-mosq", "-u", "v5-mosq", "-P", secret]
    done = mosquitto("mosquitto_pub", *login, "-q", "1", "-t", evt("v5-mosq"), "-m", '{"from": "mosquitto"}')
    assert done.returncode == 0, done.stderr
    assert [e["payload"] for e in server.events("v5-mosq")] == [{"from": "mosquitto"}]

    refused = mosquitto("mosquitto_pub", *login, "-q", "1", "-t", evt("v5-other"), "-m", "{}", "-d")
    assert "not authorized" in (refused.stdout + refused.stderr).lower(), refused
    assert server.events("v5-other") == []

    wrong = mosquitto("mosquitto_pub", "-p", port, "-i", "v5-mosq", "-u", "v5-mosq", "-P", "wrong",
                      "-t", evt("v5-mosq"), "-m", "{}")  # fmt: skip
    assert wrong.returncode != 0
    assert "bad user name or password" in (wrong.stdout + wrong.stderr).lower(), wrong

    sub = subprocess.Popen(
        [shutil.which("mosquitto_sub") or "mosquitto_sub", "-V", "mqttv5", "-h", HOST, *login, "-q", "1",
         "-t", cmd("v5-mosq"), "-C", "1", "-W", "20", "-v"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        command_id = None

        def sent() -> bool:
            nonlocal command_id
            r = server.http.post("/iotf/devices/v5-mosq/commands", json={"command": "ping", "payload": {}})
            assert r.status_code == 202, r.text
            command_id = r.json()["commandId"]
            return sub.poll() is not None or _wait(sub, 1.0)

        eventually(sent, "a command for mosquitto_sub", within=20)
        out, err = sub.communicate(timeout=10)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    assert sub.returncode == 0, err
    topic, _, payload = out.strip().partition(" ")
    assert topic == cmd("v5-mosq", "ping")
    assert server.verifier("v5-mosq").verify(topic, payload.encode()).name == "ping"
    assert command_id is not None


def _wait(proc: subprocess.Popen[str], seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


def raw_session(server: Server, device: str) -> socket.socket:
    sock = socket.create_connection((HOST, server.port), timeout=TIMEOUT)
    secret = server.creds[device].encode()
    sock.sendall(encode5(Connect5(device, keep_alive=30, username=device, password=secret)))
    connack = read_packet(sock)
    assert connack[:4] == b"\x20" + bytes([len(connack) - 2]) + b"\x00\x00", connack
    return sock


def read_packet(sock: socket.socket) -> bytes:
    head = sock.recv(2)
    assert len(head) == 2, "the connection ended"
    data = bytearray(head)
    while data[-1] & 0x80:
        data += sock.recv(1)
    length, multiplier = 0, 1
    for byte in data[1:]:
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
    body = bytearray()
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "the connection ended"
        body += chunk
    return bytes(data + body)


@pytest.mark.parametrize(
    ("attack", "code"),
    [
        ("topic alias", 0x94),
        ("oversized", 0x95),
        ("QoS 3", 0x81),
    ],
)
def test_a_protocol_error_gets_a_disconnect_with_its_reason_then_the_close(
    server: Server, attack: str, code: int
) -> None:
    sock = raw_session(server, "v5-other")
    try:
        if attack == "topic alias":
            sock.sendall(encode5(Publish5(evt("v5-other"), b"{}", 1, packet_id=1, properties=((0x23, 1),))))
        elif attack == "oversized":
            sock.sendall(b"\x32\xff\xff\x7f" + b"\x00" * 1024)  # announces ~2 MB
        else:
            sock.sendall(b"\x36\x05\x00\x01t\x00\x01")
        assert decode5(read_packet(sock)) == Disconnect5(code)
        assert sock.recv(1) == b""  # then closed
    finally:
        sock.close()
    eventually(
        lambda: any(e.kind == "protocol_violation" for e in server.security_events()),
        "the violation as a security event",
    )
