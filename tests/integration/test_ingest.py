"""The ingest path end to end: real brokers, real databases, a real ``iotvault serve`` process."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import gmqtt
import pytest
from gmqtt.mqtt.constants import MQTTv311
from helpers import Mosquitto, ServerProcess, server_env
from sqlalchemy import select, update
from typer.testing import CliRunner

from iotvault.cli.main import app
from iotvault.config import Settings, load_settings
from iotvault.context import Context, context
from iotvault.crypto.cipher import record_key_version
from iotvault.devices import delete_device, register_device
from iotvault.domain.ids import EventIdFactory
from iotvault.errors import DataKeyNotFoundError, RecordDecryptionError
from iotvault.simulator import DeviceCredential, SimulationPlan, run_simulation
from iotvault.storage.repository import BatchWrite, StoredEvent
from iotvault.storage.schema import events

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _register(settings: Settings, n: int, prefix: str = "dev") -> list[DeviceCredential]:
    with context(settings) as ctx:
        return [
            DeviceCredential(d.device_id, d.type_id, d.credential)
            for d in (register_device(ctx, "thermo", f"{prefix}-{i}") for i in range(n))
        ]


def _stored(settings: Settings) -> list[tuple[str, dict[str, object]]]:
    """Every stored event of every device, decrypted: (deviceId, payload)."""
    with context(settings) as ctx:
        result = []
        for device_id in ctx.store.device_ids():
            after: str | None = "0"
            while True:
                page = ctx.store.events_page(device_id, count=1000, after=after)
                if not page:
                    break
                for e in page:
                    result.append(
                        (device_id, json.loads(ctx.keyring.decrypt(device_id, e.event_id, e.payload)))
                    )
                after = page[-1].event_id
        return result


def _wait_count(settings: Settings, expected: int, timeout: float = 150.0) -> int:
    deadline = time.monotonic() + timeout
    n = -1
    while time.monotonic() < deadline:
        with context(settings) as ctx:
            n = ctx.store.count_events()
        if n >= expected:
            time.sleep(0.5)  # let anything extra (a duplicate) land before the caller counts
            with context(settings) as ctx:
                return ctx.store.count_events()
        time.sleep(0.2)
    return n


@pytest.fixture(params=["embedded", "mosquitto"])
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_sigkill_in_the_middle_loses_nothing_and_stores_once(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    database_url: str,
    broker_kind: str,
    server_factory: list[ServerProcess],
) -> None:
    env = server_env(tmp_path, database_url=database_url, ingest_client_id=f"ingest-{tmp_path.name}")
    if broker_kind == "mosquitto":
        mosq: Mosquitto = request.getfixturevalue("mosquitto")
        env["IOTVAULT_BROKER_URL"] = f"mqtt://127.0.0.1:{mosq.port}"
        port = mosq.port
    else:
        port = int(env["IOTVAULT_MQTT_PORT"])
    settings = load_settings(environ=env)
    devices, per_device = 4, 300
    creds = _register(settings, devices)

    server = ServerProcess(env, tmp_path / "server.log")
    server_factory.append(server)
    await asyncio.to_thread(server.start)

    plan = SimulationPlan(devices=creds, rate=150.0, count=per_device, event_type="reading")
    sim = asyncio.create_task(run_simulation("127.0.0.1", port, plan, ack_timeout=150.0))
    await asyncio.sleep(1.0)
    assert not sim.done(), "the run finished before the kill: make it longer"
    await asyncio.to_thread(server.kill)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(server.start)
    report = await sim
    total = devices * per_device
    assert report.acknowledged == total, f"simulator: {report}"

    stored_count = await asyncio.to_thread(_wait_count, settings, total)
    stored = await asyncio.to_thread(_stored, settings)
    seqs = Counter((device, payload["d"]["seq"]) for device, payload in stored)  # type: ignore[index]
    dupes = {k: v for k, v in seqs.items() if v > 1}
    missing = [(c.device_id, i) for c in creds for i in range(per_device) if (c.device_id, i) not in seqs]
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {missing[:5]}"
    assert not dupes, f"{len(dupes)} events stored more than once, e.g. {list(dupes.items())[:5]}"
    assert stored_count == total


async def test_payload_plaintext_never_reaches_the_database_file(
    tmp_path: Path, server_factory: list[ServerProcess]
) -> None:
    env = server_env(tmp_path)
    settings = load_settings(environ=env)
    creds = _register(settings, 2, prefix="secret")
    server = ServerProcess(env, tmp_path / "server.log")
    server_factory.append(server)
    await asyncio.to_thread(server.start)
    plan = SimulationPlan(devices=creds, rate=0, count=50, event_type="reading")
    report = await run_simulation("127.0.0.1", int(env["IOTVAULT_MQTT_PORT"]), plan)
    assert report.acknowledged == 100
    assert await asyncio.to_thread(_wait_count, settings, 100) == 100
    await asyncio.to_thread(server.stop)

    # the simulator's payloads carry these keys and values; none may appear in the files
    db_files = list((tmp_path / "data").glob("iotvault.db*"))
    assert db_files
    raw = b"".join(p.read_bytes() for p in db_files)
    assert b"temperature" not in raw
    assert b'"seq"' not in raw
    # ...but the ids that stay queryable are there (the scan itself works)
    assert b"secret-0" in raw


async def test_invalid_messages_are_recorded_not_stored_and_ingest_goes_on(
    request: pytest.FixtureRequest, tmp_path: Path, broker_kind: str, server_factory: list[ServerProcess]
) -> None:
    """Bad messages of an authenticated device are recorded, not stored. What a device may not
    publish at all (another device's topics, another type, a made-up topic) the embedded broker
    refuses before ingest sees it (a security event); an open Mosquitto lets it through to
    ingest, which refuses it there."""
    env = server_env(tmp_path, max_payload_bytes="1024", ingest_client_id=f"ingest-{tmp_path.name}")
    if broker_kind == "mosquitto":
        mosq: Mosquitto = request.getfixturevalue("mosquitto")  # no accounts: anyone may publish
        env["IOTVAULT_BROKER_URL"] = f"mqtt://127.0.0.1:{mosq.port}"
        port = mosq.port
    else:
        port = int(env["IOTVAULT_MQTT_PORT"])
    settings = load_settings(environ=env)
    (cred,) = _register(settings, 1, prefix=f"ok{broker_kind[0]}")
    device = cred.device_id
    server = ServerProcess(env, tmp_path / "server.log")
    server_factory.append(server)
    await asyncio.to_thread(server.start)

    async def connected() -> gmqtt.Client:
        client = gmqtt.Client(device, clean_session=True)
        client.set_config({"reconnect_retries": -2})
        client.set_auth_credentials(device, cred.password)
        await client.connect("127.0.0.1", port, version=MQTTv311)
        return client

    client = await connected()
    good = f"iot-2/type/thermo/id/{device}/evt/reading/fmt/json"
    client.publish(good.replace("reading", "bad"), b"{not json", qos=1)
    client.publish(good, b'{"t": NaN}', qos=1)  # Python's json reads it; JSON has no NaN
    client.publish(good, '{"utf16": 1}'.encode("utf-16"), qos=1)  # JSON text is UTF-8
    client.publish(good, b'{"big": "' + b"x" * 2000 + b'"}', qos=1)
    client.publish(good.replace("reading", "cmdack"), b'{"status": "maybe"}', qos=1)
    client.publish(f"iot-2/type/thermo/id/{device}/mon", b'{"status": "connected"}', qos=1)
    client.publish(good, b'{"after": "the bad ones"}', qos=1)
    forbidden = [
        "iot-2/type/thermo/id/nobody/evt/reading/fmt/json",
        f"iot-2/type/other/id/{device}/evt/reading/fmt/json",
    ]
    if broker_kind == "embedded":
        forbidden.append(f"iot-2/type/thermo/id/{device}/oops")  # not subscribed to at Mosquitto
    for topic in forbidden:
        await asyncio.sleep(0.3)
        if not client.is_connected:  # the embedded broker drops a client that oversteps
            client = await connected()
        client.publish(topic, b'{"a": 1}', qos=1)
    expected_rejected = {"invalid_json": 3, "too_large": 1, "bad_command_ack": 1}
    if broker_kind == "mosquitto":
        expected_rejected |= {"unknown_device": 1, "type_mismatch": 1}
    deadline = time.monotonic() + 20
    rejected: dict[str, int] = {}
    denied: list[str] = []
    while time.monotonic() < deadline:
        with context(settings) as ctx:
            rejected = ctx.store.rejected_counts()
            n = ctx.store.count_events()
            denied = [
                str(e.detail.get("topic")) for e in ctx.store.list_security_events(kinds=["acl_denied"])
            ]
        all_rejected = n >= 1 and sum(rejected.values()) >= sum(expected_rejected.values())
        if all_rejected and (broker_kind == "mosquitto" or len(denied) >= len(forbidden)):
            break
        await asyncio.sleep(0.2)
    await client.disconnect()
    assert rejected == expected_rejected
    if broker_kind == "embedded":
        assert sorted(denied) == sorted(forbidden)
    stored = _stored(settings)
    assert stored == [(device, {"after": "the bad ones"})]
    with context(settings) as ctx:
        dev = ctx.store.get_device(device)
        assert dev is not None
        rows = ctx.store.list_rejected()
    assert dev.last_seen_us is not None
    assert all(r.size > 0 and r.source for r in rows)
    raw = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("iotvault.db*"))
    assert b"{not json" not in raw


def test_moved_ciphertext_and_tampering_fail_to_decrypt(tmp_path: Path, database_url: str) -> None:

    settings = load_settings(
        environ={"IOTVAULT_DATA_DIR": str(tmp_path / "data"), "IOTVAULT_DATABASE_URL": database_url}
    )
    with context(settings) as ctx:
        register_device(ctx, "t", "a")
        register_device(ctx, "t", "b")
        rows = []

        ids = EventIdFactory()
        for device in ("a", "a", "b"):
            eid = ids.new()
            rows.append((device, eid, ctx.keyring.encrypt(device, eid, b'{"v": "' + device.encode() + b'"}')))
        with ctx.engine.begin() as conn:
            conn.execute(
                events.insert(),
                [
                    {
                        "device_id": d,
                        "event_id": e,
                        "type_id": "t",
                        "event_type": "x",
                        "format": "json",
                        "received_us": 1,
                        "payload": p,
                    }
                    for d, e, p in rows
                ],
            )
            # move a's first record onto a's second row, and b's record onto... a's row
            conn.execute(update(events).where(events.c.event_id == rows[1][1]).values(payload=rows[0][2]))
        fetched = {e.event_id: e for e in ctx.store.events_page("a", count=10)}
        assert ctx.keyring.decrypt("a", rows[0][1], fetched[rows[0][1]].payload) == b'{"v": "a"}'
        with pytest.raises(RecordDecryptionError):
            ctx.keyring.decrypt("a", rows[1][1], fetched[rows[1][1]].payload)
        with pytest.raises(RecordDecryptionError):
            ctx.keyring.decrypt("a", rows[2][1], rows[2][2])  # b's record read as a's
        flipped = bytearray(rows[2][2])
        flipped[-1] ^= 1
        with pytest.raises(RecordDecryptionError):
            ctx.keyring.decrypt("b", rows[2][1], bytes(flipped))
        with ctx.engine.connect() as conn:
            assert (
                conn.execute(select(events.c.payload).where(events.c.device_id == "b")).scalar_one()
                == rows[2][2]
            )


def test_rotation_keeps_old_events_readable_and_reencrypt_rewrites_them(
    tmp_path: Path, database_url: str
) -> None:

    env = {"IOTVAULT_DATA_DIR": str(tmp_path / "data"), "IOTVAULT_DATABASE_URL": database_url}
    settings = load_settings(environ=env)
    ids = EventIdFactory()

    def write(ctx: Context, n: int, tag: str) -> None:
        batch = BatchWrite()
        for i in range(n):
            eid = ids.new()
            body = json.dumps({"tag": tag, "i": i}).encode()
            batch.events.append(
                StoredEvent("r1", eid, "t", "x", "json", 1, ctx.keyring.encrypt("r1", eid, body))
            )
        ctx.store.write_batch(batch)

    with context(settings) as ctx:
        register_device(ctx, "t", "r1")
        write(ctx, 20, "before")
    runner = CliRunner()
    result = runner.invoke(app, ["keys", "rotate", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["devices"] == {"r1": 2}
    with context(settings) as ctx:
        write(ctx, 5, "after")
        events_ = ctx.store.events_page("r1", count=100)
        versions = Counter(record_key_version(e.payload) for e in events_)
        assert versions == {1: 20, 2: 5}
        tags = Counter(json.loads(ctx.keyring.decrypt("r1", e.event_id, e.payload))["tag"] for e in events_)
        assert tags == {"before": 20, "after": 5}
    result = runner.invoke(app, ["keys", "rotate", "--reencrypt", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["reencrypted"] == 25
    with context(settings) as ctx:
        events_ = ctx.store.events_page("r1", count=100)
        assert {record_key_version(e.payload) for e in events_} == {3}
        assert len({json.loads(ctx.keyring.decrypt("r1", e.event_id, e.payload))["i"] for e in events_}) == 20


def test_deleting_a_device_destroys_its_keys_and_events(tmp_path: Path, database_url: str) -> None:

    settings = load_settings(
        environ={"IOTVAULT_DATA_DIR": str(tmp_path / "data"), "IOTVAULT_DATABASE_URL": database_url}
    )
    with context(settings) as ctx:
        register_device(ctx, "t", "gone")
        record = ctx.keyring.encrypt("gone", "e1", b"{}")
        ctx.store.write_batch(BatchWrite(events=[StoredEvent("gone", "e1", "t", "x", "json", 1, record)]))
        delete_device(ctx, "gone")
        assert ctx.store.data_keys("gone") == {}
        assert ctx.store.count_events("gone") == 0
        with pytest.raises(DataKeyNotFoundError):
            ctx.keyring.decrypt("gone", "e1", record)
