"""Device authorization (RFC 8628): device codes and the users' decisions."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select, update

from iotvault.identity.records import (
    DeviceCodeRecord,
    device_code_record,
)
from iotvault.storage.db import EngineStore
from iotvault.storage.schema import oidc_device_codes


class DeviceCodeTable(EngineStore):
    """Device codes."""

    # ---- device codes (RFC 8628) -------------------------------------------------------
    def add_device_code(self, record: DeviceCodeRecord, user_code_hash: str) -> None:
        with self.begin() as conn:
            conn.execute(
                insert(oidc_device_codes).values(
                    device_code_hash=record.device_code_hash,
                    user_code_hash=user_code_hash,
                    client_id=record.client_id,
                    scope=record.scope,
                    created_us=record.created_us,
                    expires_us=record.expires_us,
                    interval_s=record.interval_s,
                    status=record.status,
                )
            )

    def device_code(self, device_code_hash: str) -> DeviceCodeRecord | None:
        row = self.first(
            select(oidc_device_codes).where(oidc_device_codes.c.device_code_hash == device_code_hash)
        )
        return device_code_record(row) if row is not None else None

    def device_code_by_user_code(self, user_code_hash: str) -> DeviceCodeRecord | None:
        row = self.first(
            select(oidc_device_codes).where(oidc_device_codes.c.user_code_hash == user_code_hash)
        )
        return device_code_record(row) if row is not None else None

    def decide_device_code(
        self,
        device_code_hash: str,
        *,
        approved: bool,
        user_name: str,
        user_stamp: int,
        auth_time_us: int,
    ) -> bool:
        """Approve or deny a pending device code; False if it was no longer pending."""
        values: dict[str, Any] = {"status": "approved" if approved else "denied"}
        if approved:
            values.update(user_name=user_name, user_stamp=user_stamp, auth_time_us=auth_time_us)
        with self.begin() as conn:
            return bool(
                conn.execute(
                    update(oidc_device_codes)
                    .where(
                        oidc_device_codes.c.device_code_hash == device_code_hash,
                        oidc_device_codes.c.status == "pending",
                    )
                    .values(values)
                ).rowcount
            )

    def poll_device_code(self, device_code_hash: str, at_us: int, *, slow_down: bool) -> None:
        """Record a poll; ``slow_down`` also adds 5 seconds to the interval (RFC 8628, 3.5)."""
        values: dict[str, Any] = {"last_poll_us": at_us}
        if slow_down:
            values["interval_s"] = oidc_device_codes.c.interval_s + 5
        with self.begin() as conn:
            conn.execute(
                update(oidc_device_codes)
                .where(oidc_device_codes.c.device_code_hash == device_code_hash)
                .values(values)
            )

    def consume_device_code(self, device_code_hash: str) -> bool:
        """Spend an approved device code; False if another poll already did."""
        with self.begin() as conn:
            return bool(
                conn.execute(
                    update(oidc_device_codes)
                    .where(
                        oidc_device_codes.c.device_code_hash == device_code_hash,
                        oidc_device_codes.c.status == "approved",
                    )
                    .values(status="consumed")
                ).rowcount
            )
