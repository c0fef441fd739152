"""``lastSeen`` of many devices at once (EventTable.touch_last_seen): only ever moved forward,
unknown devices ignored; on SQLite in a few statements rather than one a device."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select, text

from iotvault.storage import events as events_module
from iotvault.storage.db import create_db_engine
from iotvault.storage.migrate import ensure_schema
from iotvault.storage.schema import devices
from iotvault.storage.sql import SqlStore

pytestmark = [pytest.mark.integration]


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    engine = create_db_engine(database_url)
    ensure_schema(engine)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM devices WHERE device_id LIKE 'ls-%'"))
    yield SqlStore(engine, database_url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM devices WHERE device_id LIKE 'ls-%'"))
    engine.dispose()


@pytest.mark.parametrize("n", [1, 5, 70, 201])
def test_last_seen_only_moves_forward_for_every_device(
    store: SqlStore, n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    before: dict[str, int | None] = {}
    with store.engine.begin() as conn:
        for i in range(n):
            prior = None if i % 3 == 0 else (1_000 if i % 3 == 1 else 9_000)  # none, older, newer
            before[f"ls-{i}"] = prior
            conn.execute(
                text(
                    "INSERT INTO devices (device_id, type_id, created_us, last_seen_us)"
                    " VALUES (:d, 't', 0, :s)"
                ),
                {"d": f"ls-{i}", "s": prior},
            )
    seen = {f"ls-{i}": 5_000 + i for i in range(n)}
    seen["ls-unknown"] = 7_000  # a device deleted meanwhile: ignored
    statements: list[int] = []
    real_sql = events_module._touch_sql

    def counted(devices_in_statement: int) -> str:
        statements.append(devices_in_statement)
        return real_sql(devices_in_statement)

    monkeypatch.setattr(events_module, "_touch_sql", counted)
    store.touch_last_seen(seen)
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(devices.c.device_id, devices.c.last_seen_us).where(devices.c.device_id.like("ls-%"))
        )
        after = {row[0]: row[1] for row in rows}
    assert set(after) == set(before)
    for device, prior in before.items():
        assert after[device] == max(prior or 0, seen[device]), device
    if store.engine.dialect.name == "sqlite":  # a statement for each 64, 16, 4 or 1 of them
        assert sum(statements) == len(seen)
        assert len(statements) <= len(seen) // 64 + 9
