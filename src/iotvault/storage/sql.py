"""The repository for SQLite and PostgreSQL, written once in SQLAlchemy Core.

Core rather than the ORM: the ingest path inserts hundreds of rows per transaction and the ORM's
unit of work would cost more than the encryption. Every statement is parameterised.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Select, bindparam, delete, func, insert, literal, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import DBAPIError, IntegrityError

from iotvault.errors import DeviceExistsError, DeviceNotFoundError, StorageError
from iotvault.storage.db import EngineStore, mapped_errors
from iotvault.storage.repository import (
    BatchWrite,
    CommandAck,
    CommandRecord,
    DeviceCredentials,
    DeviceRecord,
    InflightRecord,
    RejectedMessage,
    SecurityEvent,
    StoredEvent,
)
from iotvault.storage.schema import (
    commands,
    device_keys,
    devices,
    events,
    group_devices,
    ingest_inflight,
    meta,
    rejected_messages,
    security_events,
)


def event_id_bound(unix_us: int, *, upper: bool) -> str:
    """The smallest (or largest) UUIDv7 of the millisecond holding ``unix_us``.

    Lets a time-range query run on the ``(device_id, event_id)`` primary key.
    """
    ms = max(0, unix_us // 1000) & ((1 << 48) - 1)
    low_bits = (1 << 80) - 1 if upper else 0
    return str(uuid.UUID(int=(ms << 80) | low_bits))


def _device(row: Row[Any]) -> DeviceRecord:
    return DeviceRecord(
        device_id=row.device_id,
        type_id=row.type_id,
        status=row.status,
        last_seen_us=row.last_seen_us,
        metadata=json.loads(row.metadata or "{}"),
        created_us=row.created_us,
    )


_EVENTS_COPY = (
    "COPY events (device_id, event_id, type_id, event_type, format, received_us, payload) FROM STDIN"
)
_EVENTS_INSERT = {
    "qmark": "INSERT INTO events (device_id, event_id, type_id, event_type, format, received_us, payload) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)",
    "format": "INSERT INTO events (device_id, event_id, type_id, event_type, format, received_us, payload) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s)",
}


def _insert_events(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert one ingest batch's events with the driver's bulk path: plain tuples, no Core.

    The ingest writer shares the GIL with the MQTT side, so the client CPU spent per row is
    ingest throughput. Per row on the 2-core development machine (BENCHMARKS.md): a Core
    ``insert()`` with a list of dicts cost 16-26 µs on PostgreSQL, 10-18 µs on SQLite;
    ``COPY`` on PostgreSQL costs about 3 µs, DB-API ``executemany`` on SQLite about 10 µs.
    Both run inside the caller's transaction.
    """
    dialect = conn.dialect
    if dialect.name != "postgresql" or dialect.driver != "psycopg":
        conn.exec_driver_sql(_EVENTS_INSERT["qmark" if dialect.paramstyle == "qmark" else "format"], rows)
        return
    raw: Any = conn.connection.driver_connection
    dbapi_error = dialect.loaded_dbapi.Error
    try:
        with raw.cursor() as cur, cur.copy(_EVENTS_COPY) as copy:
            for row in rows:
                copy.write_row(row)
    except dbapi_error as exc:
        # what SQLAlchemy does for the statements it runs: drop a dead connection, and raise
        # its own exception type, which mapped_errors turns into DatabaseUnavailableError
        gone = dialect.is_disconnect(exc, raw, None)
        if gone:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            _EVENTS_COPY, None, exc, dbapi_error, connection_invalidated=gone, dialect=dialect
        ) from exc


_DEVICE_BY_ID = select(devices).where(devices.c.device_id == bindparam("b_device"))
_REJECT_INSERT = insert(rejected_messages)
_INFLIGHT_INSERT = insert(ingest_inflight)
_STATUS_UPDATE = (
    update(devices)
    .where(devices.c.device_id == bindparam("b_device"))
    .values(status=bindparam("b_status"), last_seen_us=bindparam("b_at"))
)


@functools.cache
def _page_query(before: bool, after: bool, since: bool, until: bool) -> Select[Any]:
    """The statement of one shape of :meth:`SqlStore.events_page`, built once.

    Values are bound parameters, so each of the 16 shapes is built and compiled once per
    process: building a ``select`` and its cache key on every call cost 0.3 ms, three times
    the query itself on SQLite (BENCHMARKS.md, the last-50 API read).
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


class SqlStore(EngineStore):
    """Implements DeviceStore, KeyStore and EventStore on one SQLAlchemy engine."""

    # ---- meta ----------------------------------------------------------------------
    def get_meta(self, name: str) -> str | None:
        with mapped_errors(self.url), self.engine.connect() as conn:
            return conn.execute(select(meta.c.value).where(meta.c.name == name)).scalar_one_or_none()

    def set_meta(self, name: str, value: str) -> None:
        with mapped_errors(self.url), self.engine.begin() as conn:
            updated = conn.execute(update(meta).where(meta.c.name == name).values(value=value)).rowcount
            if not updated:
                conn.execute(insert(meta).values(name=name, value=value))

    # ---- devices -------------------------------------------------------------------
    def add_device(self, device: DeviceRecord, *, wrapped_key: bytes, credential_hash: str | None) -> None:
        try:
            with mapped_errors(self.url), self.engine.begin() as conn:
                conn.execute(
                    insert(devices).values(
                        device_id=device.device_id,
                        type_id=device.type_id,
                        status=device.status,
                        last_seen_us=device.last_seen_us,
                        metadata=json.dumps(dict(device.metadata), separators=(",", ":")),
                        credential_hash=credential_hash,
                        created_us=device.created_us,
                    )
                )
                conn.execute(
                    insert(device_keys).values(
                        device_id=device.device_id,
                        version=1,
                        wrapped=wrapped_key,
                        created_us=device.created_us,
                    )
                )
        except IntegrityError:
            raise DeviceExistsError(device.device_id) from None

    def get_device(self, device_id: str) -> DeviceRecord | None:
        with mapped_errors(self.url), self.engine.connect() as conn:
            row = conn.execute(_DEVICE_BY_ID, {"b_device": device_id}).first()
        return _device(row) if row is not None else None

    def list_devices(self) -> list[DeviceRecord]:
        with mapped_errors(self.url), self.engine.connect() as conn:
            rows = conn.execute(select(devices).order_by(devices.c.device_id)).all()
        return [_device(r) for r in rows]

    def device_ids(self) -> list[str]:
        with mapped_errors(self.url), self.engine.connect() as conn:
            return list(conn.execute(select(devices.c.device_id).order_by(devices.c.device_id)).scalars())

    def delete_device(self, device_id: str) -> bool:
        """Delete a device, its events and its data keys (crypto-shredding) in one transaction.

        Its group grants go too, so that a later device of the same id inherits none of them.
        """
        with mapped_errors(self.url), self.engine.begin() as conn:
            conn.execute(delete(group_devices).where(group_devices.c.device_id == device_id))
            conn.execute(delete(device_keys).where(device_keys.c.device_id == device_id))
            conn.execute(delete(events).where(events.c.device_id == device_id))
            return bool(conn.execute(delete(devices).where(devices.c.device_id == device_id)).rowcount)

    def credential_hashes(self, device_id: str) -> tuple[str | None, str | None, int | None]:
        with mapped_errors(self.url), self.engine.connect() as conn:
            row = conn.execute(
                select(
                    devices.c.credential_hash,
                    devices.c.previous_credential_hash,
                    devices.c.previous_credential_expires_us,
                ).where(devices.c.device_id == device_id)
            ).first()
        if row is None:
            raise DeviceNotFoundError(device_id)
        return row[0], row[1], row[2]

    def set_credential(
        self, device_id: str, credential_hash: str, *, previous_valid_until_us: int | None
    ) -> None:
        with mapped_errors(self.url), self.engine.begin() as conn:
            old = conn.execute(
                select(devices.c.credential_hash).where(devices.c.device_id == device_id)
            ).first()
            if old is None:
                raise DeviceNotFoundError(device_id)
            conn.execute(
                update(devices)
                .where(devices.c.device_id == device_id)
                .values(
                    credential_hash=credential_hash,
                    previous_credential_hash=old[0] if previous_valid_until_us else None,
                    previous_credential_expires_us=previous_valid_until_us,
                )
            )

    # ---- data keys -----------------------------------------------------------------
    def data_keys(self, device_id: str) -> dict[int, bytes]:
        with mapped_errors(self.url), self.engine.connect() as conn:
            rows = conn.execute(
                select(device_keys.c.version, device_keys.c.wrapped).where(
                    device_keys.c.device_id == device_id
                )
            ).all()
        return {r.version: bytes(r.wrapped) for r in rows}

    def latest_data_key(self, device_id: str) -> tuple[int, bytes] | None:
        with mapped_errors(self.url), self.engine.connect() as conn:
            row = conn.execute(
                select(device_keys.c.version, device_keys.c.wrapped)
                .where(device_keys.c.device_id == device_id)
                .order_by(device_keys.c.version.desc())
                .limit(1)
            ).first()
        return (row.version, bytes(row.wrapped)) if row is not None else None

    def add_data_key(self, device_id: str, version: int, wrapped: bytes, created_us: int = 0) -> None:
        with mapped_errors(self.url), self.engine.begin() as conn:
            conn.execute(
                insert(device_keys).values(
                    device_id=device_id, version=version, wrapped=wrapped, created_us=created_us
                )
            )

    # ---- ingest --------------------------------------------------------------------
    def write_batch(self, batch: BatchWrite) -> None:
        with mapped_errors(self.url), self.engine.begin() as conn:
            if batch.events:
                _insert_events(
                    conn,
                    [
                        (e.device_id, e.event_id, e.type_id, e.event_type, e.fmt, e.received_us, e.payload)
                        for e in batch.events
                    ],
                )
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
                _apply_command_acks(conn, batch.command_acks)

    def touch_last_seen(self, seen: Mapping[str, int]) -> None:
        if not seen:
            return
        stmt = (
            update(devices)
            .where(devices.c.device_id == bindparam("b_device"))
            .where((devices.c.last_seen_us.is_(None)) | (devices.c.last_seen_us < bindparam("b_at")))
            .values(last_seen_us=bindparam("b_at"))
        )
        with mapped_errors(self.url), self.engine.begin() as conn:
            conn.execute(stmt, [{"b_device": d, "b_at": at} for d, at in seen.items()])

    def has_event(self, device_id: str, event_id: str) -> bool:
        """Whether an event is stored: asked by ingest before it retries a commit that failed
        without saying whether it had committed (a connection lost at ``COMMIT``)."""
        q = select(events.c.event_id).where(events.c.device_id == device_id, events.c.event_id == event_id)
        with mapped_errors(self.url), self.engine.connect() as conn:
            return conn.execute(q).first() is not None

    def load_inflight(self) -> list[InflightRecord]:
        with mapped_errors(self.url), self.engine.connect() as conn:
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
        with mapped_errors(self.url), self.engine.connect() as conn:
            rows = conn.execute(stmt, params).all()
        # the columns in StoredEvent's order (_page_query); both drivers return BLOB/bytea as bytes
        return [StoredEvent._make(row) for row in rows]

    def count_events(self, device_id: str | None = None) -> int:
        q = select(func.count()).select_from(events)
        if device_id is not None:
            q = q.where(events.c.device_id == device_id)
        with mapped_errors(self.url), self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def replace_payloads(self, rows: Sequence[tuple[str, str, bytes]]) -> None:
        if not rows:
            return
        stmt = (
            update(events)
            .where(events.c.device_id == bindparam("b_device"), events.c.event_id == bindparam("b_event"))
            .values(payload=bindparam("b_payload"))
        )
        with mapped_errors(self.url), self.engine.begin() as conn:
            conn.execute(stmt, [{"b_device": d, "b_event": e, "b_payload": p} for d, e, p in rows])

    def list_rejected(self, limit: int = 100) -> list[RejectedMessage]:
        with mapped_errors(self.url), self.engine.connect() as conn:
            rows = conn.execute(
                select(rejected_messages).order_by(rejected_messages.c.id.desc()).limit(limit)
            ).all()
        return [
            RejectedMessage(r.received_us, r.source, r.topic, r.device_id, r.reason, r.size) for r in rows
        ]

    def rejected_counts(self) -> dict[str, int]:
        with mapped_errors(self.url), self.engine.connect() as conn:
            rows = conn.execute(
                select(rejected_messages.c.reason, func.count()).group_by(rejected_messages.c.reason)
            ).all()
        return {r[0]: int(r[1]) for r in rows}

    # ---- device security: meta, credentials, status ------------------------------------
    def add_meta_if_absent(self, name: str, value: str) -> str:
        """Store ``value`` under ``name`` unless a value is there already; return the one kept.

        Several nodes starting at once on one database agree on a single value this way.
        """
        try:
            with mapped_errors(self.url), self.engine.begin() as conn:
                conn.execute(insert(meta).values(name=name, value=value))
        except IntegrityError:
            pass
        kept = self.get_meta(name)
        if kept is None:  # pragma: no cover - deleted between the two statements
            raise StorageError(f"the setting {name!r} disappeared while it was being made")
        return kept

    def device_credentials(self, device_ids: Sequence[str]) -> dict[str, DeviceCredentials]:
        """Type and credential hashes of the given devices that exist."""
        if not device_ids:
            return {}
        q = select(
            devices.c.device_id,
            devices.c.type_id,
            devices.c.credential_hash,
            devices.c.previous_credential_hash,
            devices.c.previous_credential_expires_us,
        )
        found: dict[str, DeviceCredentials] = {}
        with mapped_errors(self.url), self.engine.connect() as conn:
            for start in range(0, len(device_ids), 500):
                chunk = list(device_ids[start : start + 500])
                for r in conn.execute(q.where(devices.c.device_id.in_(chunk))):
                    found[r.device_id] = DeviceCredentials(r[0], r[1], r[2], r[3], r[4])
        return found

    def revoke_credentials(self, device_id: str) -> None:
        """Remove every credential of a device: it cannot connect until given a new one."""
        with mapped_errors(self.url), self.engine.begin() as conn:
            done = conn.execute(
                update(devices)
                .where(devices.c.device_id == device_id)
                .values(
                    credential_hash=None, previous_credential_hash=None, previous_credential_expires_us=None
                )
            ).rowcount
        if not done:
            raise DeviceNotFoundError(device_id)

    def mark_all_offline(self) -> int:
        """At the start of an embedded broker nobody is connected, whatever the last run left."""
        with mapped_errors(self.url), self.engine.begin() as conn:
            return int(
                conn.execute(
                    update(devices).where(devices.c.status != "offline").values(status="offline")
                ).rowcount
            )

    # ---- commands --------------------------------------------------------------------------
    def add_command(self, record: CommandRecord, *, attempts: int = 5) -> CommandRecord:
        """Insert a command with the device's next ``seq`` (one more than its highest so far).

        Two nodes numbering the same device at once collide on the unique index; the loser
        numbers again.
        """
        row = _command_row(record)
        columns = [c for c in row if c != "seq"]
        next_seq = select(
            *(literal(row[c], type_=commands.c[c].type).label(c) for c in columns),
            (func.coalesce(func.max(commands.c.seq), 0) + 1).label("seq"),
        ).where(commands.c.device_id == record.device_id)
        for attempt in range(attempts):
            try:
                with mapped_errors(self.url), self.engine.begin() as conn:
                    # PostgreSQL: the device's row lock makes its senders take turns; SQLite has
                    # one writer, and INSERT ... SELECT reads the highest number under its lock.
                    conn.execute(
                        select(devices.c.device_id)
                        .where(devices.c.device_id == record.device_id)
                        .with_for_update()
                    )
                    conn.execute(insert(commands).from_select([*columns, "seq"], next_seq))
                    seq = conn.execute(
                        select(commands.c.seq).where(commands.c.command_id == record.command_id)
                    ).scalar_one()
                    return _replace_seq(record, int(seq))
            except IntegrityError:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def get_command(self, device_id: str, command_id: str) -> CommandRecord | None:
        with mapped_errors(self.url), self.engine.connect() as conn:
            row = conn.execute(
                select(commands).where(commands.c.command_id == command_id, commands.c.device_id == device_id)
            ).first()
        return _command(row) if row is not None else None

    def set_command_status(
        self, command_id: str, status: str, reason: str | None, at_us: int, *, only_from: str = "sent"
    ) -> bool:
        """Move a command from ``only_from`` to ``status``; False if it was not in ``only_from``."""
        with mapped_errors(self.url), self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(commands)
                    .where(commands.c.command_id == command_id, commands.c.status == only_from)
                    .values(status=status, reason=reason, updated_us=at_us)
                ).rowcount
            )

    # ---- security events -------------------------------------------------------------------
    def add_security_events(self, rows: Sequence[SecurityEvent]) -> None:
        if not rows:
            return
        with mapped_errors(self.url), self.engine.begin() as conn:
            conn.execute(insert(security_events), [_security_row(e) for e in rows])

    def list_security_events(
        self, limit: int = 100, kinds: Sequence[str] | None = None
    ) -> list[SecurityEvent]:
        """Newest first."""
        q = select(security_events).order_by(security_events.c.id.desc()).limit(limit)
        if kinds:
            q = q.where(security_events.c.kind.in_(list(kinds)))
        with mapped_errors(self.url), self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [SecurityEvent(r.at_us, r.kind, r.subject, _json_object(r.detail), id=r.id) for r in rows]


def _json_object(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _security_row(e: SecurityEvent) -> dict[str, Any]:
    return {
        "at_us": e.at_us,
        "kind": e.kind[:32],
        "subject": e.subject[:128],
        "detail": json.dumps(dict(e.detail), separators=(",", ":"), default=str)[:4000],
    }


def _command_row(c: CommandRecord) -> dict[str, Any]:
    return {
        "command_id": c.command_id,
        "device_id": c.device_id,
        "type_id": c.type_id,
        "command": c.command,
        "seq": c.seq,
        "status": c.status,
        "reason": c.reason,
        "payload_sha256": c.payload_sha256,
        "issued_us": c.issued_us,
        "expires_us": c.expires_us,
        "updated_us": c.updated_us,
        "sent_by": c.sent_by[:128],
    }


def _replace_seq(c: CommandRecord, seq: int) -> CommandRecord:
    return CommandRecord(
        c.command_id,
        c.device_id,
        c.type_id,
        c.command,
        seq,
        c.status,
        c.reason,
        c.payload_sha256,
        c.issued_us,
        c.expires_us,
        c.updated_us,
        c.sent_by,
    )


def _command(row: Row[Any]) -> CommandRecord:
    return CommandRecord(
        row.command_id,
        row.device_id,
        row.type_id,
        row.command,
        int(row.seq),
        row.status,
        row.reason,
        row.payload_sha256,
        row.issued_us,
        row.expires_us,
        row.updated_us,
        row.sent_by,
    )


def _apply_command_acks(conn: Any, acks: Sequence[CommandAck]) -> None:
    """A device's answers: the first one decides a command's status; refusals are security events.

    Only the command's own device can answer it (the update is keyed by both ids). An answer
    that matches no waiting command — a replay the device refused, a forged command, a second
    answer — is recorded rather than applied.
    """
    notes: list[SecurityEvent] = []
    for ack in acks:
        matched = 0
        if ack.verified:
            matched = conn.execute(
                update(commands)
                .where(
                    commands.c.command_id == ack.command_id,
                    commands.c.device_id == ack.device_id,
                    commands.c.status == "sent",
                )
                .values(status=ack.status, reason=ack.reason, updated_us=ack.at_us)
            ).rowcount
        if ack.status != "acknowledged" or not matched:
            notes.append(
                SecurityEvent(
                    ack.at_us,
                    "command_ack_unmatched" if ack.status == "acknowledged" else "command_rejected",
                    ack.device_id,
                    {
                        "commandId": ack.command_id or None,
                        "reason": ack.reason,
                        "verified": ack.verified,
                        "matched": bool(matched),
                    },
                )
            )
    if notes:
        conn.execute(insert(security_events), [_security_row(e) for e in notes])
