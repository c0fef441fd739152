"""The metrics page is valid Prometheus text exposition format."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from iotvault.metrics import Counter, Gauge, Histogram, Metrics, SnapshotFile

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
HELP_RE = re.compile(rf"# HELP ({NAME}) (.*)")
TYPE_RE = re.compile(rf"# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)")
SAMPLE_RE = re.compile(rf"({NAME})(?:\{{((?:{LABEL})(?:,{LABEL})*)?\}})? (\S+)")


@dataclass
class Family:
    help: str
    type: str
    samples: dict[str, float] = field(default_factory=dict)  # rendered label set → value


def parse_exposition(text: str) -> dict[str, Family]:
    """A strict reader of the text format: HELP, then TYPE, then the family's samples."""
    assert text.endswith("\n")
    families: dict[str, Family] = {}
    current: str | None = None
    pending_help: tuple[str, str] | None = None
    for line in text[:-1].split("\n"):
        if m := HELP_RE.fullmatch(line):
            assert m.group(1) not in families, f"family {m.group(1)} appears twice"
            pending_help = (m.group(1), m.group(2))
            current = None
        elif m := TYPE_RE.fullmatch(line):
            assert pending_help is not None, f"TYPE without HELP: {line!r}"
            assert pending_help[0] == m.group(1), line
            families[m.group(1)] = Family(pending_help[1], m.group(2))
            current, pending_help = m.group(1), None
        elif m := SAMPLE_RE.fullmatch(line):
            assert current is not None, f"sample outside a family: {line!r}"
            parts = {current} | (
                {current + "_bucket", current + "_sum", current + "_count"}
                if families[current].type == "histogram"
                else set()
            )
            assert m.group(1) in parts, line
            labels = (m.group(1)[len(current) :] + " " if m.group(1) != current else "") + (m.group(2) or "")
            assert labels not in families[current].samples, f"duplicate series {line!r}"
            value = float(m.group(3))  # Go's ParseFloat accepts what Python's float does here
            assert not math.isnan(value)
            families[current].samples[labels] = value
        else:
            pytest.fail(f"not a line of the text format: {line!r}")
    assert pending_help is None
    return families


def test_a_fresh_counter_renders_zero() -> None:
    c = Counter("x_total", "Things.")
    assert c.render() == "# HELP x_total Things.\n# TYPE x_total counter\nx_total 0"
    assert c.value() == 0.0


def test_counter_counts() -> None:
    c = Counter("x_total", "Things.")
    c.inc()
    c.inc(2)
    c.inc(0.5)
    assert c.value() == 3.5
    assert parse_exposition(c.render() + "\n")["x_total"].samples == {"": 3.5}


def test_integral_counts_render_without_a_fraction() -> None:
    c = Counter("x_total", "Things.")
    c.inc(3)
    assert c.render().splitlines()[-1] == "x_total 3"


def test_labelled_counter_renders_one_series_per_label_value() -> None:
    c = Counter("rejected_total", "Rejected, by reason.", "reason")
    c.inc(label_value="bad_topic")
    c.inc(label_value="bad_topic")
    c.inc(label_value="too_large")
    lines = c.render().splitlines()
    assert lines[0] == "# HELP rejected_total Rejected, by reason."
    assert lines[1] == "# TYPE rejected_total counter"
    assert sorted(lines[2:]) == [
        'rejected_total{reason="bad_topic"} 2',
        'rejected_total{reason="too_large"} 1',
    ]
    assert c.value("bad_topic") == 2
    assert c.value("unknown") == 0


def test_gauge_reads_its_value_when_rendered() -> None:
    level = [1.0]
    g = Gauge("queue_depth", "Messages waiting.", lambda: level[0])
    assert g.render() == "# HELP queue_depth Messages waiting.\n# TYPE queue_depth gauge\nqueue_depth 1"
    level[0] = 42.5
    assert g.render().endswith("\nqueue_depth 42.5")


def test_metrics_page_is_valid_exposition_text() -> None:
    m = Metrics()
    families = parse_exposition(m.render())
    assert set(families) == {
        "iotvault_ingest_events_stored_total",
        "iotvault_ingest_duplicates_total",
        "iotvault_ingest_rejected_total",
        "iotvault_ingest_status_updates_total",
        "iotvault_ingest_batches_total",
        "iotvault_ingest_commit_failures_total",
        "iotvault_http_authentications_total",
        "iotvault_alerts_total",
        "iotvault_http_request_duration_seconds",
        "iotvault_ingest_lag_seconds",
        "iotvault_http_newest_pages_total",
    }
    for name, fam in families.items():
        if fam.type == "histogram":  # nothing observed yet: no series
            assert name.endswith("_seconds")
            assert fam.samples == {}
            continue
        assert fam.type == "counter"
        assert name.endswith("_total")
        assert fam.help
        assert fam.samples == {"": 0.0}


def test_metrics_page_carries_counts_labels_and_gauges() -> None:
    m = Metrics()
    m.events_stored.inc(10)
    m.duplicates.inc()
    m.rejected.inc(label_value="bad_topic")
    m.rejected.inc(3, label_value="unknown_device")
    m.gauges.append(Gauge("iotvault_ingest_pending", "Messages waiting for a batch.", lambda: 7))
    text = m.render()
    families = parse_exposition(text)
    assert families["iotvault_ingest_events_stored_total"].samples == {"": 10}
    assert families["iotvault_ingest_duplicates_total"].samples == {"": 1}
    assert families["iotvault_ingest_rejected_total"].samples == {
        'reason="bad_topic"': 1,
        'reason="unknown_device"': 3,
    }
    assert families["iotvault_ingest_pending"].type == "gauge"
    assert families["iotvault_ingest_pending"].samples == {"": 7}
    assert 'iotvault_ingest_rejected_total{reason="unknown_device"} 3\n' in text


def test_a_histogram_renders_cumulative_buckets_sum_and_count_per_label_values() -> None:
    h = Histogram("req_seconds", "Requests.", ("method", "route"), buckets=(0.01, 0.1, 1.0))
    for v in (0.005, 0.01, 0.05, 0.5, 7.0):  # 0.01 is in its own bucket (le: less or equal)
        h.observe(v, "GET", "/iotf/devices/{deviceId}")
    h.observe(0.2, "POST", 'odd"route')
    f = parse_exposition(h.render() + "\n")["req_seconds"]
    assert f.type == "histogram"
    labels = 'method="GET",route="/iotf/devices/{deviceId}"'
    assert [f.samples[f'_bucket {labels},le="{le}"'] for le in ("0.01", "0.1", "1", "+Inf")] == [2, 3, 4, 5]
    assert f.samples[f"_count {labels}"] == 5 == h.count("GET", "/iotf/devices/{deviceId}")
    assert f.samples[f"_sum {labels}"] == pytest.approx(7.565)
    assert f.samples['_count method="POST",route="odd\\"route"'] == 1


def test_the_metrics_page_has_request_latency_and_ingest_lag() -> None:
    m = Metrics()
    m.http_latency.observe(0.003, "GET", "/healthz")
    m.ingest_lag.observe(0.02)
    families = parse_exposition(m.render())
    assert families["iotvault_http_request_duration_seconds"].type == "histogram"
    assert families["iotvault_ingest_lag_seconds"].samples["_count "] == 1


def test_another_process_snapshot_is_added_in_series_by_series(tmp_path: Path) -> None:
    parent, child = Metrics(), Metrics()
    parent.events_stored.inc(7)
    parent.rejected.inc(2, "too_large")
    parent.ingest_lag.observe(0.003)
    parent.http_latency.observe(0.5, "GET", '/odd "route"\\x')  # label values that need escaping
    child.rejected.inc(1, "too_large")
    child.rejected.inc(1, "acl")
    child.http_latency.observe(0.002, "GET", "/iotf/devices/{deviceId}")
    snapshots = SnapshotFile(tmp_path)
    snapshots.write(parent)
    assert (tmp_path / SnapshotFile.NAME).stat().st_mode & 0o777 == 0o600
    text = child.render(snapshots.read())
    assert "iotvault_ingest_events_stored_total 7" in text.splitlines()
    assert 'iotvault_ingest_rejected_total{reason="too_large"} 3' in text
    assert 'iotvault_ingest_rejected_total{reason="acl"} 1' in text
    assert "iotvault_ingest_lag_seconds_count 1" in text.splitlines()
    assert (
        'iotvault_http_request_duration_seconds_count{method="GET",route="/iotf/devices/{deviceId}"} 1'
        in text
    )
    assert (
        'iotvault_http_request_duration_seconds_count{method="GET",route="/odd \\"route\\"\\\\x"} 1' in text
    )
    assert "iotvault_ingest_events_stored_total 0" in child.render().splitlines()  # its own: none
    # each family once: the exposition format allows no repeated HELP/TYPE
    assert len(re.findall(r"^# TYPE iotvault_ingest_rejected_total ", text, re.MULTILINE)) == 1


def test_a_snapshot_that_is_missing_broken_or_of_other_buckets_adds_nothing(tmp_path: Path) -> None:
    m = Metrics()
    m.ingest_lag.observe(0.01)
    snapshots = SnapshotFile(tmp_path)
    assert snapshots.read() == {}  # not written yet
    (tmp_path / SnapshotFile.NAME).write_text("{not json")
    assert snapshots.read() == {}
    (tmp_path / SnapshotFile.NAME).write_text("[1, 2]")
    assert snapshots.read() == {}
    other_buckets = {"iotvault_ingest_lag_seconds": {"": [1.0, 2.0, 3.0]}}
    assert m.render(other_buckets) == m.render()
    damaged = {
        "iotvault_ingest_lag_seconds": {"": ["x"] * (len(m.ingest_lag.buckets) + 3)},
        "iotvault_ingest_events_stored_total": {"": "many"},
        "iotvault_ingest_batches_total": [1, 2],
        "iotvault_http_request_duration_seconds": {"GET\n/": None},
    }
    assert m.render(damaged) == m.render()  # a damaged snapshot never breaks the scrape
    snapshots.remove()
    snapshots.remove()  # twice is fine
    assert not (tmp_path / SnapshotFile.NAME).exists()
