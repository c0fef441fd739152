"""The in-memory rate limiter (iotvault.api.ratelimit.LocalLimits): limits, waits and memory.

The behaviour at a window boundary, against ``limits``' own strategies' semantics, is
tests/integration/test_auth_throttle.py's (through RateLimiter, real clock).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from limits import parse

from iotvault.api.ratelimit import SWEEP_S, LocalLimits, RateLimiter


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_moving_window_allows_the_limit_and_says_when_the_oldest_hit_expires() -> None:
    clock = Clock()
    limits = LocalLimits(clock)
    item = parse("5/10 seconds")
    for i in range(5):
        clock.now += 1
        assert limits.moving(item, ("p",)) is None, i
    wait = limits.moving(item, ("p",))
    assert wait == 6  # the first hit (5 s ago) leaves the window in 5 s: ceil, and 1 more
    assert limits.moving(item, ("q",)) is None  # keys are separate
    clock.now += wait - 1.01
    assert limits.moving(item, ("p",)) is not None
    clock.now += 1.02
    assert limits.moving(item, ("p",)) is None
    assert limits.moving(item, ("p",)) is not None  # one slot freed, one taken


def test_asking_does_not_count() -> None:
    limits = LocalLimits(Clock())
    item = parse("2/minute")
    for _ in range(10):
        assert limits.moving(item, ("ip",), count=False) is None
    limits.moving(item, ("ip",))
    limits.moving(item, ("ip",))
    assert limits.moving(item, ("ip",), count=False) is not None


def test_a_sliding_counter_weighs_the_previous_window_and_its_wait_is_exact() -> None:
    clock = Clock(now=1_000_000.0)  # a multiple of 10: the start of a window
    limits = LocalLimits(clock)
    item = parse("10/10 seconds")
    clock.now += 9.5
    for _ in range(10):
        assert limits.sliding(item, ("a",)) is None
    assert limits.sliding(item, ("a",)) is not None
    clock.now += 1.0  # 0.5 s into the next window: 95% of the last one still counts
    wait = limits.sliding(item, ("a",))
    assert wait is not None
    assert wait == 1  # 9.5 + 1 <= 10 once 10 * (1 - e/10) <= 9: e >= 1, i.e. in 0.5 s
    clock.now += wait
    assert limits.sliding(item, ("a",)) is None
    assert limits.sliding(item, ("a",)) is not None
    clock.now += 30  # two windows later nothing counts
    assert all(limits.sliding(item, ("a",)) is None for _ in range(10))


def test_memory_follows_the_active_keys_an_address_spray_is_swept() -> None:
    clock = Clock()
    limits = LocalLimits(clock)
    per_address, per_principal = parse("1200/minute"), parse("600/minute")
    for i in range(10_000):
        limits.sliding(per_address, ("ip", f"10.0.{i // 256}.{i % 256}"))
        limits.moving(per_principal, ("principal", f"user:{i}"))
    assert len(limits) == 20_000
    clock.now += 60 + SWEEP_S  # the principals' window has passed; the addresses' counts weigh on
    limits.moving(per_principal, ("principal", "user:new"))
    assert len(limits) == 10_001
    clock.now += 120  # and now theirs too
    limits.moving(per_principal, ("principal", "user:new"))
    assert len(limits) == 1


async def test_the_limiter_in_memory_never_hands_work_to_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    handed_over = 0
    real = asyncio.to_thread

    async def counting(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        nonlocal handed_over
        handed_over += 1
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    limiter = RateLimiter(per_address="1000/minute", per_principal="50/minute", auth_failures="5/minute")
    refused = []
    for _ in range(60):
        assert await limiter.hit_address("10.0.0.1") is None
        assert await limiter.auth_blocked("10.0.0.1") is None
        refused.append(await limiter.hit_principal("user:alice"))
        await asyncio.sleep(0)
    assert refused[:50] == [None] * 50
    assert all(r is not None and r >= 1 for r in refused[50:]), "the 51st request must be refused"
    for _ in range(5):
        await limiter.auth_failed("10.0.0.2", "apikey:k1")
    assert await limiter.auth_blocked("10.0.0.2") is not None
    assert await limiter.identity_blocked("apikey:k1") is not None
    assert await limiter.identity_blocked("apikey:k2") is None
    assert handed_over == 0
    await limiter.close()
