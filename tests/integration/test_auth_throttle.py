"""Limits that stop attackers, not neighbours (issue 18): the API's authentication throttle.

One client address stands for everyone behind a NAT, a proxy or a carrier gateway: its
failures must not lock the honest callers there out, while failures stay counted and limited
per address and per API key. And the limits slide: no double allowance at a window boundary.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from apifixture import Built, build_api, mint

from iotvault.accounts import create_api_key
from iotvault.api.ratelimit import RateLimiter
from iotvault.domain.accounts import Roles

pytestmark = pytest.mark.integration

NAT = ("203.0.113.7", 40000)  # the shared address
ELSEWHERE = ("198.51.100.9", 40000)


@asynccontextmanager
async def clients(built: Built) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    nat = httpx.AsyncClient(transport=httpx.ASGITransport(app=built.app, client=NAT), base_url="http://t")
    other = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=built.app, client=ELSEWHERE), base_url="http://t"
    )
    async with nat, other:
        yield nat, other


def _basic(key: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:{password}".encode()).decode()}


async def test_failures_from_an_address_do_not_lock_out_its_honest_callers(tmp_path: Path) -> None:
    built = build_api(tmp_path, limits=("100000/minute", "100000/minute", "5/minute"))
    try:
        key = create_api_key(built.ctx, roles=Roles(reader=True), devices=["d1"], created_by="test")
        async with clients(built) as (nat, _other):
            bad = {"Authorization": "Bearer nope"}
            codes = [(await nat.get("/iotf/devices", headers=bad)).status_code for _ in range(8)]
            assert codes[:5] == [401] * 5
            assert codes[5:] == [429] * 3  # the address is throttled for failures ...
            r = await nat.get("/iotf/devices", headers=bad)
            assert r.status_code == 429
            assert int(r.headers["retry-after"]) >= 1
            # ... yet its honest callers, with valid credentials, are served
            alice = {"Authorization": f"Bearer {mint(built.key, 'alice')}"}
            assert (await nat.get("/iotf/devices", headers=alice)).status_code == 200
            assert (await nat.get("/iotf/devices", headers=_basic(key.key, key.password))).status_code == 200
            # and a wrong password from there is still refused as throttled, not verified as 401
            assert (await nat.get("/iotf/devices", headers=_basic(key.key, "wrong"))).status_code == 429
    finally:
        built.ctx.close()


async def test_an_api_key_attacked_from_a_throttled_address_is_not_checked_there(tmp_path: Path) -> None:
    built = build_api(tmp_path, limits=("100000/minute", "100000/minute", "5/minute"))
    try:
        key = create_api_key(built.ctx, roles=Roles(reader=True), devices=["d1"], created_by="test")
        good, wrong = _basic(key.key, key.password), _basic(key.key, "guess")
        async with clients(built) as (nat, other):
            codes = [(await nat.get("/iotf/devices", headers=wrong)).status_code for _ in range(7)]
            assert codes[:5] == [401] * 5
            assert codes[5:] == [429, 429]
            # address and key both over their limit: refused before any password hash
            started = time.perf_counter()
            r = await nat.get("/iotf/devices", headers=good)
            assert r.status_code == 429
            assert int(r.headers["retry-after"]) >= 1
            assert time.perf_counter() - started < 0.05  # an argon2 check takes far longer
            # the key's owner elsewhere is not locked out by the attacker's failures
            assert (await other.get("/iotf/devices", headers=good)).status_code == 200
    finally:
        built.ctx.close()


async def test_limits_slide_instead_of_resetting_at_a_window_boundary() -> None:
    limiter = RateLimiter(per_address="10/2 seconds", per_principal="10/2 seconds", auth_failures="10/minute")
    await asyncio.sleep(2 - time.time() % 2 + 0.05)  # 0.05 s into a 2 s window of the clock
    assert await limiter.hit_principal("p") is None  # a fixed window would open here ...
    assert await limiter.hit_address("a") is None
    await asyncio.sleep(1.85)
    for _ in range(9):  # ... the limit reached at its end ...
        assert await limiter.hit_principal("p") is None
        assert await limiter.hit_address("a") is None
    await asyncio.sleep(0.2)  # ... and it would reset here, letting 10 more through at once
    principal = [await limiter.hit_principal("p") for _ in range(10)]
    address = [await limiter.hit_address("a") for _ in range(10)]
    assert sum(r is None for r in principal) <= 1  # moving window: only the first hit expired
    assert sum(r is None for r in address) <= 1  # sliding counter: 95% of the last window counts
    await limiter.close()
