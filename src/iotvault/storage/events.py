"""Stored events, rejected messages and ingest's in-flight records: what an ingest batch writes.

Core rather than the ORM: the ingest path inserts hundreds of rows per transaction and the ORM's
unit of work would cost more than the encryption. Every statement is parameterised.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Select, bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Connection

from iotvault.domain.ids import event_id_bound
from iotvault.storage.commands import apply_command_acks
from iotvault.storage.db import (
    Coalesced,
    EngineStore,
    LoopReader,
    PinnedReader,
    by_paramstyle,
    driver_connection,
    for_driver,
    insert_rows,
    is_sqlite,
    sqlite_chunks,
)
from iotvault.storage.repository import BatchWrite, InflightRecord, PageCheck, RejectedMessage, StoredEvent
from iotvault.storage.schema import devices, events, ingest_inflight, rejected_messages

# the columns in StoredEvent's order, so that its instances are the rows (write_batch)
_EVENTS_COPY = (
    "COPY events (device_id, event_id, type_id, event_type, format, received_us, payload) "
    "FROM STDIN (FORMAT BINARY)"
)
# binary COPY: a payload goes as its bytes, not as hex text the server decodes again
_EVENTS_COPY_TYPES = ("varchar", "varchar", "varchar", "varchar", "varchar", "int8", "bytea")
_EVENTS_INTO = "INSERT INTO events (device_id, event_id, type_id, event_type, format, received_us, payload)"
_EVENTS_INSERT = by_paramstyle(f"{_EVENTS_INTO} VALUES (?, ?, ?, ?, ?, ?, ?)")


def _insert_events(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert one ingest batch's events with the driver's bulk path: plain tuples, no Core.

    The ingest writer shares the GIL with the MQTT side, so the client CPU spent per row is
    ingest throughput: ``COPY`` on PostgreSQL and multi-row ``INSERT``s on SQLite
    (:func:`~iotvault.storage.db.insert_rows`, a few steps a batch rather than one a row) cost a
    fraction of a Core ``insert()`` with a list of dicts (BENCHMARKS.md, "Measurements behind
    choices in the code"). Both run inside the caller's transaction.
    """
    dialect = conn.dialect
    if dialect.name == "sqlite":
        with driver_connection(conn, _EVENTS_INTO) as raw:
            cur = raw.cursor()
            try:
                insert_rows(cur, _EVENTS_INTO, rows)
            finally:
                cur.close()
        return
    if dialect.driver != "psycopg":  # another PostgreSQL driver named in the URL
        conn.exec_driver_sql(for_driver(_EVENTS_INSERT, conn), rows)
        return
    with driver_connection(conn, _EVENTS_COPY) as raw, raw.cursor() as cur, cur.copy(_EVENTS_COPY) as copy:
        copy.set_types(_EVENTS_COPY_TYPES)
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
def _touch_sql(devices: int) -> str:
    """SQLite: set ``last_seen_us`` of ``devices`` devices unless it is later already; the
    parameters are the (device, time) pairs, then the devices again."""
    cases = " ".join(["WHEN ? THEN ?"] * devices)
    marks = ",".join("?" * devices)
    # placeholders only: every value is a parameter
    sql = "UPDATE devices SET last_seen_us = max(coalesce(last_seen_us, 0), CASE device_id "
    return sql + cases + " END) WHERE device_id IN (" + marks + ")"


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


# what became of a kept page (EventTable.page_news): how many events from its oldest id on, and
# the newest events after its newest id (none: one row whose event columns are NULL)
_PAGE_NEWS = by_paramstyle(
    "SELECT c.n, e.device_id, e.event_id, e.type_id, e.event_type, e.format, e.received_us, e.payload "
    "FROM (SELECT count(*) AS n FROM events WHERE device_id = ? AND event_id >= ?) AS c "
    "LEFT JOIN (SELECT device_id, event_id, type_id, event_type, format, received_us, payload "
    "FROM events WHERE device_id = ? AND event_id > ? "
    "ORDER BY event_id DESC LIMIT ?) AS e ON 1 = 1 ORDER BY e.event_id DESC"
)
# the same for several pages in one round trip (PostgreSQL): the pages as arrays, by position
_PAGES_NEWS = by_paramstyle(
    "SELECT v.i, c.n, e.device_id, e.event_id, e.type_id, e.event_type, e.format, e.received_us, e.payload "
    "FROM unnest(?::text[], ?::text[], ?::text[], ?::int[]) WITH ORDINALITY AS v(d, o, nw, lim, i) "
    "CROSS JOIN LATERAL (SELECT count(*) AS n FROM events WHERE device_id = v.d AND event_id >= v.o) AS c "
    "LEFT JOIN LATERAL (SELECT device_id, event_id, type_id, event_type, format, received_us, payload "
    "FROM events WHERE device_id = v.d AND event_id > v.nw "
    "ORDER BY event_id DESC LIMIT v.lim) AS e ON true ORDER BY v.i, e.event_id DESC"
)

# a device's newest events, for a read on a connection of its own (EventTable.newest_events)
_NEWEST = by_paramstyle(
    "SELECT device_id, event_id, type_id, event_type, format, received_us, payload "
    "FROM events WHERE device_id = ? ORDER BY event_id DESC LIMIT ?"
)

_NewsKey = tuple[str, PageCheck, int]  # device, the page's check, the count asked for
MAX_STILL = 10_000  # pages remembered as current on SQLite (EventTable._sqlite_still)


def _news(check: PageCheck, count: int, n: int, newer: list[StoredEvent]) -> list[StoredEvent] | None:
    """What the page ``check`` describes became, from ``n`` (the events from its oldest id on)
    and ``newer`` (the newest events after its newest id, at most ``count``, newest first).

    Events are only ever added (a device's go all at once). ``count`` newer events are the page
    by themselves. Fewer are all there are, so if they account for every event counted beyond
    the page's, nothing else came (no event stored late with an id inside the page, no device
    deleted and made again): the page is they and the page's newest. Otherwise it is read again.
    """
    if len(newer) >= count or n == check.length + len(newer):
        return newer
    return None


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
        if is_sqlite(self.engine):
            self._touch_sqlite(list(seen.items()))
            return
        stmt = (
            update(devices)
            .where(devices.c.device_id == bindparam("b_device"))
            .where((devices.c.last_seen_us.is_(None)) | (devices.c.last_seen_us < bindparam("b_at")))
            .values(last_seen_us=bindparam("b_at"))
        )
        with self.begin() as conn:
            conn.execute(stmt, [{"b_device": d, "b_at": at} for d, at in seen.items()])

    def _touch_sqlite(self, seen: list[tuple[str, int]]) -> None:
        """``lastSeen`` of many devices in a few statements (64 devices each), not one a device.

        It runs once a second on the ingest writer's thread with every device heard from in
        that second; ``executemany`` gave up the interpreter lock at every device and waited up
        to 5 ms for it back while the event loop was busy (:func:`~iotvault.storage.db.
        insert_rows` says more): 200 devices held the writer for up to a second.
        """
        with self.begin() as conn, driver_connection(conn, "UPDATE devices") as raw:
            cur = raw.cursor()
            try:
                for chunk in sqlite_chunks(seen):
                    params = [v for pair in chunk for v in pair] + [device for device, _ in chunk]
                    cur.execute(_touch_sql(len(chunk)), params)
            finally:
                cur.close()

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

    async def page_news(self, device_id: str, check: PageCheck, count: int) -> list[StoredEvent] | None:
        """What became of the newest-first page of ``count`` events that ``check`` describes (read
        before: :class:`~iotvault.storage.repository.PageCheck`): ``[]`` if it is unchanged; the
        events stored after its newest (newest first, at most ``count``) if that is all that
        changed, so that those and the page's newest make the page now; None if it must be read
        again.

        One statement through the primary key's index (a count and the events after the page),
        whose rows are usually none. On SQLite it runs right here, on the caller's loop (the API
        reads SQLite on its loop: microseconds of work in C); on PostgreSQL it is awaited on the
        loop's own connection, together with the other pages asked about meanwhile
        (:class:`~iotvault.storage.db.Coalesced`).
        """
        checks = self._checks
        if isinstance(checks, LoopReader):
            n, newer = await self._pg_news.ask((device_id, check, count))
        else:
            key = (device_id, check, count)
            stamp = checks.stamp()
            if self._sqlite_still.get(key) == stamp:  # nothing was committed since it was current
                return []
            rows = checks.rows(_PAGE_NEWS, (device_id, check.oldest, device_id, check.newest, count))
            n = rows[0][0]
            newer = [StoredEvent._make(row[1:]) for row in rows if row[2] is not None]
            news = _news(check, count, n, newer)
            if news == []:
                if len(self._sqlite_still) >= MAX_STILL:
                    self._sqlite_still.clear()
                self._sqlite_still[key] = stamp
            return news
        return _news(check, count, n, newer)

    @functools.cached_property
    def _sqlite_still(self) -> dict[_NewsKey, tuple[int, int]]:
        """SQLite: pages found current, with the stamp of the database they were current at
        (:meth:`~iotvault.storage.db.PinnedReader.stamp`). While the database is as it was (no
        commit anywhere since: between the audit log's flushes, when nothing is ingested), a
        page that was current is still current without a query."""
        return {}

    async def newest_events(self, device_id: str, count: int) -> list[StoredEvent]:
        """:meth:`last_events`, read where :meth:`page_news` reads: on SQLite right here on the
        loop's pinned connection, on PostgreSQL awaited on the loop's own (no worker thread)."""
        checks = self._checks
        if isinstance(checks, LoopReader):
            rows = await checks.rows(_NEWEST, (device_id, count))
        else:
            rows = checks.rows(_NEWEST, (device_id, count))
        return [StoredEvent._make(row) for row in rows]

    @functools.cached_property
    def _pg_news(self) -> Coalesced[_NewsKey, tuple[int, list[StoredEvent]]]:
        return Coalesced(self._pages_news)

    async def _pages_news(self, keys: list[_NewsKey]) -> dict[_NewsKey, tuple[int, list[StoredEvent]]]:
        """The count and newer events of each page (:meth:`page_news`), in one round trip."""
        reader = cast(LoopReader, self._checks)  # only PostgreSQL's asks come here
        params = (
            [device for device, _, _ in keys],
            [check.oldest for _, check, _ in keys],
            [check.newest for _, check, _ in keys],
            [count for _, _, count in keys],
        )
        counts = [0 for _ in keys]
        newer: list[list[StoredEvent]] = [[] for _ in keys]
        for row in await reader.rows(_PAGES_NEWS, params):
            at = row[0] - 1  # the page's position in keys (WITH ORDINALITY counts from 1)
            counts[at] = row[1]
            if row[3] is not None:
                newer[at].append(StoredEvent._make(row[2:]))
        return {key: (counts[at], newer[at]) for at, key in enumerate(keys)}

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
