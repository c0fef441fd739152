"""A handful of Prometheus counters and gauges, rendered in the text exposition format.

Written here rather than taken from ``prometheus_client``: iotvault exposes a dozen series from
one process, and a small registry keeps one dependency (and its global state) out.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


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

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)

    def render(self, plus: Mapping[str, float] | None = None) -> str:
        """The counter, with ``plus`` (another process's :meth:`snapshot`) added to its values."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            values = dict(self._values)
        for lv, v in (plus or {}).items():
            if isinstance(v, int | float):  # what another version or a damaged file holds: skipped
                values[lv] = values.get(lv, 0.0) + float(v)
        items = sorted(values.items()) or [("", 0.0)]
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


LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Observations in cumulative buckets, per value of up to two labels (Prometheus histogram).

    The label values must come from a small set (route templates, not raw paths): each value
    pair keeps ``len(buckets) + 3`` numbers for the life of the process.
    """

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: tuple[str, ...] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS_S,
    ) -> None:
        self.name = name
        self.help = help_text
        self.labels = labels
        self.buckets = tuple(buckets)
        # per label values: one count per bucket, then past every bound, the count, the sum
        self._series: dict[tuple[str, ...], list[float]] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, *label_values: str) -> None:
        i = bisect.bisect_left(self.buckets, value)  # the first bucket whose bound >= value
        with self._lock:
            s = self._series.get(label_values)
            if s is None:
                s = self._series[label_values] = [0.0] * (len(self.buckets) + 3)
            s[i] += 1
            s[-2] += 1
            s[-1] += value

    def count(self, *label_values: str) -> int:
        s = self._series.get(label_values)
        return int(s[-2]) if s is not None else 0

    def snapshot(self) -> dict[str, list[float]]:
        """The series by their label values joined with a newline (which label values escape)."""
        with self._lock:
            return {"\n".join(k): list(v) for k, v in self._series.items()}

    def render(self, plus: Mapping[str, Sequence[float]] | None = None) -> str:
        """The histogram, with ``plus`` (another process's :meth:`snapshot`) added to its series."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            merged = {k: list(v) for k, v in self._series.items()}
        width = len(self.buckets) + 3
        for key, other in (plus or {}).items():
            values = tuple(key.split("\n")) if self.labels else ()
            if (
                len(values) != len(self.labels)
                or not isinstance(other, list)
                or len(other) != width
                or not all(isinstance(n, int | float) for n in other)
            ):
                continue  # not a series of this histogram (another version's buckets, a damaged file)
            mine = merged.setdefault(values, [0.0] * width)
            for i, n in enumerate(other):
                mine[i] += float(n)
        series = sorted(merged.items())
        for values, s in series:
            pairs = [f'{n}="{_escape(v)}"' for n, v in zip(self.labels, values, strict=True)]
            cumulative = 0.0
            for bound, n in zip(self.buckets, s, strict=False):
                cumulative += n
                le = ",".join([*pairs, f'le="{bound:g}"'])
                lines.append(f"{self.name}_bucket{{{le}}} {_number(cumulative)}")
            le = ",".join([*pairs, 'le="+Inf"'])
            lines.append(f"{self.name}_bucket{{{le}}} {_number(s[-2])}")
            labels = "{" + ",".join(pairs) + "}" if pairs else ""
            lines.append(f"{self.name}_sum{labels} {_number(s[-1])}")
            lines.append(f"{self.name}_count{labels} {_number(s[-2])}")
        return "\n".join(lines)


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
        self.http_latency = Histogram(
            "iotvault_http_request_duration_seconds",
            "HTTP requests from their start to the end of the answer, by method and route template "
            "(a live stream counts its whole life).",
            ("method", "route"),
        )
        self.ingest_lag = Histogram(
            "iotvault_ingest_lag_seconds",
            "From a message's arrival at the ingest pipeline to its durable answer (commit done), "
            "measured on the oldest message of each batch.",
        )
        self.newest_pages = Counter(
            "iotvault_http_newest_pages_total",
            "Last-N reads by how they were answered: known (a kept page this process knew current, "
            "no query), unchanged (a kept page one query found current), grown (a kept page and the "
            "events added since), read (read from the database).",
            "how",
        )
        self.gauges: list[Gauge] = []

    def _families(self) -> tuple[Counter | Histogram, ...]:
        return (
            self.events_stored,
            self.duplicates,
            self.rejected,
            self.status_updates,
            self.batches,
            self.commit_failures,
            self.authentications,
            self.alerts,
            self.http_latency,
            self.ingest_lag,
            self.newest_pages,
        )

    def snapshot(self) -> dict[str, Any]:
        """Every counter's and histogram's values, for another process to add to its own."""
        return {f.name: f.snapshot() for f in self._families()}

    def render(self, plus: Mapping[str, Any] | None = None) -> str:
        """The exposition text; ``plus`` (another process's :meth:`snapshot`) is added in.

        ``serve --api-processes``: the HTTP children answer ``/metrics`` with their own
        figures plus the ingesting parent's (:class:`SnapshotFile`), so that one scrape shows
        the node's ingest as well as its requests.
        """
        plus = plus or {}
        parts = [f.render(_mapping(plus.get(f.name))) for f in self._families()]
        parts += [g.render() for g in self.gauges]
        return "\n".join(parts) + "\n"


def _mapping(value: Any) -> Any:
    return value if isinstance(value, dict) else None


class SnapshotFile:
    """Where an ``--api-processes`` parent leaves its :meth:`Metrics.snapshot` for its children.

    Written every :data:`SNAPSHOT_EVERY_S` (atomically: a new file renamed over the old, owner
    only) into the data dir; a child reads it when ``/metrics`` is scraped. Counts only: what
    a scrape shows anyway, never a credential or a payload.
    """

    NAME = "ingest-metrics.json"

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / self.NAME

    def write(self, metrics: Metrics) -> None:
        tmp = self.path.with_name(self.NAME + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(metrics.snapshot(), fh, separators=(",", ":"))
        tmp.replace(self.path)

    def read(self) -> dict[str, Any]:
        """The parent's last snapshot, or nothing if there is none (yet) or it does not parse."""
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


SNAPSHOT_EVERY_S = 1.0
