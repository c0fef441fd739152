"""Alerts derived from audit records and security events: one alert per episode, not per event.

Pure: signals carry their own times, so the rules run the same on a live stream and on a replay
of the log (and in unit tests, without a clock). A rule counts signals of its kinds per key
(an account, an address, a device, a principal) in a sliding window; when the count reaches
its threshold, the key's episode opens and one :class:`Alert` is raised. The episode stays open
while signals keep coming and closes after a quiet period as long as the window, so a brute
force that lasts an hour is one alert, and the same attack tomorrow is another.

Password spraying is counted differently: distinct accounts failed from one address, because a
sprayer tries each account once or twice.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

__all__ = ["Alert", "AlertEngine", "AlertKind", "Rule", "Signal", "default_rules"]


class AlertKind(StrEnum):
    BRUTE_FORCE = "brute_force"
    COMMAND_FLOOD = "command_flood"
    DEVICE_LOGIN_FAILURES = "device_login_failures"
    ENUMERATION = "enumeration"
    PASSWORD_SPRAYING = "password_spraying"  # noqa: S105  # nosec B105  # an alert name, not a password
    REVOKED_CREDENTIAL_USE = "revoked_credential_use"
    TOPIC_VIOLATION = "topic_violation"


@dataclass(frozen=True, slots=True)
class Signal:
    """One observed fact: ``kind`` names what happened, the other fields whom it concerns."""

    at_us: int
    kind: str  # login_failure, device_login_failure, topic_denied, not_found, forbidden, revoked_use, command
    account: str = ""
    address: str = ""
    device: str = ""
    principal: str = ""


@dataclass(frozen=True, slots=True)
class Rule:
    alert: AlertKind
    kinds: frozenset[str]
    key: str  # the Signal field the rule counts per: account, address, device or principal
    threshold: int
    window_s: float
    distinct: str = ""  # count distinct values of this field instead of signals
    severity: str = "warning"


@dataclass(frozen=True, slots=True)
class Alert:
    kind: AlertKind
    key: str
    at_us: int
    count: int
    severity: str
    summary: str


_US: Final = 1_000_000


def default_rules() -> list[Rule]:
    """The rules iotvault runs out of the box; thresholds are settings in a later release."""
    return [
        Rule(AlertKind.BRUTE_FORCE, frozenset({"login_failure"}), "account", 10, 300, severity="high"),
        Rule(
            AlertKind.PASSWORD_SPRAYING,
            frozenset({"login_failure"}),
            "address",
            5,
            600,
            distinct="account",
            severity="high",
        ),
        Rule(AlertKind.DEVICE_LOGIN_FAILURES, frozenset({"device_login_failure"}), "device", 10, 300),
        Rule(AlertKind.TOPIC_VIOLATION, frozenset({"topic_denied"}), "device", 1, 300),
        Rule(AlertKind.ENUMERATION, frozenset({"not_found", "forbidden"}), "principal", 30, 60),
        Rule(
            AlertKind.REVOKED_CREDENTIAL_USE, frozenset({"revoked_use"}), "principal", 1, 300, severity="high"
        ),
        Rule(AlertKind.COMMAND_FLOOD, frozenset({"command"}), "principal", 60, 60),
    ]


@dataclass(slots=True)
class _Window:
    window_us: int
    seen: deque[tuple[int, str]] = field(default_factory=deque)
    open_until_us: int = 0  # the episode is open while now < open_until_us


class AlertEngine:
    """Feeds signals through the rules; bounded by the number of live keys, pruned as windows pass."""

    def __init__(self, rules: Iterable[Rule] | None = None, *, max_keys: int = 100_000) -> None:
        self._rules = list(default_rules() if rules is None else rules)
        self._windows: dict[tuple[AlertKind, str], _Window] = {}
        self._max_keys = max_keys

    def observe(self, signal: Signal) -> list[Alert]:
        raised = []
        for rule in self._rules:
            if signal.kind not in rule.kinds:
                continue
            key = getattr(signal, rule.key)
            if not key:
                continue
            alert = self._count(rule, key, signal)
            if alert is not None:
                raised.append(alert)
        return raised

    def _count(self, rule: Rule, key: str, signal: Signal) -> Alert | None:
        window_us = int(rule.window_s * _US)
        slot = self._windows.get((rule.alert, key))
        if slot is None:
            if len(self._windows) >= self._max_keys:
                self._prune(signal.at_us)
            slot = self._windows[(rule.alert, key)] = _Window(window_us)
        slot.seen.append((signal.at_us, getattr(signal, rule.distinct) if rule.distinct else ""))
        while slot.seen and slot.seen[0][0] <= signal.at_us - window_us:
            slot.seen.popleft()
        in_episode = signal.at_us < slot.open_until_us
        count = len({v for _, v in slot.seen}) if rule.distinct else len(slot.seen)
        if in_episode:
            slot.open_until_us = signal.at_us + window_us  # still going: the episode stays open
            return None
        if count < rule.threshold:
            return None
        slot.open_until_us = signal.at_us + window_us
        what = f"{count} distinct {rule.distinct}s" if rule.distinct else f"{count} events"
        return Alert(
            rule.alert, key, signal.at_us, count, rule.severity,
            f"{rule.alert.value}: {what} for {rule.key} {key} within {rule.window_s:g} s",
        )  # fmt: skip

    def _prune(self, now_us: int) -> None:
        """Forget keys whose window and episode have both passed (bounds memory under a flood)."""
        for k in [
            k
            for k, w in self._windows.items()
            if w.open_until_us <= now_us and (not w.seen or w.seen[-1][0] <= now_us - w.window_us)
        ]:
            del self._windows[k]
        if len(self._windows) >= self._max_keys:  # a flood of distinct keys: drop the oldest half
            for k in list(self._windows)[: self._max_keys // 2]:
                del self._windows[k]
