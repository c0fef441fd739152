"""The web application's sessions in the shared database (:mod:`iotvault.web.session` decides).

Rows hold only what :mod:`iotvault.crypto.cookie_seal` sealed, under a name derived from the
cookie; times are wall-clock microseconds so that every node agrees. Each kind is bounded:
adding a row first deletes the expired ones and, at the bound, those nearest their expiry.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, insert, select, update

from iotvault.storage.db import EngineStore
from iotvault.storage.schema import web_sessions as t


@dataclass(frozen=True, slots=True)
class SealedRow:
    created_us: int
    used_us: int
    version: int
    refreshing_until_us: int
    sealed: bytes


class WebSessionTable(EngineStore):
    def add(self, row_id: str, kind: str, *, now_us: int, expires_us: int, sealed: bytes, bound: int) -> None:
        with self.begin() as conn:
            conn.execute(delete(t).where(t.c.kind == kind, t.c.expires_us <= now_us))
            count = conn.execute(select(func.count()).select_from(t).where(t.c.kind == kind)).scalar_one()
            if count >= bound:  # the bound holds: those nearest their end go first
                oldest = (
                    select(t.c.id).where(t.c.kind == kind).order_by(t.c.expires_us).limit(count - bound + 1)
                )
                conn.execute(delete(t).where(t.c.id.in_(oldest.scalar_subquery())))
            conn.execute(
                insert(t).values(
                    id=row_id,
                    kind=kind,
                    created_us=now_us,
                    used_us=now_us,
                    expires_us=expires_us,
                    version=0,
                    refreshing_until_us=0,
                    sealed=sealed,
                )
            )

    def get(self, row_id: str, kind: str, *, now_us: int) -> SealedRow | None:
        row = self.first(
            select(t.c.created_us, t.c.used_us, t.c.version, t.c.refreshing_until_us, t.c.sealed).where(
                t.c.id == row_id, t.c.kind == kind, t.c.expires_us > now_us
            )
        )
        if row is None:
            return None
        return SealedRow(row.created_us, row.used_us, row.version, row.refreshing_until_us, bytes(row.sealed))

    def touch(self, row_id: str, *, used_us: int, expires_us: int) -> None:
        with self.begin() as conn:
            conn.execute(update(t).where(t.c.id == row_id).values(used_us=used_us, expires_us=expires_us))

    def claim(self, row_id: str, version: int, *, now_us: int, until_us: int) -> bool:
        """Whether this caller may refresh the session (no one else is, and nothing changed)."""
        with self.begin() as conn:
            claimed = conn.execute(
                update(t)
                .where(t.c.id == row_id, t.c.version == version, t.c.refreshing_until_us <= now_us)
                .values(refreshing_until_us=until_us)
            )
            return bool(claimed.rowcount)

    def replace(self, row_id: str, version: int, sealed: bytes) -> bool:
        """Store the refreshed session, if it is still the version that was claimed."""
        with self.begin() as conn:
            done = conn.execute(
                update(t)
                .where(t.c.id == row_id, t.c.version == version)
                .values(sealed=sealed, version=version + 1, refreshing_until_us=0)
            )
            return bool(done.rowcount)

    def remove(self, row_id: str, kind: str) -> bool:
        """Delete the row; whether this call was the one that did (a pending login is used once)."""
        with self.begin() as conn:
            return bool(conn.execute(delete(t).where(t.c.id == row_id, t.c.kind == kind)).rowcount)

    def count(self, kind: str) -> int:
        with self.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(t).where(t.c.kind == kind)).scalar_one())
