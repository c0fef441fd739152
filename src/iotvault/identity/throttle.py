"""Brute-force defences of the login page, counted in the identity events themselves.

Every failed login is recorded as a ``login_failed`` identity event with the user name as typed
and the client's address (and, like every identity event, as an ``oidc_login_failed`` security
event that administrators read at ``/iotf/security/events``). The throttle counts those rows in
the database, so several API nodes on one database agree without a shared cache.

* **Per user name**: ``oidc_login_max_failures`` failures within ``oidc_lockout_s`` lock the
  name until those failures are that old (an ``account_locked`` event marks it). Unknown names
  are counted and locked exactly like real ones, so a lockout tells nothing about whether an
  account exists. Attempts refused during a lockout are recorded (``login_refused``) but not
  counted, so the lockout ends on time even while the attack goes on.
* **Per address**: four times as many failures, whatever the names, block the address for
  the same time, against one client trying many names.
* **Anonymous logins** per address, at ``oidc_anonymous_rate`` (e.g. ``20/hour``).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Final

import limits

from iotvault.identity.records import IdentityEvent
from iotvault.identity.store import IdentityStore

LOGIN_FAILED: Final = "login_failed"
LOGIN_REFUSED: Final = "login_refused"
ACCOUNT_LOCKED: Final = "account_locked"
ANONYMOUS_LOGIN: Final = "anonymous_login"
DEVICE_CODE_INVALID: Final = "device_code_invalid"
ADDRESS_FACTOR: Final = 4
DEVICE_CODE_TRIES: Final = 10  # wrong user codes per address and window


class Refusal(Enum):
    LOCKED = "locked"  # too many failures for this user name
    THROTTLED = "throttled"  # too many failures from this address


class UserLoginThrottle:
    """People's logins to the provider; devices' MQTT logins have their own throttle
    (:class:`iotvault.broker.throttle.LoginThrottle`, in memory, per device and address)."""

    def __init__(
        self,
        store: IdentityStore,
        record: Callable[[IdentityEvent], None],
        *,
        max_failures: int,
        window_s: int,
        anonymous_rate: str,
    ) -> None:
        self._store = store
        self._record = record
        self.max_failures = max_failures
        self.window_us = window_s * 1_000_000
        anonymous = limits.parse(anonymous_rate)  # the notation of every rate setting
        self._anon_count = anonymous.amount
        self._anon_window_us = anonymous.get_expiry() * 1_000_000

    def refusal(self, user_name: str, address: str, now_us: int) -> Refusal | None:
        since = now_us - self.window_us
        by_name, _ = self._store.count_events(LOGIN_FAILED, since, user_name=user_name)
        if by_name >= self.max_failures:
            return Refusal.LOCKED
        by_address, _ = self._store.count_events(LOGIN_FAILED, since, address=address)
        if by_address >= self.max_failures * ADDRESS_FACTOR:
            return Refusal.THROTTLED
        return None

    def refused(self, user_name: str, address: str, now_us: int, refusal: Refusal) -> None:
        self._record(IdentityEvent(now_us, LOGIN_REFUSED, user_name, None, address, refusal.value))

    def failed(self, user_name: str, address: str, now_us: int, client_id: str | None) -> bool:
        """Record a failure; True if it locked the user name."""
        self._record(IdentityEvent(now_us, LOGIN_FAILED, user_name, client_id, address, ""))
        count, _ = self._store.count_events(LOGIN_FAILED, now_us - self.window_us, user_name=user_name)
        if count == self.max_failures:
            self._record(
                IdentityEvent(
                    now_us,
                    ACCOUNT_LOCKED,
                    user_name,
                    client_id,
                    address,
                    f"{count} failed logins within {self.window_us // 1_000_000} s",
                )
            )
            return True
        return False

    def anonymous_allowed(self, address: str, now_us: int) -> bool:
        count, _ = self._store.count_events(ANONYMOUS_LOGIN, now_us - self._anon_window_us, address=address)
        return count < self._anon_count

    def device_code_allowed(self, address: str, now_us: int) -> bool:
        count, _ = self._store.count_events(DEVICE_CODE_INVALID, now_us - self.window_us, address=address)
        return count < DEVICE_CODE_TRIES
