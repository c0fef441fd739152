"""Rate limits shared by several API nodes through a real Redis."""

from __future__ import annotations

import os
import uuid

import pytest
import redis
from helpers import unavailable

from iotvault.api.ratelimit import RateLimiter

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("IOTVAULT_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        unavailable(f"Redis at {REDIS_URL} does not answer: {exc}")
    return REDIS_URL


async def test_two_nodes_share_one_budget(redis_url: str) -> None:
    node_a = RateLimiter(
        per_address="1000/minute", per_principal="4/minute", auth_failures="2/minute", redis_url=redis_url
    )
    node_b = RateLimiter(
        per_address="1000/minute", per_principal="4/minute", auth_failures="2/minute", redis_url=redis_url
    )
    who = f"user:{uuid.uuid4().hex}"  # fresh keys: earlier runs cannot interfere
    answers = [await (node_a if i % 2 else node_b).hit_principal(who) for i in range(6)]
    assert answers[:4] == [None] * 4
    assert all(isinstance(a, int) and a >= 1 for a in answers[4:])
    address = f"198.51.100.{uuid.uuid4().int % 250}-{uuid.uuid4().hex[:6]}"
    assert await node_a.auth_failed(address) is None
    assert await node_b.auth_failed(address) is None
    assert await node_a.auth_blocked(address) is not None  # node A sees node B's failure
    assert await node_b.auth_blocked(address) is not None
    await node_a.close()
    await node_b.close()


# redis-py leaves the refused connection's writer for the garbage collector to close
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_unreachable_redis_fails_open() -> None:
    limiter = RateLimiter(
        per_address="1/minute",
        per_principal="1/minute",
        auth_failures="1/minute",
        redis_url="redis://127.0.0.1:1/0",
    )
    assert await limiter.hit_principal("anyone") is None
    assert await limiter.hit_principal("anyone") is None
    await limiter.close()
