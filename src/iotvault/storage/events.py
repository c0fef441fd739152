"""Stored events, rejected messages and ingest's in-flight records: what an ingest batch writes.

Core rather than the ORM: the ingest path inserts hundreds of rows per transaction and the ORM's
unit of work would cost more than the encryption. Every statement is parameterised.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Select, bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Connection

from iotvault.domain.ids import event_id_bound
from iotvault.storage.commands import apply_command_acks
from iotvault.storage.db import (
    EngineStore,
    LoopReader,
    PinnedReader,
    by_paramstyle,
    driver_connection,
    for_driver,
    is_sqlite,
)
from iotvault.storage.repository import BatchWrite, InflightRecord, PageCheck, RejectedMessage, StoredEvent
from iotvault.storage.schema import devices, events, ingest_inflight, rejected_messages

# the columns in StoredEvent's order, so that its instances are the rows (write_batch)
_EVENTS_COPY = (
    "COPY events (device_id, event_id, type_id, event_type, format, received_us, payload) FROM STDIN"
)
_EVENTS_INSERT = by_paramstyle(
    "INSERT INTO events (device_id, event_id, type_id, event_type, format, received_us, payload) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def _insert_events(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert one ingest batch's events with the driver's bulk path: plain tuples, no Core.

    The ingest writer shares the GIL with the MQTT side, so the client CPU spent per row is
    ingest throughput: ``COPY`` on PostgreSQL and DB-API ``executemany`` on SQLite cost a
    fraction of a Core ``insert()`` with a list of dicts (BENCHMARKS.md, "Measurements behind
    choices in the code"). Both run inside the caller's transaction.
    """
    dialect = conn.dialect
    if dialect.name != "postgresql" or dialect.driver != "psycopg":
        conn.exec_driver_sql(for_driver(_EVENTS_INSERT, conn), rows)
        return
    with driver_connection(conn, _EVENTS_COPY) as raw, raw.cursor() as cur, cur.copy(_EVENTS_COPY) as copy:
        for row in rows:
            copy.write_row(row)


_REJECT_INSERT = insert(rejected_messages)
_INFLIGHT_INSERT = insert(ingest_inflight)
_STATUS_UPDATE = (
    update(devices)
    .where(devices.c.device_id == bindparam("b_device"))
    .values(status=bindparam("b_status"), last_seen_us=bindparam("b_at"))
)


@functools.cache
def _page_query(before: bool, after: bool, since: bool, until: bool) -> Select[Any]:
    """The statement of one shape of :meth:`EventTable.events_page`, built once.

    Values are bound parameters, so each of the 16 shapes is built and compiled once per
    process: building a ``select`` and its cache key on every call cost more than the query
    itself on SQLite (BENCHMARKS.md, "Measurements behind choices in the code").
    """
    c = events.c
    q = select(c.device_id, c.event_id, c.type_id, c.event_type, c.format, c.received_us, c.payload)
    q = q.where(c.device_id == bindparam("b_device"))
    if before:
        q = q.where(c.event_id < bindparam("b_before"))
    if after:
        q = q.where(c.event_id > bindparam("b_after"))
    if since:
        q = q.where(c.event_id >= bindparam("b_since_id"), c.received_us >= bindparam("b_since_us"))
    if until:
        q = q.where(c.event_id <= bindparam("b_until_id"), c.received_us <= bindparam("b_until_us"))
    order = c.event_id.asc() if after else c.event_id.desc()
    return q.order_by(order).limit(bindparam("b_count"))


_PAGE_VERSION = by_paramstyle(
    "SELECT count(*), max(event_id) FROM events WHERE device_id = ? AND event_id >= ?"
)


class EventTable(EngineStore):
    """Implements :class:`~iotvault.storage.repository.EventStore`."""

    @functools.cached_property
    def _checks(self) -> PinnedReader | LoopReader:
        """Where kept pages are checked: on SQLite a connection pinned to the loop's thread
        (:class:`~iotvault.storage.db.PinnedReader`), on PostgreSQL one awaited on the loop
        (:class:`~iotvault.storage.db.LoopReader`)."""
        if is_sqlite(self.engine):
            return PinnedReader(self.engine, self.url)
        return LoopReader(self.engine, self.url)

    def write_batch(self, batch: BatchWrite) -> None:
        with self.begin() as conn:
            if batch.events:
                # a StoredEvent is a tuple of the insert's columns in their order: the rows as they are
                _insert_events(conn, batch.events)
            if batch.rejected:
                conn.execute(
                    _REJECT_INSERT,
                    [
                        {
                            "received_us": r.received_us,
                            "source": r.source[:128],
                            "topic": r.topic[:512],
                            "device_id": r.device_id,
                            "reason": r.reason,
                            "size": r.size,
                        }
                        for r in batch.rejected
                    ],
                )
            if batch.statuses:
                conn.execute(
                    _STATUS_UPDATE,
                    [{"b_device": d, "b_status": s, "b_at": at} for d, (s, at) in batch.statuses.items()],
                )
            if batch.inflight:
                conn.execute(
                    _INFLIGHT_INSERT,
                    [
                        {"consumer": r.consumer, "created_us": r.created_us, "entries": r.entries}
                        for r in batch.inflight
                    ],
                )
            if batch.delete_inflight_before_us is not None:
                conn.execute(
                    delete(ingest_inflight).where(
                        ingest_inflight.c.created_us < batch.delete_inflight_before_us
                    )
                )
            if batch.command_acks:
                apply_command_acks(conn, batch.command_acks)

    def touch_last_seen(self, seen: Mapping[str, int]) -> None:
        if not seen:
            return
        stmt = (
            update(devices)
            .where(devices.c.device_id == bindparam("b_device"))
            .where((devices.c.last_seen_us.is_(None)) | (devices.c.last_seen_us < bindparam("b_at")))
            .values(last_seen_us=bindparam("b_at"))
        )
        with self.begin() as conn:
            conn.execute(stmt, [{"b_device": d, "b_at": at} for d, at in seen.items()])

    def has_event(self, device_id: str, event_id: str) -> bool:
        """Whether an event is stored: asked by ingest before it retries a commit that failed
        without saying whether it had committed (a connection lost at ``COMMIT``)."""
        q = select(events.c.event_id).where(events.c.device_id == device_id, events.c.event_id == event_id)
        with self.connect() as conn:
            return conn.execute(q).first() is not None

    def load_inflight(self) -> list[InflightRecord]:
        with self.connect() as conn:
            rows = conn.execute(select(ingest_inflight).order_by(ingest_inflight.c.id)).all()
        return [InflightRecord(r.consumer, r.created_us, bytes(r.entries), r.id) for r in rows]

    # ---- queries -------------------------------------------------------------------
    def last_events(self, device_id: str, count: int) -> list[StoredEvent]:
        return self.events_page(device_id, count=count)

    def events_page(
        self,
        device_id: str,
        *,
        count: int,
        before: str | None = None,
        after: str | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
    ) -> list[StoredEvent]:
        """Events of one device, newest first unless ``after`` is given (then oldest first)."""
        stmt = _page_query(before is not None, after is not None, since_us is not None, until_us is not None)
        params: dict[str, Any] = {"b_device": device_id, "b_count": count}
        if before is not None:
            params["b_before"] = before
        if after is not None:
            params["b_after"] = after
        if since_us is not None:
            params["b_since_id"] = event_id_bound(since_us, upper=False)
            params["b_since_us"] = since_us
        if until_us is not None:
            params["b_until_id"] = event_id_bound(until_us, upper=True)
            params["b_until_us"] = until_us
        with self.connect() as conn:
            rows = conn.execute(stmt, params).all()
        # the columns in StoredEvent's order (_page_query); both drivers return BLOB/bytea as bytes
        return [StoredEvent._make(row) for row in rows]

    async def page_unchanged(self, device_id: str, check: PageCheck) -> bool:
        """Whether the newest-first page ``check`` describes (read before: :class:`~iotvault.
        storage.repository.PageCheck`) is still what the newest events of the device are.

        One row through the primary key's index. On SQLite it runs right here, on the caller's
        loop (the API reads SQLite on its loop: microseconds of work in C); on PostgreSQL it is
        awaited on the loop's own connection.
        """
        checks = self._checks
        if isinstance(checks, LoopReader):
            n, newest = await checks.one(_PAGE_VERSION, (device_id, check.oldest))
        else:
            n, newest = checks.one(_PAGE_VERSION, (device_id, check.oldest))
        return bool(n == check.length and newest == check.newest)

    def count_events(self, device_id: str | None = None) -> int:
        q = select(func.count()).select_from(events)
        if device_id is not None:
            q = q.where(events.c.device_id == device_id)
        with self.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def replace_payloads(self, rows: Sequence[tuple[str, str, bytes]]) -> None:
        if not rows:
            return
        stmt = (
            update(events)
            .where(events.c.device_id == bindparam("b_device"), events.c.event_id == bindparam("b_event"))
            .values(payload=bindparam("b_payload"))
        )
        with self.begin() as conn:
            conn.execute(stmt, [{"b_device": d, "b_event": e, "b_payload": p} for d, e, p in rows])

    def list_rejected(self, limit: int = 100) -> list[RejectedMessage]:
        with self.connect() as conn:
            rows = conn.execute(
                select(rejected_messages).order_by(rejected_messages.c.id.desc()).limit(limit)
            ).all()
        return [
            RejectedMessage(r.received_us, r.source, r.topic, r.device_id, r.reason, r.size) for r in rows
        ]

    def rejected_counts(self) -> dict[str, int]:
        with self.connect() as conn:
            rows = conn.execute(
                select(rejected_messages.c.reason, func.count()).group_by(rejected_messages.c.reason)
            ).all()
        return {r[0]: int(r[1]) for r in rows}
