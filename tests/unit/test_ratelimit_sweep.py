"""The in-memory rate limiter sweeps expired entries at most once a second, and still limits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from limits.aio.storage import MemoryStorage

from iotvault.api.ratelimit import RateLimiter


def test_limits_still_has_the_private_hook_that_is_overridden() -> None:
    # if limits renames it, the override silently stops working: this fails first
    assert callable(getattr(MemoryStorage, "_MemoryStorage__schedule_expiry", None))


async def test_many_requests_cost_one_sweep_and_the_limit_still_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handed_over = 0
    real = asyncio.to_thread

    async def counting(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        nonlocal handed_over
        handed_over += 1
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    limiter = RateLimiter(per_address="1000/minute", per_principal="50/minute", auth_failures="5/minute")
    refused = []
    for _ in range(60):  # requests as a server sees them: the loop runs other tasks in between
        refused.append(await limiter.hit_principal("user:alice"))
        await asyncio.sleep(0.001)
    assert refused[:50] == [None] * 50
    assert all(r is not None and r >= 1 for r in refused[50:]), "the 51st request must be refused"
    assert handed_over <= 2, f"{handed_over} thread hand-overs for 60 requests"
