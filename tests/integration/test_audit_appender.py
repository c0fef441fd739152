"""The audit log's writer process on a real database (SQLite and PostgreSQL).

What the writer thread promised, the process must keep: a flush means committed, a record no
store can write becomes ``audit.unwritable``, the database away keeps the queue. And what a
process adds: it dies (killed between batches, or stopped while it holds one), it will not
start, it is sent the signals a terminal or a service manager sends the whole group. Each
time nothing acknowledged may be lost, the chain must verify, and the node's descriptors and
children must come back to what they were.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import audit_writers_of

from iotvault.audit import appender as appender_module
from iotvault.audit.appender import AppendRefusedError, ProcessAppender
from iotvault.audit.log import AuditLog, AuditSettings, verify_log
from iotvault.audit.node import AuditService
from iotvault.clock import now_us
from iotvault.config import Settings
from iotvault.crypto.audit_signing import CheckpointSigner
from iotvault.domain.audit import AuditEntry
from iotvault.errors import StorageError
from iotvault.storage.audit import AuditStore

pytestmark = pytest.mark.integration

SEED = b"\x09" * 32


@pytest.fixture
def store(audit_store: AuditStore) -> AuditStore:
    return audit_store


@pytest.fixture
def appender(database_url: str) -> Iterator[ProcessAppender]:
    made = ProcessAppender(database_url)
    yield made
    made.close()


def entry(n: int, **detail: object) -> AuditEntry:
    return AuditEntry(
        at_us=1_700_000_000_000_000 + n, actor="api_key:k_reader", action="http.request", target="d1",
        outcome="success", client="192.0.2.7", request_id=f"r{n}", detail={"events": n, **detail},
    )  # fmt: skip


def log_through(store: AuditStore, appender: ProcessAppender) -> AuditLog:
    """An AuditLog whose batches go to ``appender``, flushed by hand (its thread idles)."""
    audit = AuditLog(store, CheckpointSigner(SEED), now_us, AuditSettings(flush_interval=3600))
    audit.start(appender)
    return audit


def request_ids(store: AuditStore) -> list[str]:
    return [r.entry.request_id for r in store.records(from_seq=1)]


def descriptors() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie, dead but not reaped, does not count: its state is Z)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_batches_are_chained_and_committed_by_another_process(
    store: AuditStore, appender: ProcessAppender
) -> None:
    audit = log_through(store, appender)
    try:
        for i in range(1, 2001):
            audit.record(entry(i, route="/iotf/devices/{deviceId}", method="GET", status=200))
        assert audit.flush() == 2000
        assert store.count() == 2000  # flush returned: the child has committed, not only received
        child = appender.pid
        assert child is not None
        assert child != os.getpid()
        assert alive(child)
        assert request_ids(store) == [f"r{i}" for i in range(1, 2001)]
        assert next(iter(store.records(from_seq=7))).entry.detail == {
            "events": 7, "route": "/iotf/devices/{deviceId}", "method": "GET", "status": 200,
        }  # fmt: skip
    finally:
        audit.close()
    assert appender.pid is None
    assert not alive(child)  # closed: it read the end of its stdin and exited
    assert verify_log(store, audit.public_key).ok


def test_an_entry_no_store_can_write_is_named_by_its_error_as_the_thread_names_it(
    store: AuditStore, appender: ProcessAppender
) -> None:
    audit = log_through(store, appender)
    try:
        audit.record(entry(1))
        audit.record(entry(2, ids={1, 2}))  # a set: marshal carries it, JSON cannot hold it
        audit.record(entry(3))
        assert audit.flush() == 3
    finally:
        audit.close()
    first, stand_in, third = store.records(from_seq=1)
    assert (first.entry.request_id, third.entry.request_id) == ("r1", "r3")
    assert (stand_in.entry.action, stand_in.entry.detail) == (
        "audit.unwritable", {"action": "http.request", "error": "TypeError"},
    )  # fmt: skip
    assert verify_log(store, audit.public_key).ok


def test_a_child_killed_between_batches_is_replaced_and_nothing_is_lost(
    store: AuditStore, appender: ProcessAppender
) -> None:
    audit = log_through(store, appender)
    try:
        audit.record(entry(1))
        assert audit.flush() == 1
        first = appender.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        for i in range(2, 5):
            audit.record(entry(i))
        deadline = time.monotonic() + 10
        while alive(first):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(StorageError, match=rf"pid {first}\) exited with signal 9"):
            audit.flush()
        assert audit.queue_depth == 3  # kept, first in line
        with pytest.raises(StorageError, match="starting it again in"):
            audit.flush()  # within the pause before a new start: no process started
        assert appender.starts == 1
        time.sleep(appender_module.FIRST_RETRY_S + 0.1)
        assert audit.flush() == 3
        assert appender.starts == 2
        assert appender.pid not in (None, first)
    finally:
        audit.close()
    assert request_ids(store) == ["r1", "r2", "r3", "r4"]
    assert verify_log(store, audit.public_key).ok


@pytest.mark.timeout(60)  # a writer blocked on a full pipe would hang here, past every deadline
@pytest.mark.parametrize("batch", [1, 3000], ids=["fits-the-pipe", "longer-than-the-pipe"])
def test_a_child_that_stops_answering_is_killed_and_its_batch_retried(
    store: AuditStore, appender: ProcessAppender, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    """SIGSTOP: the child holds the batch and says nothing, or stops reading it half way (a
    batch longer than the pipe holds). After the deadline it is killed (not left behind) and
    the batch goes back to the queue; a new child writes it."""
    audit = log_through(store, appender)
    try:
        audit.record(entry(0))
        assert audit.flush() == 1
        stuck = appender.pid
        assert stuck is not None
        monkeypatch.setattr(appender_module, "ANSWER_WITHIN_S", 0.5)
        os.kill(stuck, signal.SIGSTOP)
        for i in range(1, batch + 1):
            audit.record(entry(i, route="/iotf/devices/{deviceId}/events", note="x" * 100))
        started = time.monotonic()
        with pytest.raises(StorageError, match="stopped"):
            audit.flush()
        assert time.monotonic() - started < 5
        assert not alive(stuck)  # killed and reaped
        assert audit.queue_depth == batch
        time.sleep(appender_module.FIRST_RETRY_S + 0.1)
        assert audit.flush() == batch
    finally:
        audit.close()
    assert request_ids(store) == [f"r{i}" for i in range(batch + 1)]
    assert verify_log(store, audit.public_key).ok


def test_the_signals_sent_to_the_whole_group_leave_the_child_to_the_last_flush(
    store: AuditStore, appender: ProcessAppender
) -> None:
    """Ctrl-C in a terminal and a service manager's SIGTERM reach every process of the group:
    the child must outlive them, so that the node's last records (``node.stop``) still go
    through it; it exits when the node closes its stdin."""
    audit = log_through(store, appender)
    try:
        audit.record(entry(1))
        assert audit.flush() == 1
        child = appender.pid
        assert child is not None
        os.kill(child, signal.SIGINT)
        os.kill(child, signal.SIGTERM)
        time.sleep(0.3)
        assert alive(child)
        audit.record(entry(2))
    finally:
        audit.close()  # the last flush, through the same child
    assert not alive(child)
    assert appender.starts == 1
    assert request_ids(store) == ["r1", "r2"]


def test_the_database_away_keeps_the_queue_as_the_thread_did(store: AuditStore) -> None:
    away = ProcessAppender("postgresql+psycopg://iotvault@127.0.0.1:1/nothing")
    audit = log_through(store, away)
    try:
        for i in range(1, 4):
            audit.record(entry(i))
        with pytest.raises(StorageError):
            audit.flush()
        assert audit.queue_depth == 3
        assert away.starts == 1  # the child is fine: it answered that the database is away
        assert away.pid is not None
    finally:
        audit._stop.set()  # closed without the last flush that cannot succeed
        away.close()
    assert store.count() == 0


def test_a_child_that_cannot_start_is_retried_later_and_leaks_nothing(
    store: AuditStore, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ProcessAppender, "command", (sys.executable, "-c", "import sys; sys.exit(3)"))
    broken = ProcessAppender(database_url)
    before = descriptors()
    try:
        with pytest.raises(StorageError, match=r"did not start \(exit 3\)"):
            broken.append([entry(1)])
        with pytest.raises(StorageError, match="starting it again in"):
            broken.append([entry(1)])
        assert broken.starts == 1  # the pause holds: no process per attempt
        for _ in range(5):  # ... and every failed start cleans up after itself
            broken._retry_at = 0.0  # the pause skipped, to fail again at once
            with pytest.raises(StorageError, match="did not start"):
                broken.append([entry(1)])
        assert broken.starts == 6
        assert descriptors() == before
    finally:
        broken.close()
    monkeypatch.undo()
    working = ProcessAppender(database_url)
    try:
        working.append([entry(1)])
    finally:
        working.close()
    assert request_ids(store) == ["r1"]


def test_descriptors_and_children_come_back_after_many_deaths(
    store: AuditStore, appender: ProcessAppender
) -> None:
    audit = log_through(store, appender)
    try:
        audit.record(entry(0))
        assert audit.flush() == 1
        before = descriptors()
        killed = []
        for i in range(1, 11):
            pid = appender.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            audit.record(entry(i))
            appender._retry_at = 0.0  # no pause: ten deaths in a row
            while True:
                try:
                    assert audit.flush() == 1
                    break
                except StorageError:
                    appender._retry_at = 0.0
        assert descriptors() == before
        assert not any(alive(pid) for pid in killed)  # each was reaped, none is a zombie
        assert appender.starts == 11
    finally:
        audit.close()
    assert request_ids(store) == [f"r{i}" for i in range(11)]
    assert verify_log(store, audit.public_key).ok


def test_the_childs_log_lines_are_in_the_nodes_format(
    store: AuditStore, database_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """With ``IOTVAULT_LOG_FORMAT=json`` a log shipper reads one JSON object per line: the
    child's lines (on the node's stderr) too, with what a client chose escaped."""
    child = ProcessAppender(database_url, log_format="json")
    try:
        with pytest.raises(AppendRefusedError) as refused:
            child.append([entry(1, ids={1, 2})])
    finally:
        child.close()
    assert refused.value.kind == "TypeError"
    lines = [line for line in capfd.readouterr().err.splitlines() if "audit writer" in line]
    assert lines
    for line in lines:
        doc = json.loads(line)
        assert (doc["level"], doc["logger"]) == ("WARNING", "iotvault.audit.appender")
    assert store.count() == 0


@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_the_node_s_audit_service_writes_through_the_writer_its_settings_name(
    store: AuditStore, database_url: str, tmp_path: Path, writer: str
) -> None:
    """``IOTVAULT_AUDIT_WRITER``: ``process`` (the default) starts a child, ``thread`` none;
    either way the node's start and stop records are on the chain when the service has left."""
    settings = Settings(data_dir=tmp_path, database_url=database_url, audit_writer=writer)
    assert Settings(data_dir=tmp_path).audit_writer == "process"
    audit = AuditLog(store, CheckpointSigner(SEED), now_us)
    async with AuditService(audit, store, settings, "all"):
        await asyncio.to_thread(audit.flush)  # the writer thread has begun: its child started
        deadline = time.monotonic() + 10
        while len(children := audit_writers_of(os.getpid())) < (writer == "process"):
            assert time.monotonic() < deadline, "no audit writer process"
            await asyncio.sleep(0.05)
        assert len(children) == (1 if writer == "process" else 0)
    assert not any(alive(pid) for pid in children)
    assert [r.entry.action for r in store.records(from_seq=1)] == ["node.start", "node.stop"]
    assert verify_log(store, audit.public_key).ok


def test_what_a_client_chose_crosses_the_pipe_and_is_stored_as_the_thread_stores_it(
    store: AuditStore, appender: ProcessAppender
) -> None:
    """A path or header can carry a NUL, a lone surrogate (undecodable bytes), a newline, a
    frame's own length bytes: through the child it is stored replaced exactly as the store in
    process replaces it, and the chain verifies."""
    nasty = "d\x00\udc80\n\x00\x00\x10\x00\\N" + "é" * 300
    audit = log_through(store, appender)
    try:
        audit.record(
            AuditEntry(
                at_us=1_700_000_000_000_001, actor=f"api_key:{nasty}", action="http.request", target=nasty,
                outcome="denied", client="192.0.2.7", request_id="r1", detail={"route": nasty, "status": 404},
            )
        )  # fmt: skip
        assert audit.flush() == 1
    finally:
        audit.close()
    (stored,) = store.records(from_seq=1)
    replaced = nasty.replace("\x00", "\ufffd").replace("\udc80", "\ufffd")
    assert stored.entry.target == replaced[:200]
    assert stored.entry.actor == f"api_key:{replaced}"[:160]
    assert stored.entry.detail["route"] == nasty.replace("\udc80", "\ufffd")
    assert verify_log(store, audit.public_key).ok
