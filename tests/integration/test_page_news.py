"""What became of a kept newest-first page (EventTable.page_news), against what a read returns.

A random history of changes by another connection (newer events, events stored late with
older ids inside and below a page, a device's events deleted) on both databases: after each,
every page's answer must be exact. Nothing changed: ``[]``; only newer events: they, and with
the page's newest they are the page a read returns now; anything else: ``None``, and only
then. On PostgreSQL the asks are made all at once and must be answered in fewer round trips
than asks, each as it would have been alone.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from iotvault.domain.ids import EventIdFactory
from iotvault.storage.db import LoopReader, create_db_engine
from iotvault.storage.migrate import ensure_schema
from iotvault.storage.repository import BatchWrite, PageCheck, StoredEvent
from iotvault.storage.sql import SqlStore

pytestmark = [pytest.mark.integration]

DEVICES = [f"n{i}" for i in range(6)]
COUNTS = (1, 3, 10)


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    engine = create_db_engine(database_url)
    ensure_schema(engine)
    with engine.begin() as conn:  # the PostgreSQL database is shared by the tests: start clean
        conn.execute(text("DELETE FROM events WHERE device_id LIKE 'n%'"))
    yield SqlStore(engine, database_url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM events WHERE device_id LIKE 'n%'"))
    engine.dispose()


def _event(device_id: str, event_id: str) -> StoredEvent:
    return StoredEvent(device_id, event_id, "t", "e", "json", 0, b"sealed")


def _check(ids: list[str], count: int) -> PageCheck:
    return PageCheck(ids[-1] if len(ids) == count else "", len(ids), ids[0])


def _change(engine: Engine, store: SqlStore, rnd: random.Random, now_ms: int) -> tuple[str, str]:
    device = rnd.choice(DEVICES)
    kind = rnd.choices(["newer", "late", "delete"], weights=[6, 3, 1])[0]
    if kind == "delete":
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM events WHERE device_id = :d"), {"d": device})
        return device, kind
    fresh = EventIdFactory()  # a factory of its own: a late id is older than the ones stored
    at = now_ms + rnd.randint(0, 50) if kind == "newer" else now_ms - rnd.randint(1, 40_000)
    batch = [_event(device, fresh.new_at(at + i)) for i in range(rnd.choice([1, 1, 2, 5, 12]))]
    store.write_batch(BatchWrite(events=batch))
    return device, kind


def _derived(old: list[str], new: list[str], count: int) -> list[str] | None:
    """The newer events that with the page before make the page a read returns now, if they do."""
    newer = [e for e in new if e > old[0]]
    return newer if (newer + old)[:count] == new else None


async def test_page_news_is_exact_after_any_change_by_another_connection(store: SqlStore) -> None:
    rnd = random.Random(17)  # noqa: S311 - a repeatable history, not a secret
    engine = store.engine
    now_ms = time.time_ns() // 1_000_000
    ids = EventIdFactory()
    for device in DEVICES:
        store.write_batch(
            BatchWrite(events=[_event(device, ids.new_at(now_ms - 20_000 + i)) for i in range(8)])
        )
    seen = {"[]": 0, "newer": 0, "None": 0}
    for step in range(60):
        pages = {(d, c): [e.event_id for e in store.last_events(d, c)] for d in DEVICES for c in COUNTS}
        pages = {k: v for k, v in pages.items() if v}  # a device with no events has no page kept
        now_ms += 1_000
        changed: dict[str, set[str]] = {}
        for _ in range(rnd.randint(0, 3)):
            device, kind = _change(engine, store, rnd, now_ms)
            changed.setdefault(device, set()).add(kind)
        asks = list(pages.items())
        if isinstance(store._checks, LoopReader):  # all at once: taken together in few round trips
            before = store._pg_news.turns
            answers = await asyncio.gather(*(store.page_news(d, _check(v, c), c) for (d, c), v in asks))
            assert store._pg_news.turns - before < len(asks) or len(asks) == 1
            alone = [await store.page_news(d, _check(v, c), c) for (d, c), v in asks]
            assert answers == alone, f"step {step}: an ask answered with others differs from alone"
        else:
            answers = [await store.page_news(d, _check(v, c), c) for (d, c), v in asks]
        for ((device, count), old), news in zip(asks, answers, strict=True):
            read = store.last_events(device, count)
            assert await store.newest_events(device, count) == read  # the same read on the loop's connection
            new = [e.event_id for e in read]
            got = None if news is None else [e.event_id for e in news]
            where = f"step {step} {device} count={count} {changed.get(device)}: {old} -> {new}"
            if got is not None:  # never wrong
                assert got == _derived(old, new, count), where
                assert all(e.device_id == device and e.payload == b"sealed" for e in news or ())
            if changed.get(device, {"newer"}) == {"newer"}:  # only newer events: never read again
                assert got is not None, where
                assert (got == []) == (new == old), where
            seen["None" if got is None else "[]" if got == [] else "newer"] += 1
    assert min(seen.values()) > 5, seen  # the history exercised every answer


async def test_sqlite_a_current_page_is_not_queried_again_until_something_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While nothing is committed anywhere (the data_version of the pinned connection is as it
    was), a page found current is current without a query; any commit, by this process's pool
    or by another process on the file, and a replaced connection make it be asked again."""
    url = f"sqlite:///{tmp_path / 'v.db'}"
    engine = create_db_engine(url)
    ensure_schema(engine)
    store = SqlStore(engine, url)
    ids = EventIdFactory()
    store.write_batch(BatchWrite(events=[_event("n1", ids.new()) for _ in range(5)]))
    page = [e.event_id for e in store.last_events("n1", 3)]
    queries: list[object] = []
    checks = store._checks
    real_rows = checks.rows

    def counted(statement: dict[str, str], params: tuple[object, ...]) -> list[object]:
        queries.append(params)
        return real_rows(statement, params)

    monkeypatch.setattr(checks, "rows", counted)
    assert await store.page_news("n1", _check(page, 3), 3) == []
    assert await store.page_news("n1", _check(page, 3), 3) == []
    assert len(queries) == 1, "nothing was committed: the page is current without a query"

    store.write_batch(BatchWrite(events=[_event("n2", ids.new())]))  # another device, this process
    assert await store.page_news("n1", _check(page, 3), 3) == []
    assert len(queries) == 2

    other = create_db_engine(url)  # another process on the same file
    newest = ids.new()
    with other.begin() as conn:
        conn.execute(
            text("INSERT INTO events VALUES (:d, :e, 't', 'e', 'json', 0, :p)"),
            {"d": "n1", "e": newest, "p": b"sealed"},
        )
    other.dispose()
    news = await store.page_news("n1", _check(page, 3), 3)
    assert [e.event_id for e in news or ()] == [newest]
    assert len(queries) == 3

    page = [newest, *page[:2]]
    assert await store.page_news("n1", _check(page, 3), 3) == []
    checks.close()  # a new connection: its versions are not comparable with the old one's
    assert await store.page_news("n1", _check(page, 3), 3) == []
    assert len(queries) == 5

    monkeypatch.setattr("iotvault.storage.events.MAX_STILL", 3)
    for count in range(1, 10):
        ids_now = [e.event_id for e in store.last_events("n1", count)]
        await store.page_news("n1", _check(ids_now, count), count)
        assert len(store._sqlite_still) <= 3
    engine.dispose()
