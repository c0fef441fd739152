"""The repository for SQLite and PostgreSQL, written once in SQLAlchemy Core.

Core rather than the ORM: the ingest path inserts hundreds of rows per transaction and the ORM's
unit of work would cost more than the encryption. Every statement is parameterised.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Engine, Row
from sqlalchemy.exc import IntegrityError

from iotvault.errors import DeviceExistsError, DeviceNotFoundError
from iotvault.storage.db import mapped_errors, redact
from iotvault.storage.repository import (
    BatchWrite,
    DeviceRecord,
    InflightRecord,
    RejectedMessage,
    StoredEvent,
)
from iotvault.storage.schema import (
    device_keys,
    devices,
    events,
    group_devices,
    ingest_inflight,
    meta,
    rejected_messages,
)


def event_id_bound(unix_us: int, *, upper: bool) -> str:
    """The smallest (or largest) UUIDv7 of the millisecond holding ``unix_us``.

    Lets a time-range query run on the ``(device_id, event_id)`` primary key.
    """
    ms = max(0, unix_us // 1000) & ((1 << 48) - 1)
    low_bits = (1 << 80) - 1 if upper else 0
    return str(uuid.UUID(int=(ms << 80) | low_bits))


def _event(row: Row[Any]) -> StoredEvent:
    return StoredEvent(
        device_id=row.device_id,
        event_id=row.event_id,
        type_id=row.type_id,
        event_type=row.event_type,
        fmt=row.format,
        received_us=row.received_us,
        payload=bytes(row.payload),
    )


def _device(row: Row[Any]) -> DeviceRecord:
    return DeviceRecord(
        device_id=row.device_id,
        type_id=row.type_id,
        status=row.status,
        last_seen_us=row.last_seen_us,
        metadata=json.loads(row.metadata or "{}"),
        created_us=row.created_us,
    )


_EVENT_INSERT = insert(events)
_REJECT_INSERT = insert(rejected_messages)
_INFLIGHT_INSERT = insert(ingest_inflight)
_STATUS_UPDATE = (
    update(devices)
    .where(devices.c.device_id == bindparam("b_device"))
    .values(status=bindparam("b_status"), last_seen_us=bindparam("b_at"))
)


class SqlStore:
    """Implements DeviceStore, KeyStore and EventStore on one SQLAlchemy engine."""

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = redact(url)

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
            row = conn.execute(select(devices).where(devices.c.device_id == device_id)).first()
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
                conn.execute(
                    _EVENT_INSERT,
                    [
                        {
                            "device_id": e.device_id,
                            "event_id": e.event_id,
                            "type_id": e.type_id,
                            "event_type": e.event_type,
                            "format": e.fmt,
                            "received_us": e.received_us,
                            "payload": e.payload,
                        }
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
        q = select(events).where(events.c.device_id == device_id)
        if before is not None:
            q = q.where(events.c.event_id < before)
        if after is not None:
            q = q.where(events.c.event_id > after)
        if since_us is not None:
            q = q.where(
                events.c.event_id >= event_id_bound(since_us, upper=False), events.c.received_us >= since_us
            )
        if until_us is not None:
            q = q.where(
                events.c.event_id <= event_id_bound(until_us, upper=True), events.c.received_us <= until_us
            )
        order = events.c.event_id.asc() if after is not None else events.c.event_id.desc()
        with mapped_errors(self.url), self.engine.connect() as conn:
            rows = conn.execute(q.order_by(order).limit(count)).all()
        return [_event(r) for r in rows]

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
