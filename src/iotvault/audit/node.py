"""The audit log's part in a running node: the writer (a thread and its process), alerts, the
webhook, retention, and the record of the settings the node started with.

Entered by :class:`iotvault.node.Node` right after the resources are open, so that everything
the node does afterwards — broker denials, logins, requests — lands on the chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

from iotvault.audit.alerts import Alert
from iotvault.audit.appender import ProcessAppender
from iotvault.audit.log import AuditLog
from iotvault.audit.monitor import AlertMonitor
from iotvault.audit.webhook import Webhook, WebhookSettings
from iotvault.clock import now_us
from iotvault.config import Settings
from iotvault.domain.audit import AuditEntry
from iotvault.errors import StorageError
from iotvault.metrics import Gauge, Metrics
from iotvault.storage.audit import AuditStore

__all__ = ["AuditService", "settings_summary"]

log = logging.getLogger(__name__)

_DAY_US: Final = 86_400 * 1_000_000
_RETENTION_EVERY_S: Final = 3600.0
# settings that may hold a credential (in a URL or by themselves): named in the record, never shown
_SECRET_SETTINGS: Final = frozenset(
    {
        "database_url",
        "broker_url",
        "redis_url",
        "broker_admin_password",
        "alert_webhook_secret",
        "alert_webhook_url",
    }
)


def settings_summary(settings: Settings) -> dict[str, Any]:
    """The settings a node started with, for its audit record: values that cannot hold a
    secret as they are, the others only as "set" or "unset"."""
    summary: dict[str, Any] = {}
    for name in sorted(type(settings).model_fields):
        value = getattr(settings, name)
        if name in _SECRET_SETTINGS:
            shown = value.get_secret_value() if hasattr(value, "get_secret_value") else value
            summary[name] = "set" if shown else "unset"
        elif isinstance(value, str | int | float | bool) or value is None:
            summary[name] = value
    return summary


class AuditService:
    """``async with AuditService(audit, store, settings, role)``: the node's audit machinery."""

    def __init__(
        self,
        audit: AuditLog,
        store: AuditStore,
        settings: Settings,
        role: str,
        metrics: Metrics | None = None,
    ) -> None:
        self._audit = audit
        self._metrics = metrics
        self._store = store
        self._settings = settings
        self._role = role
        self._webhook: Webhook | None = None
        self._retention: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AuditService:
        s = self._settings
        if s.alert_webhook_url:
            secret = s.alert_webhook_secret.get_secret_value().encode()
            self._webhook = await Webhook(
                WebhookSettings(s.alert_webhook_url, secret), on_outcome=self._delivered
            ).__aenter__()
        on_alert: Callable[[Alert], None] | None = None
        if self._metrics is not None:
            counter, audit = self._metrics.alerts, self._audit

            def on_alert(alert: Alert) -> None:
                counter.inc(label_value=alert.kind.value)

            self._metrics.gauges += [
                Gauge(
                    "iotvault_audit_queue_depth",
                    "Audit entries queued, not yet written.",
                    lambda: audit.queue_depth,
                ),
                Gauge(
                    "iotvault_audit_write_lag_seconds",
                    "How long the oldest audit entry not yet written has waited.",
                    lambda: audit.write_lag_s,
                ),
            ]
        monitor = AlertMonitor(self._store, webhook=self._webhook, on_alert=on_alert)
        self._audit.observers.append(monitor.observe_entry)
        self._audit.start(
            ProcessAppender(
                s.effective_database_url, sqlite_synchronous=s.sqlite_synchronous, log_format=s.log_format
            )
            if s.audit_writer == "process"
            else None
        )
        self._audit.record(
            AuditEntry(now_us(), "system", "node.start", self._role, "success", detail=settings_summary(s))
        )
        if s.audit_retention_days:
            self._retention = asyncio.create_task(self._prune_forever(), name="audit-retention")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
        self._audit.record(AuditEntry(now_us(), "system", "node.stop", self._role, "success"))
        await asyncio.to_thread(self._audit.close)
        if self._webhook is not None:
            await self._webhook.__aexit__(et, exc, tb)

    def _delivered(self, alert_id: int, outcome: str) -> None:
        try:
            self._store.set_alert_delivery(alert_id, outcome)
        except StorageError as exc:
            log.warning("alert %d: could not record its delivery: %s", alert_id, exc)

    async def _prune_forever(self) -> None:
        keep_us = self._settings.audit_retention_days * _DAY_US
        while True:
            try:
                first = await asyncio.to_thread(self._oldest_to_keep, now_us() - keep_us)
                if first is not None:
                    pruned = await asyncio.to_thread(self._audit.prune_before, first)
                    if pruned:
                        log.info("audit: %d records older than %d days pruned behind a signed checkpoint",
                                 pruned, self._settings.audit_retention_days)  # fmt: skip
            except StorageError as exc:
                log.warning("audit retention: %s", exc)
            await asyncio.sleep(_RETENTION_EVERY_S)

    def _oldest_to_keep(self, cutoff_us: int) -> int | None:
        """The seq of the first record at or after ``cutoff_us`` (None: nothing to prune)."""
        oldest = self._store.oldest()
        if oldest is None or oldest.entry.at_us >= cutoff_us:
            return None
        for record in self._store.records(from_seq=oldest.seq):
            if record.entry.at_us >= cutoff_us:
                return record.seq
        return None
