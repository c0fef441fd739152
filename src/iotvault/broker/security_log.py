"""Security events from the broker (failed logins, denials), written in batches off the loop.

A broker under attack must not turn every refused packet into a database transaction on its
event loop: :meth:`SecurityEventLog.record` only appends to a bounded in-memory list, and a
background task writes what has accumulated once a second in one transaction, in a thread.
Past ``max_pending`` events between two writes the rest are counted, not kept, and the next
write adds one ``events_dropped`` event saying how many.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Any

from iotvault.clock import now_us
from iotvault.errors import IotVaultError
from iotvault.storage.repository import SecurityEvent
from iotvault.storage.sql import SqlStore

log = logging.getLogger(__name__)


class SecurityEventLog:
    def __init__(self, store: SqlStore, *, flush_s: float = 1.0, max_pending: int = 10_000) -> None:
        self._store = store
        self._flush_s = flush_s
        self._max_pending = max_pending
        self._pending: list[SecurityEvent] = []
        self._dropped = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.recorded = 0

    def record(self, kind: str, subject: str, **detail: Any) -> None:
        """Note an event; never blocks, never raises."""
        if len(self._pending) >= self._max_pending:
            self._dropped += 1
            return
        self._pending.append(SecurityEvent(now_us(), kind, subject or "-", detail))
        self.recorded += 1

    async def flush(self) -> None:
        rows, self._pending = self._pending, []
        if self._dropped:
            rows.append(SecurityEvent(now_us(), "events_dropped", "broker", {"count": self._dropped}))
            self._dropped = 0
        if not rows:
            return
        try:
            await asyncio.to_thread(self._store.add_security_events, rows)
        except IotVaultError as exc:
            log.warning("%d security events could not be written: %s", len(rows), exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            await self.flush()

    async def __aenter__(self) -> SecurityEventLog:
        self._task = asyncio.create_task(self._run(), name="iotvault-security-events")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
