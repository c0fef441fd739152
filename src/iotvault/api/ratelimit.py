"""Rate limits per client address and per principal, with the ``limits`` library.

Storage is in memory for one node, or Redis (``IOTVAULT_REDIS_URL``) so that several API nodes
share the counts. A hit returns ``None`` when allowed, else the seconds to wait, which becomes
the ``Retry-After`` header of the 429 answer. If Redis is unreachable the limiter fails open
for that request and logs it: availability of the API is not traded for a counter.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter

log = logging.getLogger(__name__)


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
            storage = MemoryStorage()
        self._limiter = FixedWindowRateLimiter(storage)
        self._address: RateLimitItem = parse(per_address)
        self._principal: RateLimitItem = parse(per_principal)
        self._failures: RateLimitItem = parse(auth_failures)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.disconnect()

    async def _hit(self, item: RateLimitItem, *key: str) -> int | None:
        try:
            if await self._limiter.hit(item, *key):
                return None
            stats = await self._limiter.get_window_stats(item, *key)
        except Exception:
            log.warning("rate limiter storage unavailable; request allowed", exc_info=True)
            return None
        return max(1, math.ceil(stats.reset_time - time.time()))

    async def hit_address(self, address: str) -> int | None:
        return await self._hit(self._address, "ip", address)

    async def hit_principal(self, principal_id: str) -> int | None:
        return await self._hit(self._principal, "principal", principal_id)

    async def auth_failed(self, address: str) -> int | None:
        """Count a failed authentication; a non-None answer means: refuse this address for now."""
        return await self._hit(self._failures, "authfail", address)

    async def auth_blocked(self, address: str) -> int | None:
        try:
            if await self._limiter.test(self._failures, "authfail", address):
                return None
            stats = await self._limiter.get_window_stats(self._failures, "authfail", address)
        except Exception:  # noqa: BLE001 - fail open
            return None
        return max(1, math.ceil(stats.reset_time - time.time()))
