"""Aggregation of security events: identical refusals are one row and a count, floods are bounded."""

from __future__ import annotations

from typing import Any

from iotvault.broker.security_log import SecurityEventLog
from iotvault.storage.repository import SecurityEvent


class Clock:
    def __init__(self) -> None:
        self.us = 1_000_000_000

    def __call__(self) -> int:
        return self.us


def log_with(clock: Clock, **kwargs: Any) -> SecurityEventLog:
    return SecurityEventLog(None, window_s=60, clock_us=clock, **kwargs)  # type: ignore[arg-type]


def rows(log: SecurityEventLog) -> list[SecurityEvent]:
    return list(log._pending)


def test_identical_events_are_one_row_then_one_counting_row_when_the_window_closes() -> None:
    clock = Clock()
    log = log_with(clock)
    for port in range(1000, 1500):  # the port changes with every connection; the address does not
        log.record("login_failed", "dev-1", address=f"10.0.0.1:{port}", reason="bad credentials")
    assert [(r.kind, r.subject) for r in rows(log)] == [("login_failed", "dev-1")]
    clock.us += 61_000_000
    log.record("login_failed", "dev-1", address="10.0.0.1:2000", reason="bad credentials")  # a new window
    counted = rows(log)[1]
    assert counted.detail["count"] == 499
    assert counted.detail["repeated"] is True
    assert len(rows(log)) == 3  # the first, the count, and the new window's first


def test_different_subjects_addresses_reasons_and_topics_are_kept_apart() -> None:
    log = log_with(Clock())
    log.record("login_failed", "dev-1", address="10.0.0.1:1", reason="bad credentials")
    log.record("login_failed", "dev-2", address="10.0.0.1:1", reason="bad credentials")
    log.record("login_failed", "dev-1", address="10.0.0.2:1", reason="bad credentials")
    log.record("login_failed", "dev-1", address="10.0.0.1:1", reason="throttled")
    log.record("acl_denied", "dev-1", address="10.0.0.1:1", reason="not allowed", action="publish", topic="a")
    log.record("acl_denied", "dev-1", address="10.0.0.1:1", reason="not allowed", action="publish", topic="b")
    assert len(rows(log)) == 6


def test_a_spray_of_many_subjects_is_folded_and_then_counted_as_dropped() -> None:
    log = log_with(Clock(), max_keys=10)
    for i in range(10_000):
        log.record("login_failed", f"dev-{i}", address=f"10.0.{i % 50}.1:1", reason="bad credentials")
    pending = rows(log)
    assert len(pending) <= 20  # 10 keys, then 10 folded per-address keys
    assert sum(r.subject == "*" for r in pending) == 10
    assert all(r.detail.get("folded") for r in pending if r.subject == "*")
    # folded keys exist for the first ten addresses seen after the subjects ran out (10.0.10-19);
    # events from the other forty addresses are only counted, as one events_dropped row
    assert log._dropped == sum(1 for i in range(10, 10_000) if not 10 <= i % 50 < 20)


def test_ipv6_addresses_lose_only_their_port() -> None:
    log = log_with(Clock())
    log.record("login_failed", "d", address="[2001:db8::1]:5000", reason="x")
    log.record("login_failed", "d", address="[2001:db8::1]:5001", reason="x")
    log.record("login_failed", "d", address="2001:db8::2", reason="x")
    assert len(rows(log)) == 2
