"""Alert rules: one alert per episode, thresholds, windows, spraying by distinct accounts."""

from __future__ import annotations

from iotvault.audit.alerts import AlertEngine, AlertKind, Rule, Signal

S = 1_000_000


def feed(engine: AlertEngine, signals: list[Signal]) -> list[tuple[AlertKind, str]]:
    return [(a.kind, a.key) for s in signals for a in engine.observe(s)]


def test_brute_force_against_one_account_is_one_alert_per_episode() -> None:
    engine = AlertEngine()
    attack = [Signal(i * S, "login_failure", account="alice", address=f"10.0.0.{i % 3}") for i in range(200)]
    assert feed(engine, attack) == [(AlertKind.BRUTE_FORCE, "alice")]
    # After a quiet period longer than the window, a new attack is a new episode.
    later = [Signal(1000 * S + i * S, "login_failure", account="alice") for i in range(10)]
    assert feed(engine, later) == [(AlertKind.BRUTE_FORCE, "alice")]


def test_failures_below_the_threshold_or_spread_over_time_raise_nothing() -> None:
    engine = AlertEngine()
    slow = [Signal(i * 100 * S, "login_failure", account="bob") for i in range(30)]  # one per 100 s
    assert feed(engine, slow) == []


def test_spraying_counts_distinct_accounts_from_one_address() -> None:
    engine = AlertEngine()
    spray = [Signal(i * S, "login_failure", account=f"user{i}", address="203.0.113.9") for i in range(40)]
    assert feed(engine, spray) == [(AlertKind.PASSWORD_SPRAYING, "203.0.113.9")]
    # The same account forty times from one address is brute force, not spraying.
    engine2 = AlertEngine()
    same = [Signal(i * S, "login_failure", account="carol", address="203.0.113.10") for i in range(40)]
    assert feed(engine2, same) == [(AlertKind.BRUTE_FORCE, "carol")]


def test_single_event_rules_and_enumeration() -> None:
    engine = AlertEngine()
    assert feed(engine, [Signal(S, "topic_denied", device="d1")]) == [(AlertKind.TOPIC_VIOLATION, "d1")]
    assert feed(engine, [Signal(2 * S, "topic_denied", device="d1")]) == []  # same episode
    assert feed(engine, [Signal(S, "revoked_use", principal="apikey:k1")]) == [
        (AlertKind.REVOKED_CREDENTIAL_USE, "apikey:k1")
    ]
    probes = [Signal(i * S // 10, "not_found", principal="user:eve") for i in range(100)]
    assert feed(engine, probes) == [(AlertKind.ENUMERATION, "user:eve")]


def test_memory_is_bounded_by_max_keys_under_a_flood_of_distinct_keys() -> None:
    engine = AlertEngine(
        [Rule(AlertKind.BRUTE_FORCE, frozenset({"login_failure"}), "account", 5, 60)], max_keys=100
    )
    for i in range(10_000):
        engine.observe(Signal(i, "login_failure", account=f"a{i}"))
    assert len(engine._windows) <= 100
