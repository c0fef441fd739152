"""Rate limits per client address, per principal and on failed authentications.

Counts are kept in memory for one node (:class:`LocalLimits`), or in Redis
(``IOTVAULT_REDIS_URL``, through the ``limits`` library) so that several API nodes share them;
the rates are written in ``limits``' notation either way. A hit returns ``None`` when allowed,
else the seconds to wait, which becomes the ``Retry-After`` header of the 429 answer. If Redis
is unreachable the limiter fails open for that request and logs it: availability of the API is
not traded for a counter.

No fixed windows: they let about twice the limit through across a window boundary.

* Per principal and for failed authentications: a *moving* window (``limits``' exact
  strategy: one timestamp per counted request, so at most the limit in any window's span).
  The keys are real principals, and failures are few (tens a minute) per key.
* Per address: the *sliding-window counter* (the previous window's count, weighted by how much
  of it still overlaps, plus the current one's): two counters a key, where a moving window
  would keep a timestamp per request for every address that ever calls — memory an attacker
  spraying addresses would control. It smooths the boundary burst; its stated imprecision is
  that a client that crowds the end of one window may get up to the limit again spread over
  the next.

Failed authentications are counted twice: per client address and, when the credential names
one (an API key's id), per identity. How the two are used — a valid credential is still
accepted from an address throttled for failures — is :mod:`iotvault.api.security`'s.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from limits import RateLimitItem, parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from limits.aio.strategies import RateLimiter as Strategy

log = logging.getLogger(__name__)

SWEEP_S = 1.0


class LocalLimits:
    """Both strategies for one process, in plain dictionaries on the event loop.

    ``limits``' in-memory storage does the same arithmetic behind a dozen awaited calls and
    locks per hit; with three counted checks per API request that was a tenth of a cached read
    (BENCHMARKS.md, issue 17). The semantics are ``limits``' own, as ``tests/integration/
    test_auth_throttle.py`` checks for both: a moving window keeps one timestamp per counted
    hit; a sliding-window counter keeps two counts per key, its windows aligned to the clock.
    Entries of windows that have passed are swept at most once a second, so memory follows the
    keys active in the last window (an attacker spraying addresses holds two numbers each).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._moving: dict[tuple[str, ...], deque[float]] = {}
        self._counters: dict[tuple[str, ...], list[float]] = {}  # [window index, previous, current]
        self._expiry: dict[tuple[str, ...], float] = {}
        self._last_sweep = 0.0

    def __len__(self) -> int:
        return len(self._moving) + len(self._counters)

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < SWEEP_S:
            return
        self._last_sweep = now
        for key in [k for k, hits in self._moving.items() if not hits or hits[-1] <= now - self._expiry[k]]:
            del self._moving[key], self._expiry[key]
        for key in [k for k, c in self._counters.items() if c[0] < now // self._expiry[k] - 1]:
            del self._counters[key], self._expiry[key]

    def moving(self, item: RateLimitItem, key: tuple[str, ...], *, count: bool = True) -> int | None:
        """A hit in a moving window (``count=False``: only ask); None if allowed, else seconds to wait."""
        hits = self._moving.get(key)
        if hits is None and not count:  # nothing counted: what asking for most keys finds
            return None
        now = self._clock()
        self._sweep(now)
        expiry = float(item.get_expiry())
        hits = self._moving.get(key)  # the sweep may have let it go
        if hits is not None:
            while hits and hits[0] <= now - expiry:
                hits.popleft()
        if hits is not None and len(hits) >= item.amount:
            return max(1, math.ceil(hits[0] + expiry - now))
        if count:
            if hits is None:
                hits = self._moving[key] = deque()
                self._expiry[key] = expiry
            hits.append(now)
        return None

    def sliding(self, item: RateLimitItem, key: tuple[str, ...]) -> int | None:
        """A hit of a sliding-window counter: the previous window's count, weighted by how much
        of it the last ``expiry`` seconds still overlap, plus the current one's."""
        now = self._clock()
        self._sweep(now)
        expiry = float(item.get_expiry())
        window = now // expiry
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = [window, 0.0, 0.0]
            self._expiry[key] = expiry
        elif c[0] != window:
            c[1] = c[2] if c[0] == window - 1 else 0.0
            c[0], c[2] = window, 0.0
        elapsed = now - window * expiry
        previous, current = c[1], c[2]
        if previous * (1 - elapsed / expiry) + current + 1 <= item.amount:
            c[2] += 1
            return None
        if current + 1 <= item.amount:  # the previous window's weight must fall far enough
            ready = window * expiry + expiry * (1 - (item.amount - 1 - current) / previous)
        else:  # into the next window, where this one's count is the weighted one
            ready = (window + 1) * expiry + expiry * (1 - (item.amount - 1) / current)
        return max(1, math.ceil(ready - now))


class RateLimiter:
    def __init__(
        self, *, per_address: str, per_principal: str, auth_failures: str, redis_url: str = ""
    ) -> None:
        self._pool: Any = None
        self._local: LocalLimits | None = None
        self._exact: Strategy | None = None
        self._smooth: Strategy | None = None
        if redis_url:
            # the optional "redis" extra; a pool of our own so that close() can release it
            import redis.asyncio  # noqa: PLC0415

            self._pool = redis.asyncio.ConnectionPool.from_url(redis_url)
            uri = "async+" + redis_url if not redis_url.startswith("async+") else redis_url
            storage = RedisStorage(uri, implementation="redispy", connection_pool=self._pool)
            self._exact = MovingWindowRateLimiter(storage)
            self._smooth = SlidingWindowCounterRateLimiter(storage)
        else:
            self._local = LocalLimits()
        self._address: RateLimitItem = parse(per_address)
        self._principal: RateLimitItem = parse(per_principal)
        self._failures: RateLimitItem = parse(auth_failures)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.disconnect()

    async def _hit(self, item: RateLimitItem, *key: str, smooth: bool = False) -> int | None:
        if self._local is not None:
            return self._local.sliding(item, key) if smooth else self._local.moving(item, key)
        limiter = self._smooth if smooth else self._exact
        assert limiter is not None  # noqa: S101 - set with the Redis storage
        try:
            if await limiter.hit(item, *key):
                return None
            stats = await limiter.get_window_stats(item, *key)
        except Exception:
            log.warning("rate limiter storage unavailable; request allowed", exc_info=True)
            return None
        return max(1, math.ceil(stats.reset_time - time.time()))

    async def hit_address(self, address: str) -> int | None:
        return await self._hit(self._address, "ip", address, smooth=True)

    async def hit_principal(self, principal_id: str) -> int | None:
        return await self._hit(self._principal, "principal", principal_id)

    async def auth_failed(self, address: str, identity: str | None = None) -> int | None:
        """Count a failed authentication against the address (and the identity it named).

        A non-None answer (seconds) means: this address is now over its failure limit.
        """
        if identity is not None:
            await self._hit(self._failures, "authfail-id", identity)
        return await self._hit(self._failures, "authfail", address)

    async def _blocked(self, *key: str) -> int | None:
        if self._local is not None:
            return self._local.moving(self._failures, key, count=False)
        assert self._exact is not None  # noqa: S101 - set with the Redis storage
        try:
            if await self._exact.test(self._failures, *key):
                return None
            stats = await self._exact.get_window_stats(self._failures, *key)
        except Exception:  # noqa: BLE001 - fail open
            return None
        return max(1, math.ceil(stats.reset_time - time.time()))

    async def auth_blocked(self, address: str) -> int | None:
        """Seconds until this address is under its failure limit again, or None if it is."""
        return await self._blocked("authfail", address)

    async def identity_blocked(self, identity: str) -> int | None:
        """The same for an identity (an API key id) that failed too often, from anywhere."""
        return await self._blocked("authfail-id", identity)
