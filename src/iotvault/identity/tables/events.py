"""Identity events: logins and refusals, which the login throttle counts."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, insert, select

from iotvault.identity.records import IdentityEvent, from_row
from iotvault.storage.db import EngineStore
from iotvault.storage.schema import identity_events


class IdentityEventTable(EngineStore):
    """Identity events."""

    # ---- identity events ---------------------------------------------------------------
    def add_event(self, event: IdentityEvent) -> None:
        with self.begin() as conn:
            conn.execute(
                insert(identity_events).values(
                    at_us=event.at_us,
                    kind=event.kind,
                    user_name=event.user_name[:64] if event.user_name else None,
                    client_id=event.client_id[:64] if event.client_id else None,
                    address=event.address[:64] if event.address else None,
                    detail=event.detail[:256],
                )
            )

    def count_events(
        self, kind: str, since_us: int, *, user_name: str | None = None, address: str | None = None
    ) -> tuple[int, int | None]:
        """How many ``kind`` events since ``since_us`` for that user name or address, and the
        time of the latest."""
        q = select(func.count(), func.max(identity_events.c.at_us)).where(
            identity_events.c.kind == kind, identity_events.c.at_us >= since_us
        )
        if user_name is not None:
            q = q.where(identity_events.c.user_name == user_name[:64])
        if address is not None:
            q = q.where(identity_events.c.address == address[:64])
        with self.connect() as conn:
            count, latest = conn.execute(q).one()
        return int(count), latest

    def list_events(self, count: int, kinds: Sequence[str] = ()) -> list[IdentityEvent]:
        q = select(identity_events).order_by(identity_events.c.at_us.desc(), identity_events.c.id.desc())
        if kinds:
            q = q.where(identity_events.c.kind.in_(list(kinds)))
        with self.connect() as conn:
            rows = conn.execute(q.limit(count)).all()
        return [from_row(IdentityEvent, r) for r in rows]
