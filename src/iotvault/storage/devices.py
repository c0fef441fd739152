"""The device registry: devices, their credentials (hashes) and their wrapped data keys."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from iotvault.errors import DeviceExistsError, DeviceNotFoundError
from iotvault.storage.db import EngineStore
from iotvault.storage.repository import DeviceCredentials, DeviceRecord
from iotvault.storage.schema import device_keys, device_types, devices, events, group_devices

_DEVICE_BY_ID = select(devices).where(devices.c.device_id == bindparam("b_device"))
# built once: ingest asks for every sending device's current key once per key_cache_ttl_s, and
# building the statement cost more than running it (BENCHMARKS.md, issue 17 ingest round)
_LATEST_KEY = (
    select(device_keys.c.version, device_keys.c.wrapped)
    .where(device_keys.c.device_id == bindparam("b_device"))
    .order_by(device_keys.c.version.desc())
    .limit(1)
)

# many devices' current keys at once (ingest's refresh of a batch's devices, KeyRing.refresh_sealing_keys)
_NEWEST_VERSIONS = (
    select(device_keys.c.device_id, func.max(device_keys.c.version).label("version"))
    .where(device_keys.c.device_id.in_(bindparam("b_devices", expanding=True)))
    .group_by(device_keys.c.device_id)
    .subquery()
)
_LATEST_KEYS = select(device_keys.c.device_id, device_keys.c.version, device_keys.c.wrapped).join(
    _NEWEST_VERSIONS,
    (device_keys.c.device_id == _NEWEST_VERSIONS.c.device_id)
    & (device_keys.c.version == _NEWEST_VERSIONS.c.version),
)
_DEVICE_TYPES = select(devices.c.device_id, devices.c.type_id).where(
    devices.c.device_id.in_(bindparam("b_devices", expanding=True))
)
BULK_READ = 500  # device ids per statement of a bulk read


def _chunks(device_ids: Sequence[str]) -> list[list[str]]:
    ids = list(device_ids)
    return [ids[i : i + BULK_READ] for i in range(0, len(ids), BULK_READ)]


def _device(row: Row[Any]) -> DeviceRecord:
    return DeviceRecord(
        device_id=row.device_id,
        type_id=row.type_id,
        status=row.status,
        last_seen_us=row.last_seen_us,
        metadata=json.loads(row.metadata or "{}"),
        created_us=row.created_us,
        command_delivery=row.command_delivery,
    )


class DeviceTable(EngineStore):
    """Implements :class:`~iotvault.storage.repository.DeviceStore` and the key ring's
    :class:`~iotvault.crypto.keyring.KeyStore`."""

    def add_device(self, device: DeviceRecord, *, wrapped_key: bytes, credential_hash: str | None) -> None:
        try:
            with self.begin() as conn:
                conn.execute(
                    insert(devices).values(
                        device_id=device.device_id,
                        type_id=device.type_id,
                        status=device.status,
                        last_seen_us=device.last_seen_us,
                        metadata=json.dumps(dict(device.metadata), separators=(",", ":")),
                        credential_hash=credential_hash,
                        created_us=device.created_us,
                        command_delivery=device.command_delivery,
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
        with self.connect() as conn:
            row = conn.execute(_DEVICE_BY_ID, {"b_device": device_id}).first()
        return _device(row) if row is not None else None

    def list_devices(self) -> list[DeviceRecord]:
        with self.connect() as conn:
            rows = conn.execute(select(devices).order_by(devices.c.device_id)).all()
        return [_device(r) for r in rows]

    def device_ids(self) -> list[str]:
        with self.connect() as conn:
            return list(conn.execute(select(devices.c.device_id).order_by(devices.c.device_id)).scalars())

    def delete_device(self, device_id: str) -> bool:
        """Delete a device, its events and its data keys (crypto-shredding) in one transaction.

        Its group grants go too, so that a later device of the same id inherits none of them.
        """
        with self.begin() as conn:
            conn.execute(delete(group_devices).where(group_devices.c.device_id == device_id))
            conn.execute(delete(device_keys).where(device_keys.c.device_id == device_id))
            conn.execute(delete(events).where(events.c.device_id == device_id))
            return bool(conn.execute(delete(devices).where(devices.c.device_id == device_id)).rowcount)

    def set_command_delivery(self, device_id: str, delivery: str) -> str:
        """Set how commands reach a device; return the previous setting (for the audit record)."""
        with self.begin() as conn:
            before = conn.execute(
                select(devices.c.command_delivery).where(devices.c.device_id == device_id)
            ).scalar_one_or_none()
            if before is None:
                raise DeviceNotFoundError(device_id)
            conn.execute(
                update(devices).where(devices.c.device_id == device_id).values(command_delivery=delivery)
            )
        return str(before)

    def type_command_delivery(self, type_id: str) -> str | None:
        """The command delivery a type's new devices get, if one was set for the type."""
        with self.connect() as conn:
            return conn.execute(
                select(device_types.c.command_delivery).where(device_types.c.type_id == type_id)
            ).scalar_one_or_none()

    def set_type_command_delivery(self, type_id: str, delivery: str) -> list[str]:
        """Set a type's command delivery, for its new devices and its registered ones; return the
        ids of the devices whose setting changed."""
        with self.begin() as conn:
            conn.execute(delete(device_types).where(device_types.c.type_id == type_id))
            conn.execute(insert(device_types).values(type_id=type_id, command_delivery=delivery))
            changed = list(
                conn.execute(
                    select(devices.c.device_id)
                    .where(devices.c.type_id == type_id, devices.c.command_delivery != delivery)
                    .order_by(devices.c.device_id)
                ).scalars()
            )
            conn.execute(
                update(devices)
                .where(devices.c.type_id == type_id, devices.c.command_delivery != delivery)
                .values(command_delivery=delivery)
            )
        return changed

    def credential_hashes(self, device_id: str) -> tuple[str | None, str | None, int | None]:
        with self.connect() as conn:
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
        with self.begin() as conn:
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
        with self.connect() as conn:
            rows = conn.execute(
                select(device_keys.c.version, device_keys.c.wrapped).where(
                    device_keys.c.device_id == device_id
                )
            ).all()
        return {r.version: bytes(r.wrapped) for r in rows}

    def latest_data_key(self, device_id: str) -> tuple[int, bytes] | None:
        with self.connect() as conn:
            row = conn.execute(_LATEST_KEY, {"b_device": device_id}).first()
        return (row.version, bytes(row.wrapped)) if row is not None else None

    def latest_data_keys(self, device_ids: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        """:meth:`latest_data_key` of many devices in one read (those without a key are absent)."""
        found: dict[str, tuple[int, bytes]] = {}
        with self.connect() as conn:
            for chunk in _chunks(device_ids):
                for row in conn.execute(_LATEST_KEYS, {"b_devices": chunk}):
                    found[row.device_id] = (row.version, bytes(row.wrapped))
        return found

    def types_of(self, device_ids: Sequence[str]) -> dict[str, str]:
        """The type of each of these devices that exists, in one read."""
        found: dict[str, str] = {}
        with self.connect() as conn:
            for chunk in _chunks(device_ids):
                for row in conn.execute(_DEVICE_TYPES, {"b_devices": chunk}):
                    found[row.device_id] = row.type_id
        return found

    def add_data_key(self, device_id: str, version: int, wrapped: bytes, created_us: int = 0) -> None:
        with self.begin() as conn:
            conn.execute(
                insert(device_keys).values(
                    device_id=device_id, version=version, wrapped=wrapped, created_us=created_us
                )
            )

    # ---- device security: credentials, status ----------------------------------------
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
        with self.connect() as conn:
            for chunk in _chunks(device_ids):
                for r in conn.execute(q.where(devices.c.device_id.in_(chunk))):
                    found[r.device_id] = DeviceCredentials(r[0], r[1], r[2], r[3], r[4])
        return found

    def revoke_credentials(self, device_id: str) -> None:
        """Remove every credential of a device: it cannot connect until given a new one."""
        with self.begin() as conn:
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
        with self.begin() as conn:
            return int(
                conn.execute(
                    update(devices).where(devices.c.status != "offline").values(status="offline")
                ).rowcount
            )
