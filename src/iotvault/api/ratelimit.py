"""Rate limits per client address, per principal and on failed authentications (``limits``).

Storage is in memory for one node, or Redis (``IOTVAULT_REDIS_URL``) so that several API nodes
share the counts. A hit returns ``None`` when allowed, else the seconds to wait, which becomes
the ``Retry-After`` header of the 429 answer. If Redis is unreachable the limiter fails open
for that request and logs it: availability of the API is not traded for a counter.

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
from typing import Any

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from limits.aio.strategies import RateLimiter as Strategy

log = logging.getLogger(__name__)

SWEEP_S = 1.0


class SweepingMemoryStorage(MemoryStorage):
    """``limits``' in-memory storage, sweeping expired entries at most once a second.

    ``limits`` 5 starts a sweep after every counted request once the last one has finished, and
    a sweep hands each key to a worker thread (``asyncio.to_thread``): two thread hand-overs per
    API request, a tenth of a last-50 read's CPU in the profile (BENCHMARKS.md, issue 17). The
    counts do not depend on the sweep (a window reads only its unexpired entries); it frees
    memory, which once a second does as well. The overridden name is checked by
    ``tests/unit/test_ratelimit_sweep.py``.
    """

    _last_sweep = 0.0

    async def _MemoryStorage__schedule_expiry(self) -> None:  # noqa: N802 - limits' private name
        now = time.monotonic()
        if now - self._last_sweep < SWEEP_S:
            return
        self._last_sweep = now
        await super()._MemoryStorage__schedule_expiry()  # type: ignore[misc]


class RateLimiter:
    def __init__(
        self, *, per_address: str, per_principal: str, auth_failures: str, redis_url: str = ""
    ) -> None:
        storage: Storage
        self._pool: Any = None
        if redis_url:
            # the optional "redis" extra; a pool of our own so that close() can release it
            import redis.asyncio  # noqa: PLC0415

            self._pool = redis.asyncio.ConnectionPool.from_url(redis_url)
            uri = "async+" + redis_url if not redis_url.startswith("async+") else redis_url
            storage = RedisStorage(uri, implementation="redispy", connection_pool=self._pool)
        else:
            storage = SweepingMemoryStorage()
        self._exact: Strategy = MovingWindowRateLimiter(storage)
        self._smooth: Strategy = SlidingWindowCounterRateLimiter(storage)
        self._address: RateLimitItem = parse(per_address)
        self._principal: RateLimitItem = parse(per_principal)
        self._failures: RateLimitItem = parse(auth_failures)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.disconnect()

    async def _hit(self, item: RateLimitItem, *key: str, strategy: Strategy | None = None) -> int | None:
        limiter = strategy or self._exact
        try:
            if await limiter.hit(item, *key):
                return None
            stats = await limiter.get_window_stats(item, *key)
        except Exception:
            log.warning("rate limiter storage unavailable; request allowed", exc_info=True)
            return None
        return max(1, math.ceil(stats.reset_time - time.time()))

    async def hit_address(self, address: str) -> int | None:
        return await self._hit(self._address, "ip", address, strategy=self._smooth)

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
