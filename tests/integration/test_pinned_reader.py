"""The connections kept per thread for page checks (iotvault.storage.db.PinnedReader).

On SQLite and PostgreSQL they must see every commit at once (from another connection or
process), never hold a snapshot or a transaction between reads, survive the server dropping
them, and be closed with the engine or after their thread: descriptors back where they were.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from iotvault.errors import DatabaseUnavailableError
from iotvault.storage.db import LoopReader, PinnedReader, by_paramstyle, create_db_engine
from iotvault.storage.migrate import ensure_schema
from iotvault.storage.repository import PageCheck
from iotvault.storage.sql import SqlStore

COUNT = by_paramstyle("SELECT count(*) FROM devices")
BACKEND = by_paramstyle("SELECT pg_backend_pid()")


def open_fds() -> int:
    gc.collect()  # what earlier tests left to the collector is not counted against this one
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def _migrated(url: str) -> Iterator[Engine]:
    e = create_db_engine(url)
    ensure_schema(e)
    yield e
    e.dispose()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    yield from _migrated(database_url)


def add_device(engine: Engine, device_id: str) -> None:
    with engine.begin() as conn:  # another connection of the pool, as another process would
        conn.execute(
            text("INSERT INTO devices (device_id, type_id, created_us) VALUES (:d, 't', 0)"), {"d": device_id}
        )


def test_a_commit_elsewhere_is_seen_at_once_and_no_transaction_is_held(engine: Engine) -> None:
    reader = PinnedReader(engine, "test")
    assert reader.one(COUNT, ()) == (0,)
    add_device(engine, "d1")
    assert reader.one(COUNT, ()) == (1,)
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            (pid,) = reader.one(BACKEND, ())
            state = conn.execute(text("SELECT state FROM pg_stat_activity WHERE pid = :p"), {"p": pid})
            assert state.scalar_one() == "idle"  # not "idle in transaction": no snapshot kept
        else:  # a snapshot kept open would make a truncating checkpoint impossible
            busy = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").first()
            assert busy is not None
            assert busy[0] == 0


def test_each_thread_has_its_own_connection_closed_after_the_thread_or_with_the_engine(
    database_url: str,
) -> None:
    before = open_fds()
    engine = create_db_engine(database_url)
    ensure_schema(engine)
    reader = PinnedReader(engine, "test")
    seen: list[int] = []
    together = threading.Barrier(4)  # all four hold their connection at once

    def read(wait: bool = True) -> None:
        for _ in range(50):
            seen.append(reader.one(COUNT, ())[0])
        if wait:
            together.wait(timeout=30)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reader.connections == 4  # one per thread that read, never one per read
    read(wait=False)  # a new connection for this thread: those of the ended threads are closed now
    assert seen == [0] * 250
    assert reader.connections == 1
    engine.dispose()
    assert reader.connections == 0
    assert open_fds() == before


def test_a_connection_the_server_dropped_is_replaced_without_an_error(engine: Engine) -> None:
    reader = PinnedReader(engine, "test")
    assert reader.one(COUNT, ()) == (0,)
    if engine.dialect.name == "postgresql":
        (pid,) = reader.one(BACKEND, ())
        with engine.connect() as conn:  # what a restart of the server does to it
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    else:
        reader._local.conn.close()  # closed under it: the dialect counts it as a disconnect too
    assert reader.one(COUNT, ()) == (0,)  # on a new connection, no error
    assert reader.connections == 1


def test_an_unreachable_database_is_unavailable_not_an_internal_error(engine: Engine, tmp_path: Path) -> None:
    reader = PinnedReader(engine, "test")
    if engine.dialect.name == "postgresql":
        unreachable = create_db_engine("postgresql://nobody@127.0.0.1:1/none")
    else:
        unreachable = create_db_engine(f"sqlite:///{tmp_path}")  # a directory: cannot be opened
    try:
        with pytest.raises(DatabaseUnavailableError):
            PinnedReader(unreachable, "unreachable").one(COUNT, ())
    finally:
        unreachable.dispose()
    assert reader.one(COUNT, ()) == (0,)


def test_a_failing_statement_closes_its_connection_and_the_next_read_works(engine: Engine) -> None:
    reader = PinnedReader(engine, "test")
    with pytest.raises(Exception, match="no_such_table"):
        reader.one(by_paramstyle("SELECT * FROM no_such_table"), ())
    assert reader.connections == 0
    assert reader.one(COUNT, ()) == (0,)


async def test_the_page_check_of_a_node_runs_on_its_own_connection(engine: Engine, database_url: str) -> None:
    """SQLite: pinned to the loop's thread; PostgreSQL: awaited on the loop (LoopReader)."""
    store = SqlStore(engine, database_url)
    # no events: a page of one is not what the database holds
    assert await store.page_news("d1", PageCheck("", 1, "x"), 50) is None
    checks = store._checks
    if isinstance(checks, LoopReader):
        assert engine.dialect.name == "postgresql"
        assert checks.connected
    else:
        assert checks.connections == 1
    engine.dispose()
    assert not (checks.connected if isinstance(checks, LoopReader) else checks.connections)


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    yield from _migrated(pg_url)


SLEEP = by_paramstyle("SELECT pg_sleep(1)")


def test_the_loop_reader_sees_commits_holds_no_transaction_and_bounds_a_wait(pg_engine: Engine) -> None:
    pg_engine.dispose()  # the pool's connections are not counted: only the reader's
    before = open_fds()
    reader = LoopReader(pg_engine, "test", timeout_s=0.3)

    async def story() -> None:
        assert await reader.one(COUNT, ()) == (0,)
        add_device(pg_engine, "d1")
        assert await reader.one(COUNT, ()) == (1,)
        (pid,) = await reader.one(BACKEND, ())
        with pg_engine.connect() as conn:
            state = conn.execute(text("SELECT state FROM pg_stat_activity WHERE pid = :p"), {"p": pid})
            assert state.scalar_one() == "idle"
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})  # a restart
        assert await reader.one(COUNT, ()) == (1,)  # replaced, no error
        with pytest.raises(DatabaseUnavailableError, match=r"no answer within 0\.3s"):
            await reader.one(SLEEP, ())
        assert not reader.connected  # the connection that did not answer is closed
        assert await reader.one(COUNT, ()) == (1,)
        many = await asyncio.gather(*(reader.one(COUNT, ()) for _ in range(50)))  # they take turns
        assert many == [(1,)] * 50

    asyncio.run(story())
    asyncio.run(story_on_another_loop(reader))  # a loop's connection is not used from another
    pg_engine.dispose()
    assert not reader.connected
    assert open_fds() == before


async def story_on_another_loop(reader: LoopReader) -> None:
    assert await reader.one(COUNT, ()) == (1,)


def test_an_unreachable_postgresql_is_unavailable_to_the_loop_reader() -> None:
    engine = create_db_engine("postgresql://nobody@127.0.0.1:1/none")
    try:
        with pytest.raises(DatabaseUnavailableError):
            asyncio.run(LoopReader(engine, "unreachable").one(COUNT, ()))
    finally:
        engine.dispose()
