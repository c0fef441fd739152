"""Deliver alerts to a webhook: signed bodies, retries with backoff, never in anyone's way.

The body is JSON; the headers carry ``X-Iotvault-Timestamp`` (Unix seconds) and
``X-Iotvault-Signature: sha256=<hex>``, an HMAC-SHA256 with the configured secret over
``<timestamp>.<body>`` — the scheme Stripe and GitHub use, so receivers have code for it — and
a receiver should refuse a timestamp older than a few minutes (replays).

Delivery runs on its own asyncio task with a bounded queue: the API and ingest only ever call
:meth:`Webhook.submit`, which never waits; a full queue (a receiver that has been down for a long
time) drops the newest alert's delivery, and the alert itself is still stored and listed at
``GET /iotf/alerts`` with its delivery state.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = ["Webhook", "WebhookSettings", "signature"]

log = logging.getLogger(__name__)


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The value of ``X-Iotvault-Signature`` for ``body`` sent at ``timestamp``."""
    return "sha256=" + hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    url: str
    secret: bytes
    attempts: int = 6
    first_delay: float = 1.0
    max_delay: float = 60.0
    timeout: float = 10.0
    queue_size: int = 1000


Outcome = Callable[[int, str], None]  # (alert id, "delivered" | "failed")


class Webhook:
    """One receiver; ``async with`` runs the delivery task."""

    def __init__(self, settings: WebhookSettings, on_outcome: Outcome | None = None) -> None:
        self._settings = settings
        self._queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue(settings.queue_size)
        self._on_outcome = on_outcome
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    async def __aenter__(self) -> Webhook:
        self._task = asyncio.create_task(self._deliver_all(), name="alert-webhook")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def submit(self, alert_id: int, document: Mapping[str, Any]) -> bool:
        """Queue ``document`` for delivery; False (and counted) when the queue is full."""
        body = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        try:
            self._queue.put_nowait((alert_id, body))
        except asyncio.QueueFull:
            self.dropped += 1
            return False
        return True

    async def _deliver_all(self) -> None:
        async with httpx.AsyncClient(timeout=self._settings.timeout, follow_redirects=False) as client:
            while True:
                alert_id, body = await self._queue.get()
                delivered = await self._deliver(client, body)
                if self._on_outcome is not None:
                    self._on_outcome(alert_id, "delivered" if delivered else "failed")

    async def _deliver(self, client: httpx.AsyncClient, body: bytes) -> bool:
        s = self._settings
        delay = s.first_delay
        for attempt in range(1, s.attempts + 1):
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "X-Iotvault-Timestamp": str(timestamp),
                "X-Iotvault-Signature": signature(s.secret, timestamp, body),
            }
            try:
                response = await client.post(s.url, content=body, headers=headers)
                if 200 <= response.status_code < 300:
                    return True
                reason = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                reason = type(exc).__name__
            log.warning("alert webhook: attempt %d of %d failed (%s)", attempt, s.attempts, reason)
            if attempt < s.attempts:
                await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not a secret
                delay = min(delay * 2, s.max_delay)
        return False
