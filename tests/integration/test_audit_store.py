"""The audit log on a real database (SQLite and PostgreSQL): tampering found, writers never fork.

Each tampering test changes the stored rows with plain SQL, as someone with database access
would, and expects :func:`verify_log` to name the first record that no longer holds.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from iotvault.audit.log import AuditLog, AuditSettings, read_exported, verify_log
from iotvault.crypto.audit_signing import CheckpointSigner
from iotvault.domain.audit import AuditEntry
from iotvault.errors import StorageError
from iotvault.storage.audit import AuditFilter, AuditStore
from iotvault.storage.db import create_db_engine

pytestmark = pytest.mark.integration

SEED = b"\x07" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000_000_000

    def __call__(self) -> int:
        self.now += 1000
        return self.now


@pytest.fixture
def store(audit_store: AuditStore) -> AuditStore:
    return audit_store


def entry(n: int, actor: str = "user:alice") -> AuditEntry:
    return AuditEntry(
        at_us=1_700_000_000_000_000 + n, actor=actor, action="device.read", target=f"d{n % 3}",
        outcome="success", client="192.0.2.1", request_id=f"r{n}", detail={"events": n},
    )  # fmt: skip


def written(store: AuditStore, n: int = 10, *, checkpoint: bool = True) -> AuditLog:
    audit = AuditLog(store, CheckpointSigner(SEED), Clock())
    for i in range(1, n + 1):
        audit.record(entry(i))
    assert audit.flush() == n
    if checkpoint:
        assert audit.checkpoint() is not None
    return audit


def sql(store: AuditStore, statement: str) -> None:
    with store.begin() as conn:
        conn.execute(text(statement))


def test_records_round_trip_and_verify(store: AuditStore) -> None:
    audit = written(store)
    verdict = verify_log(store, audit.public_key)
    assert verdict.ok, verdict.reason
    assert verdict.checked == 10
    newest = store.query(AuditFilter(target="d1"), limit=2)
    assert [r.seq for r in newest] == [10, 7]
    assert newest[0].entry.detail == {"events": 10}
    page2 = store.query(AuditFilter(target="d1"), before_seq=7, limit=10)
    assert [r.seq for r in page2] == [4, 1]


@pytest.mark.parametrize(
    "nasty",
    ["a\tb", "a\nb", "a\rb", "a\\b", "\\N", "\\.", "\\", "\t", "end\\", "\\t\t\\n\n", "é\u2028\t\\"],
)
def test_separators_and_backslashes_in_any_text_are_stored_as_given(store: AuditStore, nasty: str) -> None:
    """What COPY's text format gives a meaning (PostgreSQL): tab, newline, carriage return,
    backslash, ``\\N`` and ``\\.``, in every text column and in the detail, read back as written."""
    audit = AuditLog(store, CheckpointSigner(SEED), Clock())
    for i in range(3):  # amid plain records: one escaped row among rows that are not
        audit.record(entry(i))
        odd_one = AuditEntry(
            at_us=1_700_000_000_000_100 + i, actor=f"user:{nasty}", action=f"x.{nasty}", target=nasty,
            outcome="failure", client=nasty, request_id=nasty, detail={nasty: nasty, "n": i},
        )  # fmt: skip
        audit.record(odd_one)
    assert audit.flush() == 6
    records = list(store.records())
    odd = [r for r in records if r.entry.outcome == "failure"]
    texts = [(r.entry.actor, r.entry.action, r.entry.target, r.entry.client, r.entry.request_id) for r in odd]
    assert texts == [(f"user:{nasty}", f"x.{nasty}", nasty, nasty, nasty)] * 3
    assert [r.entry.detail for r in odd] == [{nasty: nasty, "n": i} for i in range(3)]
    assert [r.entry.target for r in records if r.entry.outcome == "success"] == ["d0", "d1", "d2"]
    assert audit.checkpoint() is not None
    verdict = verify_log(store, audit.public_key)
    assert verdict.ok, verdict.reason


def test_a_nul_in_what_a_caller_sent_is_stored_replaced_and_never_stops_the_writer(store: AuditStore) -> None:
    """``GET /iotf/devices/a%00b`` reaches the log as target ``a\x00b``: PostgreSQL's text refuses
    NUL, and a batch that cannot be written is retried with everything queued behind it."""
    audit = AuditLog(store, CheckpointSigner(SEED), Clock())
    hostile = AuditEntry(
        at_us=1_700_000_000_000_001, actor="api_key:k\x00x", action="http.request", target="a\x00b",
        outcome="denied", client="192.0.2.1", request_id="r\x00", detail={"path": "/iotf/devices/a\x00b"},
    )  # fmt: skip
    audit.record(hostile)
    audit.record(entry(2))
    assert audit.flush() == 2
    first, second = store.records(from_seq=1)
    assert (first.entry.target, first.entry.actor, first.entry.request_id) == (
        "a\ufffdb",
        "api_key:k\ufffdx",
        "r\ufffd",
    )
    assert first.entry.detail == {"path": "/iotf/devices/a\x00b"}  # JSON text escapes it
    assert second.entry.target == "d2"
    assert audit.checkpoint() is not None
    assert verify_log(store, audit.public_key).ok


def test_a_lone_surrogate_anywhere_is_stored_replaced_and_never_stops_the_writer(store: AuditStore) -> None:
    """Python makes lone surrogates of undecodable bytes (a command line's arguments, say); no
    UTF-8 holds one, so the hash, SQLite and PostgreSQL all refused them and the writer thread
    died with its batch. Now each becomes U+FFFD, in every field and the detail, keys included."""
    audit = AuditLog(store, CheckpointSigner(SEED), Clock())
    s = "\udcff"
    detail: dict[str, object] = {"name": f"x{s}y", f"k{s}": [s, {"n": s}], "n": 1}
    detail["k\ud800"] = 1  # and a key that becomes one already there
    detail["k\ufffd"] = 2
    hostile = AuditEntry(
        at_us=1_700_000_000_000_001, actor=f"user:{s}", action=f"user.{s}", target=f"t{s}",
        outcome="success", client=f"c{s}", request_id=f"r{s}", detail=detail,
    )  # fmt: skip
    audit.record(hostile)
    audit.record(entry(2))
    assert audit.flush() == 2
    first, second = store.records(from_seq=1)
    e = first.entry
    assert (e.actor, e.action, e.target, e.client, e.request_id) == (
        "user:\ufffd", "user.\ufffd", "t\ufffd", "c\ufffd", "r\ufffd",
    )  # fmt: skip
    assert e.detail["name"] == "x\ufffdy"
    assert e.detail["n"] == 1
    assert "\ufffd" in json.dumps(e.detail, ensure_ascii=False)
    assert not any(0xD800 <= ord(ch) <= 0xDFFF for ch in json.dumps(e.detail, ensure_ascii=False))
    assert second.entry.target == "d2"
    assert audit.checkpoint() is not None
    assert verify_log(store, audit.public_key).ok


def test_an_entry_no_store_can_write_becomes_a_record_that_says_so_and_the_writer_goes_on(
    store: AuditStore,
) -> None:
    """A detail JSON cannot hold (a set, made by a bug elsewhere) failed the whole batch with
    a TypeError: the writer thread died with it and every later record waited in its queue
    for ever. Now the batch is written entry by entry, that entry as ``audit.unwritable``."""
    audit = AuditLog(store, CheckpointSigner(SEED), Clock(), AuditSettings(flush_interval=0.01))
    poisoned = AuditEntry(
        at_us=1_700_000_000_000_500, actor="user:alice", action="device.read", target="d1",
        outcome="success", detail={"events": {1, 2}},
    )  # fmt: skip
    audit.record(entry(1))
    audit.record(poisoned)
    audit.record(entry(3))
    assert audit.flush() == 3
    first, stand_in, third = store.records(from_seq=1)
    assert (first.entry.request_id, third.entry.request_id) == ("r1", "r3")
    e = stand_in.entry
    assert (e.actor, e.action, e.target, e.outcome) == ("system", "audit.unwritable", "audit", "error")
    assert e.detail == {"action": "device.read", "error": "TypeError"}
    assert audit.queue_depth == 0  # nothing left to retry for ever
    # the writer thread: a poisoned entry neither stops it nor holds back what follows
    audit.start()
    try:
        audit.record(poisoned)
        audit.record(entry(5))
        deadline = time.monotonic() + 10
        while len(list(store.records(from_seq=1))) < 5:
            assert time.monotonic() < deadline, "the writer stopped writing"
            time.sleep(0.01)
        assert audit.running
        audit.record(entry(6))
        while len(list(store.records(from_seq=1))) < 6:
            assert time.monotonic() < deadline, "the writer stopped after a poisoned entry"
            time.sleep(0.01)
    finally:
        audit.close()
    actions = [r.entry.action for r in store.records(from_seq=1)]
    read, unwritable = "device.read", "audit.unwritable"
    assert actions == [read, unwritable, read, unwritable, read, read]
    assert audit.checkpoint() is None  # close() signed the head already
    assert verify_log(store, audit.public_key).ok


def test_details_are_hashed_as_they_read_back_plain_or_not(store: AuditStore) -> None:
    """A flat detail of plain values is stored as given; any other goes through JSON first
    (tuples become lists): the hash covers what a reader gets back."""
    audit = AuditLog(store, CheckpointSigner(SEED), Clock())
    given = [
        {"method": "GET", "status": 200, "events": 50, "ratio": 0.5, "ok": True, "none": None},
        {"before": {"groups": ("a", "b")}, "after": {"groups": ["a"]}},
        {"text": "é\u2028\x00", "big": 2**70},
    ]
    for i, detail in enumerate(given):
        audit.record(AuditEntry(at_us=1_700_000_000_000_000 + i, actor="user:alice", action="x.changed",
                                target="t", outcome="success", detail=detail))  # fmt: skip
    assert audit.flush() == 3
    back = [r.entry.detail for r in store.records(from_seq=1)]
    assert back[0] == given[0]
    assert back[1] == {"before": {"groups": ["a", "b"]}, "after": {"groups": ["a"]}}
    assert back[2] == given[2]
    assert audit.checkpoint() is not None
    assert verify_log(store, audit.public_key).ok


def test_records_are_stored_and_hashed_as_format_version_1_says(store: AuditStore) -> None:
    """Pinned: the rows and hashes the writer made before issue 17's round 5 made it cheaper, for a
    request's record; one whose texts need clipping and NUL replaced and whose detail is nested
    and not ASCII; a flat detail not ASCII; and every text over its width, a detail with DEL."""
    entries = [
        AuditEntry(
            at_us=1_767_000_000_123_456, actor="api_key:k_reader", action="http.request", target="d1",
            outcome="success", client="192.0.2.7", request_id="0123456789abcdef0123456789abcdef",
            detail={"method": "GET", "route": "/iotf/devices/{deviceId}", "status": 200, "events": 50},
        ),
        AuditEntry(
            at_us=1_767_000_000_123_999, actor="user:zoë\x00", action="device.updated",
            target="tëst\u2028\"\\" + "x" * 300, outcome="denied", client="::1", request_id="r\x7f",
            detail={"before": {"groups": ("a", "é")}, "n": 2**70, "f": 0.1, "x": None,
                    "t": "\t\x00\u00e9\U0001f600\x7f"},
        ),
        AuditEntry(
            at_us=1_767_000_000_124_000, actor="system", action="node.start", target="api",
            outcome="success", detail={"name": "café", "ratio": 0.5, "ok": True},
        ),
        AuditEntry(
            at_us=1_767_000_000_124_001, actor="x" * 170, action="a" * 70, target="t", outcome="failure",
            client="c" * 70, request_id="r" * 70, detail={"del": "\x7f", "tab": "\t"},
        ),
    ]  # fmt: skip
    head = store.append(entries)
    hashes = [
        "13bc57b83683c50c8455771efa3938d5b693da128ad97c627e892fc2248074a5",
        "a6681ae8583cff94276626063600505136b67f13faba0c8c787cd3b1d04df0eb",
        "2f8648fdd292f0042a91c1b552e9b069ac27b0f9095ad577f14ed2f4d3fbd496",
        "b7cfa5ba2c805a01234d906359305cdcaf091aaabf5d92a437a6f621af7be487",
    ]
    assert (head.seq, head.hash) == (4, hashes[3]) == store.head()
    with store.connect() as conn:
        rows = conn.execute(text("SELECT * FROM audit_log ORDER BY seq")).all()
    assert [r.hash for r in rows] == hashes
    assert [r.prev_hash for r in rows] == ["0" * 64, *hashes[:3]]
    assert [r.detail for r in rows] == [
        '{"events":50,"method":"GET","route":"/iotf/devices/{deviceId}","status":200}',
        (
            '{"before":{"groups":["a","\\u00e9"]},"f":0.1,"n":1180591620717411303424,'
            '"t":"\\t\\u0000\\u00e9\\ud83d\\ude00\\u007f","x":null}'
        ),
        '{"name":"caf\\u00e9","ok":true,"ratio":0.5}',
        '{"del":"\\u007f","tab":"\\t"}',
    ]
    assert rows[1].actor == "user:zoë\ufffd"
    assert rows[1].target == ('tëst\u2028"\\' + "x" * 300)[:200]
    assert [len(rows[3].actor), len(rows[3].action), len(rows[3].client), len(rows[3].request_id)] == [
        160, 64, 64, 64,
    ]  # fmt: skip
    assert verify_log(store, CheckpointSigner(SEED).public_key_b64()).ok


def test_a_batch_the_database_refuses_stays_queued_first(store: AuditStore) -> None:
    """A constraint the batch breaks (here: the head moved back under the writer, so its records
    would repeat sequence numbers) is retried, then reported, and nothing is lost or reordered."""
    audit = written(store, 3, checkpoint=False)
    sql(store, "UPDATE audit_head SET seq = 1, hash = (SELECT hash FROM audit_log WHERE seq = 1)")
    for i in range(4, 7):
        audit.record(entry(i))
    with pytest.raises(StorageError, match="kept moving"):
        audit.flush()
    assert audit.queue_depth == 3
    assert store.count() == 3
    sql(store, "UPDATE audit_head SET seq = 3, hash = (SELECT hash FROM audit_log WHERE seq = 3)")
    assert audit.flush() == 3
    assert [r.entry.request_id for r in store.records()] == [f"r{i}" for i in range(1, 7)]
    assert verify_log(store, audit.public_key).ok


def test_an_edited_record_is_named(store: AuditStore) -> None:
    audit = written(store)
    sql(store, "UPDATE audit_log SET outcome = 'failure' WHERE seq = 4")
    verdict = verify_log(store, audit.public_key)
    assert (verdict.ok, verdict.bad_seq) == (False, 4)


def test_a_deleted_record_is_named(store: AuditStore) -> None:
    audit = written(store)
    sql(store, "DELETE FROM audit_log WHERE seq = 6")
    verdict = verify_log(store, audit.public_key)
    assert (verdict.ok, verdict.bad_seq) == (False, 6)


def test_reordered_records_are_named(store: AuditStore) -> None:
    audit = written(store)
    sql(store, "UPDATE audit_log SET seq = 1000 WHERE seq = 3")
    sql(store, "UPDATE audit_log SET seq = 3 WHERE seq = 5")
    sql(store, "UPDATE audit_log SET seq = 5 WHERE seq = 1000")
    verdict = verify_log(store, audit.public_key)
    assert (verdict.ok, verdict.bad_seq) == (False, 3)


def test_a_truncated_tail_is_found_by_the_head_and_the_checkpoint(store: AuditStore) -> None:
    audit = written(store)
    sql(store, "DELETE FROM audit_log WHERE seq > 7")
    verdict = verify_log(store, audit.public_key)
    assert not verdict.ok
    assert "truncated" in verdict.reason
    # Also moving the head back is not enough: the signed checkpoint still names record 10.
    sql(store, "UPDATE audit_head SET seq = 7, hash = (SELECT hash FROM audit_log WHERE seq = 7)")
    verdict = verify_log(store, audit.public_key)
    assert not verdict.ok
    assert "checkpoint names record 10" in verdict.reason


def test_a_rehashed_forgery_fails_against_the_signed_checkpoint(store: AuditStore) -> None:
    audit = written(store)
    records = list(store.records())
    sql(store, "DELETE FROM audit_log")
    sql(store, "UPDATE audit_head SET seq = 0, hash = '" + "0" * 64 + "'")
    forged = [r.entry for r in records]
    forged[2] = AuditEntry(
        **{**{f: getattr(forged[2], f) for f in AuditEntry.__slots__}, "outcome": "denied"}
    )
    store.append(forged)  # a forger with database access rebuilds a consistent chain
    verdict = verify_log(store, audit.public_key)
    assert (verdict.ok, verdict.bad_seq) == (False, 10)  # the first record the checkpoint pins
    # A checkpoint signed with another key does not help the forger.
    sql(store, "DELETE FROM audit_checkpoints")
    AuditLog(store, CheckpointSigner(b"\x09" * 32), Clock()).checkpoint()
    verdict = verify_log(store, audit.public_key)
    assert not verdict.ok
    assert "no valid signature" in verdict.reason


def test_retention_prunes_behind_a_signed_checkpoint(store: AuditStore, tmp_path: Path) -> None:
    audit = written(store, 20, checkpoint=False)
    assert audit.prune_before(15) == 14
    verdict = verify_log(store, audit.public_key)
    assert verdict.ok, verdict.reason
    assert verdict.checked == 6
    # Deleting more behind the checkpoint's back is found.
    sql(store, "DELETE FROM audit_log WHERE seq = 15")
    assert verify_log(store, audit.public_key).bad_seq == 1


def test_exported_checkpoints_catch_a_deleted_checkpoint_table(store: AuditStore, tmp_path: Path) -> None:
    export = tmp_path / "audit-heads.jsonl"
    audit = AuditLog(store, CheckpointSigner(SEED), Clock(), AuditSettings(export_path=export))
    for i in range(1, 6):
        audit.record(entry(i))
    audit.flush()
    audit.checkpoint()
    sql(store, "DELETE FROM audit_log WHERE seq > 3")
    sql(store, "DELETE FROM audit_checkpoints")
    sql(store, "UPDATE audit_head SET seq = 3, hash = (SELECT hash FROM audit_log WHERE seq = 3)")
    assert verify_log(store, audit.public_key).ok  # the database alone now looks whole
    verdict = verify_log(store, audit.public_key, read_exported(export))
    assert not verdict.ok
    assert "truncated" in verdict.reason


def _writer(url: str, actor: str, batches: int) -> None:
    engine = create_db_engine(url)
    store = AuditStore(engine, url)
    for b in range(batches):
        store.append([entry(b * 10 + i, actor) for i in range(10)])
    engine.dispose()


@pytest.mark.slow
def test_concurrent_writer_processes_never_fork_the_chain(store: AuditStore, database_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_writer, args=(database_url, f"node:{n}", 20)) for n in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    assert store.count() == 4 * 20 * 10
    verdict = verify_log(store, CheckpointSigner(SEED).public_key_b64())
    assert verdict.ok, verdict.reason
    assert verdict.checked == 800


def test_the_writer_thread_flushes_and_a_full_queue_is_itself_recorded(store: AuditStore) -> None:
    audit = AuditLog(store, CheckpointSigner(SEED), Clock(), AuditSettings(flush_interval=0.05, queue_size=5))
    for i in range(8):  # 3 over the bound: dropped, and counted
        audit.record(entry(i))
    audit.start()
    audit.close()
    actions = [r.entry.action for r in store.records()]
    assert actions.count("device.read") == 5
    dropped = store.query(AuditFilter(action="audit.dropped"))
    assert [r.entry.detail for r in dropped] == [{"count": 3}]
    assert verify_log(store, audit.public_key).ok


def test_a_failed_flush_keeps_its_entries_first_and_observers_see_each_once(
    store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = AuditLog(store, CheckpointSigner(SEED), Clock())
    seen: list[str] = []
    audit.observers.append(lambda e: seen.append(e.request_id))
    for i in range(1, 4):
        audit.record(entry(i))
    real_append = store.append

    def unavailable(entries: object) -> None:
        raise StorageError("the database is away")

    monkeypatch.setattr(store, "append", unavailable)
    with pytest.raises(StorageError):
        audit.flush()
    assert audit.queue_depth == 3
    audit.record(entry(4))  # recorded while the database is away: after the ones before it
    monkeypatch.setattr(store, "append", real_append)
    assert audit.flush() == 4
    assert [r.entry.request_id for r in store.records()] == ["r1", "r2", "r3", "r4"]
    assert seen == ["r1", "r2", "r3", "r4"]  # an alert rule counts each once
    assert verify_log(store, audit.public_key).ok


def test_queue_depth_and_write_lag_for_metrics(store: AuditStore) -> None:
    clock = Clock()
    audit = AuditLog(store, CheckpointSigner(SEED), clock)
    assert (audit.queue_depth, audit.write_lag_s) == (0, 0.0)
    first = clock()
    audit.record(AuditEntry(first, "user:alice", "device.read", "d1", "success"))
    audit.record(AuditEntry(clock(), "user:alice", "device.read", "d2", "success"))
    assert audit.queue_depth == 2
    clock.now = first + 3_000_000  # three seconds later, nothing written yet
    assert audit.write_lag_s == pytest.approx(3.0, abs=0.01)
    assert audit.flush() == 2
    assert (audit.queue_depth, audit.write_lag_s) == (0, 0.0)
