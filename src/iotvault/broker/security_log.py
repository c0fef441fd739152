"""Security events from the broker (failed logins, denials), aggregated and written off the loop.

A broker under attack must not turn every refused packet into a database row, nor a flood into
so many rows that the real events drop out of view:

- :meth:`SecurityEventLog.record` only touches memory. The first event of a kind for one
  subject (device or client id) from one address (the host, not the port) with the same
  action, reason and topic in a window (``window_s``, default 60 s) is written at the next
  flush (once a second); identical ones after it in the same window are only counted, and
  when the window closes one more row with ``"count": n`` and ``"repeated": true`` says how
  many there were. So a device in a reconnect loop adds at most two rows a minute, and
  20,000 refused logins of one client add two.
- At most ``max_keys`` distinct (kind, subject, address) per window are tracked; past that,
  events are folded per (kind, address) with the subject ``*``, and past ``max_keys`` of
  those they are counted in one ``events_dropped`` row. A window therefore writes at most
  about ``4 x max_keys`` rows whatever an attacker sends.
- Rows older than ``retention_days`` are deleted once an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

from sqlalchemy import delete

from iotvault.clock import now_us
from iotvault.errors import IotVaultError
from iotvault.storage.db import mapped_errors
from iotvault.storage.repository import SecurityEvent
from iotvault.storage.schema import security_events
from iotvault.storage.sql import SqlStore

log = logging.getLogger(__name__)

_PRUNE_EVERY_S: Final = 3600.0
_DAY_US: Final = 86_400 * 1_000_000


def _host(address: object) -> str:
    """``1.2.3.4:5678`` -> ``1.2.3.4``; ``[::1]:5`` and ``::1:5`` -> ``::1``; anything else as it is."""
    text = str(address)
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    host, sep, port = text.rpartition(":")
    return host if sep and port.isdigit() else text


@dataclass(slots=True)
class _Seen:
    kind: str
    subject: str
    detail: dict[str, Any]
    first_us: int
    repeats: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class SecurityEventLog:
    def __init__(
        self,
        store: SqlStore,
        *,
        flush_s: float = 1.0,
        window_s: float = 60.0,
        max_keys: int = 1_000,
        retention_days: int = 90,
        clock_us: Any = now_us,
    ) -> None:
        self._store = store
        self._flush_s = flush_s
        self._window_us = int(window_s * 1_000_000)
        self._max_keys = max_keys
        self._retention_us = retention_days * _DAY_US
        self._clock_us = clock_us
        self._pending: list[SecurityEvent] = []
        self._seen: dict[tuple[str, str, str, str], _Seen] = {}
        self._folded_keys = 0
        self._window_start = clock_us()
        self._dropped = 0
        self._task: asyncio.Task[None] | None = None
        self._pruned_at = 0.0
        self.recorded = 0

    def record(self, kind: str, subject: str, **detail: Any) -> None:
        """Note an event; never blocks, never raises."""
        now = self._clock_us()
        if now - self._window_start >= self._window_us:
            self._close_window(now)
        subject = subject or "-"
        host = _host(detail.get("address", "-"))
        reason = "/".join(str(detail.get(k, "")) for k in ("action", "reason", "topic"))
        key = (kind, subject, host, reason)
        seen = self._seen.get(key)
        if seen is None and len(self._seen) >= self._max_keys:
            key = (kind, "*", host, reason)  # folded: many subjects from one address
            seen = self._seen.get(key)
            if seen is None:
                if self._folded_keys >= self._max_keys:
                    self._dropped += 1
                    return
                self._folded_keys += 1
                detail = {k: detail[k] for k in ("action", "reason", "topic") if k in detail}
                detail.update(address=host, folded=True)
                subject = "*"
        if seen is not None:
            seen.repeats += 1
            return
        self._seen[key] = _Seen(kind, subject, dict(detail), now)
        self._pending.append(SecurityEvent(now, kind, subject, detail))
        self.recorded += 1

    def _close_window(self, now: int) -> None:
        """One row per key that repeated in the window that ends now; then a new window."""
        for seen in self._seen.values():
            if seen.repeats:
                detail = {**seen.detail, "count": seen.repeats, "repeated": True,
                          "window_s": self._window_us // 1_000_000}  # fmt: skip
                self._pending.append(SecurityEvent(now, seen.kind, seen.subject, detail))
        self._seen.clear()
        self._folded_keys = 0
        self._window_start = now

    async def flush(self, *, final: bool = False) -> None:
        if final:
            self._close_window(self._clock_us())
        rows, self._pending = self._pending, []
        if self._dropped:
            rows.append(SecurityEvent(self._clock_us(), "events_dropped", "broker", {"count": self._dropped}))
            self._dropped = 0
        if not rows:
            return
        try:
            await asyncio.to_thread(self._store.add_security_events, rows)
        except IotVaultError as exc:
            log.warning("%d security events could not be written: %s", len(rows), exc)

    async def prune(self) -> int:
        """Delete security events older than the retention; how many were deleted."""
        before = self._clock_us() - self._retention_us
        try:
            return await asyncio.to_thread(_delete_before, self._store, before)
        except IotVaultError as exc:
            log.warning("old security events could not be deleted: %s", exc)
            return 0

    async def _run(self) -> None:
        while True:
            if time.monotonic() - self._pruned_at >= _PRUNE_EVERY_S:
                self._pruned_at = time.monotonic()
                await self.prune()
            await asyncio.sleep(self._flush_s)
            now = self._clock_us()
            if now - self._window_start >= self._window_us:
                self._close_window(now)
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
        await self.flush(final=True)


def _delete_before(store: SqlStore, before_us: int) -> int:
    """The one statement of security-event retention (the table belongs to this log)."""
    with mapped_errors(store.url), store.engine.begin() as conn:
        return int(conn.execute(delete(security_events).where(security_events.c.at_us < before_us)).rowcount)
