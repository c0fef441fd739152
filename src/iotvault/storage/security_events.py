"""Security events (``security_events``): refusals and anomalies that administrators read.

Written by the broker side, ingest (unanswered or refused commands) and the identity provider;
read at ``GET /iotf/security/events``. ``detail`` is small JSON, never a payload or a secret.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import insert, select

from iotvault.storage.db import EngineStore
from iotvault.storage.repository import SecurityEvent
from iotvault.storage.schema import security_events


class SecurityEventTable(EngineStore):
    _security_listeners: tuple[Callable[[Sequence[SecurityEvent]], object], ...] = ()

    def on_security_events(self, listener: Callable[[Sequence[SecurityEvent]], object]) -> None:
        """Call ``listener`` with every batch once it is stored (the audit log: the composition
        registers it, so storage imports nothing above it)."""
        self._security_listeners = (*self._security_listeners, listener)

    def add_security_events(self, rows: Sequence[SecurityEvent]) -> None:
        if not rows:
            return
        with self.begin() as conn:
            conn.execute(insert(security_events), [security_row(e) for e in rows])
        for listener in self._security_listeners:
            listener(rows)

    def list_security_events(
        self, limit: int = 100, kinds: Sequence[str] | None = None
    ) -> list[SecurityEvent]:
        """Newest first."""
        q = select(security_events).order_by(security_events.c.id.desc()).limit(limit)
        if kinds:
            q = q.where(security_events.c.kind.in_(list(kinds)))
        with self.connect() as conn:
            rows = conn.execute(q).all()
        return [SecurityEvent(r.at_us, r.kind, r.subject, json_object(r.detail), id=r.id) for r in rows]


def json_object(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def security_row(e: SecurityEvent) -> dict[str, Any]:
    return {
        "at_us": e.at_us,
        "kind": e.kind[:32],
        "subject": e.subject[:128],
        "detail": json.dumps(dict(e.detail), separators=(",", ":"), default=str)[:4000],
    }
