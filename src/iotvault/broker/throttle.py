"""Slowing down password guessing at the broker: failed logins per address and per device.

Two limits over a sliding window: failures of one client id from one address (a device with a
wrong password, or someone guessing one device's password), and failures from one address in
all (someone trying many devices). Past the first, that client id is refused from that address
at once, without checking its password, until the window has moved past its failures. Past the
second, the address is throttled: a client id that has failed from it in the window is refused
without a check, but one that has *not* (an honest device behind the same NAT, proxy or carrier
gateway as the attacker) is still checked, so other people's failures never lock it out (see
:meth:`LoginThrottle.blocked`). A device connecting from another address is not affected, so an
attacker cannot lock a device out by failing on its behalf from elsewhere. A success clears that
device's count from that address.

Memory is bounded: at most ``max_keys`` addresses and pairs are tracked; past that the oldest
are forgotten (which can only make the throttle more lenient, never lock anyone out).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable


class LoginThrottle:
    def __init__(
        self,
        *,
        per_device: int = 5,
        per_address: int = 30,
        window_s: float = 60.0,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_device < 1 or per_address < 1 or window_s <= 0:
            raise ValueError("limits and window must be positive")
        self.per_device = per_device
        self.per_address = per_address
        self.window_s = window_s
        self._max_keys = max_keys
        self._clock = clock
        self._failures: OrderedDict[tuple[str, str | None], deque[float]] = OrderedDict()

    def _recent(self, key: tuple[str, str | None], now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def blocked(self, address: str, client_id: str) -> float | None:
        """Seconds until a login from ``address`` as ``client_id`` is checked again; None: now.

        A throttled address blocks only the client ids that have failed from it in the window;
        a first try of any other client id is checked (and, if it fails, counted).
        """
        now = self._clock()
        own = self._recent((address, client_id), now)
        if own is None:
            return None
        waits = []
        if len(own) >= self.per_device:
            waits.append(own[-self.per_device] + self.window_s - now)
        shared = self._recent((address, None), now)
        if shared is not None and len(shared) >= self.per_address:
            waits.append(shared[-self.per_address] + self.window_s - now)
        return max(waits) if waits else None

    def failed(self, address: str, client_id: str) -> bool:
        """Count a failure; True if it is the one that starts a lockout."""
        now = self._clock()
        started = False
        for key, limit in (((address, client_id), self.per_device), ((address, None), self.per_address)):
            times = self._recent(key, now) or deque()
            times.append(now)
            while len(times) > limit:
                times.popleft()
            self._failures[key] = times
            self._failures.move_to_end(key)
            started |= len(times) == limit
        while len(self._failures) > self._max_keys:
            self._failures.popitem(last=False)
        return started

    def succeeded(self, address: str, client_id: str) -> None:
        self._failures.pop((address, client_id), None)
