"""The SQLite connections kept per thread for page checks (iotvault.storage.db.PinnedReader).

They must see every commit at once (from another connection or process), never hold a
snapshot that keeps a writer or a checkpoint waiting, recover from a broken connection, and be
closed with the engine: descriptors back to where they were.
"""

from __future__ import annotations

import gc
import sqlite3
import threading
from pathlib import Path

import pytest

from iotvault.errors import DatabaseUnavailableError
from iotvault.storage.db import PinnedReader, create_db_engine
from iotvault.storage.migrate import ensure_schema
from iotvault.storage.repository import PageCheck
from iotvault.storage.sql import SqlStore

COUNT = "SELECT count(*) FROM pinned"


def open_fds() -> int:
    gc.collect()  # what earlier tests left to the collector is not counted against this one
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "pinned.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE pinned (n INTEGER)")
    return path


def test_a_commit_elsewhere_is_seen_at_once_and_no_snapshot_is_held(db: Path) -> None:
    engine = create_db_engine(f"sqlite:///{db}")
    reader = PinnedReader(engine, str(db))
    try:
        assert reader.one(COUNT, ()) == (0,)
        with sqlite3.connect(db) as other:  # another process's connection
            other.execute("INSERT INTO pinned VALUES (1)")
        assert reader.one(COUNT, ()) == (1,)
        # a snapshot kept open would make a truncating checkpoint impossible: it succeeds
        with sqlite3.connect(db) as other:
            busy, _, _ = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
    finally:
        engine.dispose()


def test_each_thread_has_its_own_connection_and_all_close_with_the_engine(db: Path) -> None:
    before = open_fds()
    engine = create_db_engine(f"sqlite:///{db}")
    reader = PinnedReader(engine, str(db))
    seen: list[int] = []

    def read() -> None:
        for _ in range(50):
            seen.append(reader.one(COUNT, ())[0])

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    read()
    assert seen == [0] * 250
    assert len(reader._open) == 5  # one per thread that read, never one per read
    assert open_fds() > before
    engine.dispose()
    assert reader._open == []
    assert open_fds() == before


def test_a_broken_connection_is_replaced_and_a_locked_database_is_unavailable(db: Path) -> None:
    engine = create_db_engine(f"sqlite:///{db}")
    reader = PinnedReader(engine, str(db))
    try:
        assert reader.one(COUNT, ()) == (0,)
        reader._local.conn.close()  # broken under it
        with pytest.raises(Exception, match="closed database"):
            reader.one(COUNT, ())
        assert reader.one(COUNT, ()) == (0,)  # made anew
        assert len(reader._open) == 1
        with pytest.raises(DatabaseUnavailableError):
            reader.one("SELECT * FROM no_such_table_but_an_operational_error", ())
        assert reader.one(COUNT, ()) == (0,)
    finally:
        engine.dispose()


def test_the_page_check_of_a_node_runs_on_a_pinned_connection(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'node.db'}")
    ensure_schema(engine)
    store = SqlStore(engine, str(tmp_path / "node.db"))
    try:
        assert store._pinned is not None
        # no events: the page of none is "changed" from a page of one, and read
        assert store.newest_events("d1", 5, unless=PageCheck("", 1, "x")) == []
        assert len(store._pinned._open) == 1
    finally:
        engine.dispose()
    assert store._pinned._open == []
