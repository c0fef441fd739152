"""Hostile clients against a real ``iotvault serve`` with the embedded broker, over raw sockets.

Each test reproduces one attack from the broker's security review and checks the bound that now
holds: descriptors back to their baseline, connections refused at once past a limit, health
answered during the attack, security-event rows bounded, honest devices served throughout.
One server is shared by the tests of this module (started once, small limits so the attacks
stay cheap); the attacks use different loopback source addresses (127.0.0.x) where one must
not disturb the next.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import ServerProcess, server_env

from iotvault.broker.codec import Connect, Publish, encode
from iotvault.config import Settings, load_settings
from iotvault.context import context
from iotvault.devices import register_device
from iotvault.storage.repository import SecurityEvent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

HOST = "127.0.0.1"
TIMEOUT = 5.0
PENDING_CONNECTS = 40  # so one address may hold 20 connections that have not sent CONNECT
CONNECT_TIMEOUT_S = 2.0


class Server:
    def __init__(self, process: ServerProcess, settings: Settings, credentials: dict[str, str]) -> None:
        self.process = process
        self.settings = settings
        self.credentials = credentials  # device id -> credential
        self.mqtt_port = settings.mqtt_port
        self.http = f"http://{HOST}:{settings.http_port}"

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def descriptors(self) -> int:
        """Open sockets: what a leaking connection keeps (database files come and go with threads)."""
        return sum(target.startswith("socket:") for target in self.descriptor_targets())

    def descriptor_targets(self) -> list[str]:
        targets = []
        for fd in Path(f"/proc/{self.pid}/fd").iterdir():
            try:
                targets.append(str(fd.readlink()))
            except OSError:  # closed meanwhile
                continue
        return sorted(targets)

    def rss_mb(self) -> float:
        with Path(f"/proc/{self.pid}/status").open(encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def security_events(self) -> list[SecurityEvent]:
        with context(self.settings) as ctx:
            return ctx.store.list_security_events(limit=100_000)

    def log(self) -> str:
        return self.process.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("attacks")
    env = server_env(
        tmp,
        mqtt_max_pending_connects=str(PENDING_CONNECTS),
        mqtt_connect_timeout_s=str(CONNECT_TIMEOUT_S),
        mqtt_max_retained="3",
    )
    settings = load_settings(environ=env)
    with context(settings) as ctx:
        creds = {
            d.device_id: d.credential
            for d in (register_device(ctx, "thermo", f"honest-{i}") for i in range(4))
        }
    process = ServerProcess(env, tmp / "server.log")
    process.start()
    try:
        yield Server(process, settings, creds)
    finally:
        process.stop()


def connect_packet(client_id: str, password: str | None = None, *, keep_alive: int = 30) -> bytes:
    username = client_id if password is not None else None
    secret = password.encode() if password is not None else None
    return encode(Connect(client_id, keep_alive=keep_alive, username=username, password=secret))


async def open_from(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, port, local_addr=(source, 0))


async def honest_connack(server: Server, source: str = "127.0.0.9", device: str = "honest-0") -> float:
    """Seconds an honest device from ``source`` waits for its CONNACK (which must accept it)."""
    start = time.monotonic()
    reader, writer = await open_from(server.mqtt_port, source)
    try:
        writer.write(connect_packet(device, server.credentials[device]))
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"\x20\x02\x00\x00"
        return time.monotonic() - start
    finally:
        writer.transport.abort()


async def settles(measure: object, bound: float, what: str, within: float = 10.0) -> float:
    deadline = time.monotonic() + within
    value = float("inf")
    while time.monotonic() < deadline:
        value = measure()  # type: ignore[operator]
        if value <= bound:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what}: {value} is still over {bound} after {within}s")


async def test_connect_then_close_leaves_no_descriptor_and_no_stuck_connection(server: Server) -> None:
    """Findings A and issue 18.7: CONNECT and close before reading the CONNACK, 300 times."""
    await honest_connack(server)
    await asyncio.sleep(1.0)  # the honest device's presence update, in a database thread
    baseline = server.descriptors()
    before = server.descriptor_targets()
    for i in range(300):
        _, writer = await open_from(server.mqtt_port, "127.0.0.2")
        device = f"honest-{1 + i % 2}"
        password = server.credentials[device] if i % 3 else "wrong"  # admitted and refused ones
        writer.write(connect_packet(device, password))
        await writer.drain()
        writer.close()
    try:
        await settles(server.descriptors, baseline, "server descriptors after 300 CONNECT-and-close")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; before {before}, after {server.descriptor_targets()}") from None
    # the same client ids connect at once (no 5 s wait for a stuck predecessor)
    assert await honest_connack(server, device="honest-1") < 1.0
    assert await honest_connack(server, device="honest-2") < 1.0


async def test_malformed_packets_close_the_connection_unparsed_and_are_recorded(server: Server) -> None:
    """Finding B and G: a wildcard PUBLISH with a PINGREQ inside, and a QoS 3 PUBLISH."""
    device = "honest-3"
    smuggled_body = b"\x00\x03a/+" + b"\x00\x01" + b"\xc0\x00" * 4  # QoS 1, payload of PINGREQs
    attacks = {
        "wildcard in a topic name": b"\x32" + bytes([len(smuggled_body)]) + smuggled_body,
        "PUBLISH with QoS 3": b"\x36\x07\x00\x01t\x00\x01{}",
    }
    for reason, packet in attacks.items():
        reader, writer = await open_from(server.mqtt_port, "127.0.0.3")
        writer.write(connect_packet(device, server.credentials[device]))
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"\x20\x02\x00\x00"
        writer.write(packet)
        # closed, and nothing answered: no PINGRESP (\xd0\x00) for the packets in the payload
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"", reason
        writer.close()

    def recorded() -> float:
        reasons = {e.detail.get("reason") for e in server.security_events() if e.kind == "protocol_violation"}
        return float(len(set(attacks) - reasons))

    await settles(recorded, 0, "protocol violations recorded")


async def test_connections_that_never_send_connect_are_capped_and_timed_out(server: Server) -> None:
    """Finding E: idle sockets from one address cannot starve logins or health checks."""
    baseline = server.descriptors()
    idle = []
    for _ in range(60):
        reader, writer = await open_from(server.mqtt_port, "127.0.0.4")
        idle.append((reader, writer))
    # past this address's share of the pending slots (20), connections are closed at once
    ended = await asyncio.gather(*(asyncio.wait_for(r.read(), TIMEOUT) for r, _ in idle[20:]))
    assert ended == [b""] * 40
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{server.http}/healthz", timeout=TIMEOUT)).status_code == 200
    assert await honest_connack(server, source="127.0.0.5") < 1.0  # another address logs in
    # the ones that were let in are closed after the CONNECT timeout
    started = time.monotonic()
    assert await asyncio.wait_for(idle[0][0].read(), CONNECT_TIMEOUT_S + TIMEOUT) == b""
    assert time.monotonic() - started <= CONNECT_TIMEOUT_S + 1.0
    for _, writer in idle:
        writer.close()
    await settles(server.descriptors, baseline, "server descriptors after the idle flood")


async def test_a_login_flood_adds_a_bounded_number_of_rows(server: Server) -> None:
    """Finding D: 600 refused logins of one client id are a few rows, not 600."""
    before = len(server.security_events())
    for _ in range(600):
        reader, writer = await open_from(server.mqtt_port, "127.0.0.6")
        writer.write(connect_packet("sprayed", "guess"))
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"\x20\x02\x00\x05"
        writer.close()
    await asyncio.sleep(1.5)  # one flush
    events = server.security_events()  # newest first
    mine = [e for e in events[: len(events) - before] if e.subject == "sprayed"]
    assert {e.kind for e in mine} == {"login_failed", "login_throttled"}
    assert len(mine) <= 4, [(e.kind, e.detail) for e in mine]


async def test_a_throttled_address_still_admits_a_device_that_has_not_been_failing(server: Server) -> None:
    """Item 5: one address spraying many client ids does not lock out its honest neighbours."""
    for i in range(40):  # over the per-address limit (30 failures a minute)
        reader, writer = await open_from(server.mqtt_port, "127.0.0.7")
        writer.write(connect_packet(f"spray-{i}", "guess"))
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"\x20\x02\x00\x05"
        writer.close()
    # the address is throttled, yet a device behind the same NAT with its right credential gets in
    assert await honest_connack(server, source="127.0.0.7", device="honest-0") < 1.0
    # a client id that has been failing from there stays refused, even with a right-looking try
    reader, writer = await open_from(server.mqtt_port, "127.0.0.7")
    writer.write(connect_packet("spray-3", "guess"))
    assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"\x20\x02\x00\x05"
    writer.close()


async def test_mqtt5_clients_without_a_credential_get_a_reason_code_at_once(server: Server) -> None:
    """Finding G: an MQTT 5 CONNECT is answered at once (CONNACK 0x86), not silence for 10 s."""
    body = b"\x00\x04MQTT\x05\x02\x00\x1e\x00" + b"\x00\x02v5"  # level 5, no properties
    reader, writer = await open_from(server.mqtt_port, "127.0.0.8")
    writer.write(b"\x10" + bytes([len(body)]) + body)
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"\x20\x03\x00\x86\x00"
    writer.close()
    mosquitto_pub = shutil.which("mosquitto_pub")
    if mosquitto_pub is not None:
        started = time.monotonic()
        done = await asyncio.to_thread(
            subprocess.run,
            [mosquitto_pub, "-V", "mqttv5", "-h", HOST, "-p", str(server.mqtt_port), "-t", "t", "-m", "x"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert done.returncode != 0
        assert "bad user name or password" in (done.stderr + done.stdout).lower()
        assert time.monotonic() - started < 5.0

    def recorded() -> float:
        return float(
            not any(e.kind == "login_failed" and e.subject == "v5" for e in server.security_events())
        )

    await settles(recorded, 0, "MQTT 5 refusal recorded")


async def test_health_and_memory_hold_under_oversized_and_retained_publishes(server: Server) -> None:
    """Findings B (memory) and C: big announced lengths and retained floods stay bounded."""
    rss_before = server.rss_mb()
    device = "honest-3"
    reader, writer = await open_from(server.mqtt_port, "127.0.0.10")
    writer.write(connect_packet(device, server.credentials[device]))
    assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"\x20\x02\x00\x00"
    # retained events on many distinct event types: at most 3 are kept (mqtt_max_retained=3)
    for i in range(200):
        topic = f"iot-2/type/thermo/id/{device}/evt/kind{i}/fmt/json"
        writer.write(
            encode(Publish(topic, b'{"d": "' + b"x" * 20_000 + b'"}', qos=1, retain=True, packet_id=i + 1))
        )
        await writer.drain()
    for _ in range(200):
        assert (
            await asyncio.wait_for(
                reader.readexactly(
                    4,
                ),
                TIMEOUT,
            )
        )[0] == 0x40  # PUBACK
    # a header that announces 200 MB: closed from the header alone
    writer.write(b"\x30\xff\xff\xff\x5f")
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{server.http}/healthz", timeout=TIMEOUT)).status_code == 200
    assert server.rss_mb() - rss_before < 30, "memory grew with the attack"
    assert "retained message on" in server.log()


async def test_a_pubrel_flood_writes_a_bounded_number_of_log_lines(server: Server) -> None:
    """Finding F: 20,000 PUBRELs with unknown ids were 20,000 WARNING lines (12 MB per 400 KB)."""
    device = "honest-2"
    lines_before = server.log().count("PUBREL")
    reader, writer = await open_from(server.mqtt_port, "127.0.0.11")
    writer.write(connect_packet(device, server.credentials[device]))
    assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"\x20\x02\x00\x00"
    for _ in range(20):
        writer.write(b"\x62\x02\x00\x07" * 1000)
        await writer.drain()
    writer.write(b"\xc0\x00")  # PINGREQ: answered once every PUBREL before it was read
    data = b""
    while not data.endswith(b"\xd0\x00"):
        data += await asyncio.wait_for(reader.read(65536), TIMEOUT)
    writer.close()
    await asyncio.sleep(0.5)
    assert server.log().count("PUBREL") - lines_before <= 20  # IOTVAULT_MQTT_LOG_LINES_PER_CONNECTION
