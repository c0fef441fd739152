"""A handful of Prometheus counters and gauges, rendered in the text exposition format.

Written here rather than taken from ``prometheus_client``: iotvault exposes a dozen series from
one process, and a small registry keeps one dependency (and its global state) out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


def _escape(label_value: str) -> str:
    return label_value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(v: float) -> str:
    """Exact for whole numbers of any size (``{:g}`` would round 1234567 to 1.23457e+06)."""
    return str(int(v)) if v.is_integer() else repr(v)


class Counter:
    def __init__(self, name: str, help_text: str, label: str | None = None) -> None:
        self.name = name
        self.help = help_text
        self.label = label
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, label_value: str = "") -> None:
        with self._lock:
            self._values[label_value] = self._values.get(label_value, 0.0) + amount

    def value(self, label_value: str = "") -> float:
        return self._values.get(label_value, 0.0)

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items()) or [("", 0.0)]
        for lv, v in items:
            labels = f'{{{self.label}="{_escape(lv)}"}}' if self.label and lv else ""
            lines.append(f"{self.name}{labels} {_number(v)}")
        return "\n".join(lines)


class Gauge:
    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.name = name
        self.help = help_text
        self.read = read

    def render(self) -> str:
        value = _number(float(self.read()))
        return f"# HELP {self.name} {self.help}\n# TYPE {self.name} gauge\n{self.name} {value}"


class Metrics:
    def __init__(self) -> None:
        self.events_stored = Counter("iotvault_ingest_events_stored_total", "Events committed encrypted.")
        self.duplicates = Counter(
            "iotvault_ingest_duplicates_total", "Redelivered messages recognised and dropped."
        )
        self.rejected = Counter(
            "iotvault_ingest_rejected_total", "Messages not stored as data, by reason.", "reason"
        )
        self.status_updates = Counter(
            "iotvault_ingest_status_updates_total", "Device status messages applied."
        )
        self.batches = Counter("iotvault_ingest_batches_total", "Batches committed.")
        self.commit_failures = Counter(
            "iotvault_ingest_commit_failures_total", "Batch commits that failed and were retried."
        )
        self.authentications = Counter(
            "iotvault_http_authentications_total",
            "API authentications by outcome (success, failure, revoked, throttled, missing).",
            "outcome",
        )
        self.alerts = Counter("iotvault_alerts_total", "Alerts raised by this node, by kind.", "kind")
        self.gauges: list[Gauge] = []

    def render(self) -> str:
        parts = [
            c.render()
            for c in (
                self.events_stored,
                self.duplicates,
                self.rejected,
                self.status_updates,
                self.batches,
                self.commit_failures,
                self.authentications,
                self.alerts,
            )
        ]
        parts += [g.render() for g in self.gauges]
        return "\n".join(parts) + "\n"
