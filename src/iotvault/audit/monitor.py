"""Turn what the node observes into stored alerts and webhook deliveries.

The monitor is the only stateful part of alerting: it feeds signals through the pure
:class:`~iotvault.audit.alerts.AlertEngine`, stores each alert once and hands it to the webhook.
Signals come from the audit records the node writes and from its security events; each node
runs its own engine, so an attack spread over several API nodes is counted per node (the
thresholds are per node), which SECURITY.md states.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from iotvault.audit.alerts import Alert, AlertEngine, Signal
from iotvault.audit.webhook import Webhook
from iotvault.domain.audit import AuditEntry, printable
from iotvault.errors import StorageError
from iotvault.storage.audit import AuditStore

__all__ = ["AlertMonitor", "printable", "signals_of"]

log = logging.getLogger(__name__)

# audit actions whose failure is a failed login of a person (the target is the account)
_LOGIN_ACTIONS = frozenset({"oidc.login_failed", "oidc.login_refused"})
# a device's refused publish or subscribe
_TOPIC_ACTIONS = frozenset({"device.publish", "device.subscribe"})


def signals_of(entry: AuditEntry) -> list[Signal]:
    """What an audit entry tells the alert rules (most entries tell them nothing).

    A security event that stands for several (a broker row with ``count``) counts as that many.
    """
    e, status = entry, entry.detail.get("status")
    kind, account, principal = "", "", e.actor
    if e.detail.get("revoked") is True:  # before the 401 below: a revoked credential that still works
        kind, principal = "revoked_use", str(e.detail.get("credential") or e.actor)
    elif e.action in _LOGIN_ACTIONS:
        kind, account = "login_failure", e.target
    elif e.action == "http.request" and status == 401:
        kind, account = "login_failure", f"http-credentials@{e.client}"  # per address: keys, tokens
    elif e.action == "device.login" and e.outcome in ("failure", "denied"):
        kind = "device_login_failure"
    elif e.action in _TOPIC_ACTIONS and e.outcome == "denied":
        kind = "topic_denied"
    elif e.outcome == "denied" and status in (403, 404):
        kind = "forbidden" if status == 403 else "not_found"
    elif e.action == "http.request" and e.detail.get("route", "").endswith("/commands") and status == 202:
        kind = "command"
    if not kind:
        return []
    device = e.target if kind in ("device_login_failure", "topic_denied") else ""
    repeats = e.detail.get("count")
    times = min(int(repeats), 1000) if isinstance(repeats, int) and repeats > 0 else 1
    signal = Signal(e.at_us, kind, account=account, address=e.client, device=device, principal=principal)
    return [signal] * times


class AlertMonitor:
    """Thread-safe: the API's worker threads and the event loop both observe."""

    def __init__(
        self,
        store: AuditStore,
        engine: AlertEngine | None = None,
        webhook: Webhook | None = None,
        on_alert: Callable[[Alert], object] | None = None,
    ) -> None:
        self._store = store
        self._engine = engine or AlertEngine()
        self._webhook = webhook
        self._on_alert = on_alert  # e.g. the alert counter of /metrics
        self._lock = threading.Lock()

    def observe_entry(self, entry: AuditEntry) -> list[Alert]:
        signals = signals_of(entry)  # none for most (every read's record passes here, on the loop)
        return self.observe(signals) if signals else []

    def observe(self, signals: Iterable[Signal]) -> list[Alert]:
        with self._lock:
            raised = [alert for s in signals for alert in self._engine.observe(s)]
        for alert in raised:
            self._raise(alert)
        return raised

    def _raise(self, alert: Alert) -> None:
        if self._on_alert is not None:
            self._on_alert(alert)
        delivery = "pending" if self._webhook is not None else "none"
        try:
            alert_id = self._store.add_alert(
                alert.at_us,
                kind=alert.kind.value,
                subject=alert.key,
                severity=alert.severity,
                count=alert.count,
                summary=alert.summary,
                delivery=delivery,
            )
        except StorageError as exc:
            log.warning("alert %s for %s could not be stored: %s", alert.kind.value, alert.key, exc)
            return
        log.warning("ALERT %s", printable(alert.summary))
        if self._webhook is not None:
            document = {
                "id": alert_id,
                "kind": alert.kind.value,
                "subject": alert.key,
                "severity": alert.severity,
                "count": alert.count,
                "at_us": alert.at_us,
                "summary": alert.summary,
            }
            if not self._webhook.submit(alert_id, document):
                self._store.set_alert_delivery(alert_id, "failed")
