"""Stored exactly once when the database fails at the wrong moment (issue 18, findings 1 and 2).

A real ``iotvault serve`` (embedded broker) on a private PostgreSQL cluster whose databases
give up on a lock after 2 s (``lock_timeout``); a second connection holds table locks across
the node's commits, the way a migration, a backup tool or a failover does.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from bench.private_pg import PrivatePostgres
from helpers import ServerProcess, server_env

from iotvault.config import Settings, load_settings
from iotvault.context import context
from iotvault.devices import register_device
from iotvault.errors import DatabaseUnavailableError
from iotvault.ingest.pipeline import Inbound, IngestPipeline, Outcome
from iotvault.metrics import Metrics
from iotvault.storage.repository import BatchWrite
from iotvault.storage.sql import SqlStore
from rawmqtt import RawDevice, publish_packet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _hold_lock(url: str, table: str, mode: str, seconds: float, locked: threading.Event) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(f"LOCK TABLE {table} IN {mode} MODE")
        locked.set()
        time.sleep(seconds)
        conn.rollback()


def _lock_for(url: str, table: str, mode: str, seconds: float) -> threading.Thread:
    locked = threading.Event()
    t = threading.Thread(target=_hold_lock, args=(url, table, mode, seconds, locked), daemon=True)
    t.start()
    assert locked.wait(10), "could not take the lock"
    return t


def _count(settings: Settings, device_id: str) -> int:
    with context(settings) as ctx:
        return len(ctx.store.events_page(device_id, count=1000))


class _Node:
    def __init__(self, tmp_path: Path, url: str) -> None:
        self.env = server_env(tmp_path, database_url=url)
        self.settings = load_settings(environ=self.env)
        with context(self.settings) as ctx:
            dev = register_device(ctx, "thermo", "dev-1")
        self.device_id, self.password = dev.device_id, dev.credential
        self.topic = f"iot-2/type/thermo/id/{self.device_id}/evt/reading/fmt/json"
        self.server = ServerProcess(self.env, tmp_path / "server.log")

    def device(self) -> RawDevice:
        return RawDevice(int(self.env["IOTVAULT_MQTT_PORT"]), self.device_id, self.password)


@pytest.fixture
def node(tmp_path: Path, private_pg: PrivatePostgres) -> Iterator[_Node]:
    url = private_pg.create_database(f"faults_{uuid.uuid4().hex[:10]}", lock_timeout="2s")
    n = _Node(tmp_path, url)
    n.server.start()
    yield n
    n.server.stop()


async def test_a_failed_last_seen_update_does_not_store_the_committed_batch_again(node: _Node) -> None:
    dev = node.device()
    dev.send(publish_packet(node.topic, b'{"seq": 0}', 1))
    assert dev.pubacks(1, 20) == [1]
    await asyncio.sleep(1.2)  # the next commit also writes lastSeen (at most once a second)
    # devices locked: the events' inserts go through (their foreign key needs only a share
    # lock), the lastSeen update after the commit times out, three times in 6 s
    holder = _lock_for(node.settings.effective_database_url, "devices", "SHARE", 6.0)
    for seq in range(1, 4):
        dev.send(publish_packet(node.topic, f'{{"seq": {seq}}}'.encode(), seq + 1))
        assert dev.pubacks(1, 20) == [seq + 1], node.server.log.read_text()[-3000:]
        await asyncio.sleep(1.1)
    holder.join()
    await asyncio.sleep(2.5)  # lastSeen is written again once the lock is gone
    dev.close()
    assert _count(node.settings, node.device_id) == 4
    log = node.server.log.read_text()
    assert "lastSeen of 1 devices not updated" in log
    with context(node.settings) as ctx:
        device = ctx.store.get_device(node.device_id)
    assert device is not None
    assert device.last_seen_us is not None


async def test_a_resent_message_in_a_failed_batch_is_stored_once(node: _Node) -> None:
    dev = node.device()
    b = b'{"seq": "B"}'
    dev.send(publish_packet(node.topic, b, 13))
    assert dev.pubacks(1, 20) == [13]
    # events locked against inserts for 3 s: the first commit of the next batch fails
    holder = _lock_for(node.settings.effective_database_url, "events", "SHARE", 3.0)
    dev.send(
        publish_packet(node.topic, b'{"seq": "C"}', 14)
        + publish_packet(node.topic, b'{"seq": "D"}', 15)
        + publish_packet(node.topic, b, 13, dup=True)
    )
    acked = dev.pubacks(3, 30)
    holder.join()
    dev.close()
    assert sorted(acked) == [13, 14, 15]
    assert "commit of 3 messages failed" in node.server.log.read_text()
    assert _count(node.settings, node.device_id) == 3


class _LosesTheCommitAnswer:
    """A real store whose first batch commits, and then the answer to COMMIT is lost.

    What a connection cut at the wrong moment, or PostgreSQL's fast shutdown, does: durable in
    the database, an error for the caller.
    """

    def __init__(self, store: SqlStore) -> None:
        self._store = store
        self.lost = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def write_batch(self, batch: BatchWrite) -> None:
        self._store.write_batch(batch)
        if not self.lost:
            self.lost += 1
            raise DatabaseUnavailableError("sqlite:///iotvault.db", "connection lost")


async def test_a_commit_whose_answer_was_lost_is_not_written_again(tmp_path: Path, database_url: str) -> None:
    settings = load_settings(
        environ={"IOTVAULT_DATA_DIR": str(tmp_path / "data"), "IOTVAULT_DATABASE_URL": database_url}
    )
    with context(settings) as ctx:
        register_device(ctx, "thermo", "dev-1")
        store = _LosesTheCommitAnswer(ctx.store)
        pipeline = IngestPipeline(store, ctx.keyring, Metrics(), batch_ms=50)  # type: ignore[arg-type]
        topic = "iot-2/type/thermo/id/dev-1/evt/reading/fmt/json"
        async with pipeline:
            outcomes = await asyncio.gather(
                *(
                    pipeline.submit(Inbound(topic, f'{{"seq": {i}}}'.encode(), 1, False, i + 1, "dev-1"))
                    for i in range(3)
                )
            )
        assert store.lost == 1
        assert outcomes == [Outcome.STORED] * 3
        assert ctx.store.count_events("dev-1") == 3
