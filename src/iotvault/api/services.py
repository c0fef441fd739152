"""What the HTTP layer needs, built once per process and handed to :func:`create_app`."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from iotvault.api.ratelimit import RateLimiter
from iotvault.auth.tokens import TokenVerifier
from iotvault.config import Settings
from iotvault.context import Context
from iotvault.ingest.pipeline import Inbound, Outcome
from iotvault.metrics import Metrics


class EventNotifier:
    """Wakes live streams when this process commits events for a device.

    Streams also poll the database every few seconds, so events ingested by another node
    reach them too; this only makes the common single-node case immediate.
    """

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)

    def subscribe(self, device_id: str) -> asyncio.Event:
        ev = asyncio.Event()
        self._waiters[device_id].add(ev)
        return ev

    def unsubscribe(self, device_id: str, ev: asyncio.Event) -> None:
        waiters = self._waiters.get(device_id)
        if waiters is not None:
            waiters.discard(ev)
            if not waiters:
                del self._waiters[device_id]

    def notify(self, device_ids: set[str]) -> None:
        for d in device_ids:
            for ev in self._waiters.get(d, ()):
                ev.set()

    def wake_all(self) -> None:
        """Wake every stream (at shutdown: they see ``stopping`` at once, not at their next poll)."""
        self.notify(set(self._waiters))


@dataclass
class ApiServices:
    settings: Settings
    ctx: Context
    metrics: Metrics
    verifier: TokenVerifier | None = None
    limiter: RateLimiter | None = None
    notifier: EventNotifier = field(default_factory=EventNotifier)
    stream_poll_s: float = 2.0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # (kind, client address, detail) of an abusive HTTP client: a security event (node.py)
    on_abuse: Callable[[str, str, dict[str, Any]], None] | None = None
    # (kind, subject, detail): a security event about a device (SecurityEventLog.record)
    security_event: Callable[..., None] | None = None
    # the ingest pipeline's door for HTTP device messaging (IngestPipeline.enqueue), or None
    ingest: Callable[[Inbound], asyncio.Future[Outcome]] | None = None
