"""The data key cache: LRU bound, crypto-shredding, and expiry of the current version."""

from __future__ import annotations

import threading

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from iotvault.crypto import DataKeyCache, generate_data_key


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def new_aead() -> AESGCM:
    return AESGCM(generate_data_key())


def test_get_returns_what_was_put() -> None:
    cache = DataKeyCache()
    aead = new_aead()
    cache.put("d", 1, aead)
    assert cache.get("d", 1) is aead
    assert cache.get("d", 2) is None
    assert cache.get("other", 1) is None
    assert len(cache) == 1


def test_put_replaces_the_same_entry() -> None:
    cache = DataKeyCache()
    first, second = new_aead(), new_aead()
    cache.put("d", 1, first)
    cache.put("d", 1, second)
    assert cache.get("d", 1) is second
    assert len(cache) == 1


def test_least_recently_used_entry_is_evicted() -> None:
    cache = DataKeyCache(max_entries=2)
    a, b, c = new_aead(), new_aead(), new_aead()
    cache.put("a", 1, a)
    cache.put("b", 1, b)
    assert cache.get("a", 1) is a  # a is now the most recently used
    cache.put("c", 1, c)
    assert len(cache) == 2
    assert cache.get("b", 1) is None
    assert cache.get("a", 1) is a
    assert cache.get("c", 1) is c


def test_bound_holds_under_many_puts() -> None:
    cache = DataKeyCache(max_entries=10)
    aead = new_aead()
    for i in range(100):
        cache.put(f"d{i}", i, aead)
    assert len(cache) == 10
    assert all(cache.get(f"d{i}", i) is aead for i in range(90, 100))
    assert all(cache.get(f"d{i}", i) is None for i in range(90))


def test_evicted_entries_do_not_confuse_forget_device() -> None:
    cache = DataKeyCache(max_entries=2)
    cache.put("a", 1, new_aead())
    cache.put("a", 2, new_aead())
    cache.put("b", 1, new_aead())  # evicts ("a", 1)
    cache.forget_device("a")
    assert cache.get("a", 2) is None
    assert cache.get("b", 1) is not None
    assert len(cache) == 1


def test_forget_device_drops_every_version_and_the_current_one() -> None:
    cache = DataKeyCache()
    kept = new_aead()
    cache.put("d", 1, new_aead())
    cache.put("d", 2, new_aead())
    cache.set_current("d", 3, new_aead(), ttl_seconds=60)
    cache.put("other", 1, kept)
    cache.forget_device("d")
    assert cache.get("d", 1) is None
    assert cache.get("d", 2) is None
    assert cache.get("d", 3) is None
    assert cache.current("d") is None
    assert cache.get("other", 1) is kept
    assert len(cache) == 1
    cache.forget_device("never-seen")
    assert len(cache) == 1


def test_clear_empties_everything() -> None:
    cache = DataKeyCache()
    cache.put("d", 1, new_aead())
    cache.set_current("e", 1, new_aead(), ttl_seconds=60)
    cache.clear()
    assert len(cache) == 0
    assert cache.get("d", 1) is None
    assert cache.current("e") is None


def test_current_is_also_cached_by_version() -> None:
    cache = DataKeyCache()
    aead = new_aead()
    cache.set_current("d", 4, aead, ttl_seconds=60)
    assert cache.current("d") == (4, aead)
    assert cache.get("d", 4) is aead


def test_current_expires_after_its_ttl() -> None:
    clock = FakeClock()
    cache = DataKeyCache(clock=clock)
    aead = new_aead()
    cache.set_current("d", 1, aead, ttl_seconds=5)
    clock.now += 4.999
    assert cache.current("d") == (1, aead)
    clock.now += 0.001
    assert cache.current("d") is None
    # The version's key itself does not change with rotation, so it stays cached.
    assert cache.get("d", 1) is aead


def test_rotation_is_noticed_once_the_ttl_runs_out() -> None:
    clock = FakeClock()
    cache = DataKeyCache(clock=clock)
    old, new = new_aead(), new_aead()
    cache.set_current("d", 1, old, ttl_seconds=5)
    clock.now += 6
    assert cache.current("d") is None
    cache.set_current("d", 2, new, ttl_seconds=5)
    assert cache.current("d") == (2, new)
    assert cache.get("d", 1) is old


def test_default_clock_expires_a_zero_ttl() -> None:
    cache = DataKeyCache()
    cache.set_current("d", 1, new_aead(), ttl_seconds=0)
    assert cache.current("d") is None


def test_current_entries_are_bounded_too() -> None:
    cache = DataKeyCache(max_entries=2)
    aead = new_aead()
    for device in ("a", "b", "c"):
        cache.set_current(device, 1, aead, ttl_seconds=60)
    assert cache.current("a") is None
    assert cache.current("b") == (1, aead)
    assert cache.current("c") == (1, aead)


@pytest.mark.parametrize("ttl", [-1.0, float("nan"), float("inf")])
def test_invalid_ttl_is_refused(ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl_seconds"):
        DataKeyCache().set_current("d", 1, new_aead(), ttl_seconds=ttl)


def test_empty_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        DataKeyCache(max_entries=0)


def test_repr_shows_no_key() -> None:
    key = generate_data_key()
    cache = DataKeyCache()
    cache.put("d", 1, AESGCM(key))
    assert key.hex() not in repr(cache)
    assert "1/100000" in repr(cache)


def test_concurrent_use_keeps_the_cache_consistent() -> None:
    cache = DataKeyCache(max_entries=50)
    aead = new_aead()
    devices = [f"d{i}" for i in range(20)]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(2000):
                device = devices[(seed + i) % len(devices)]
                cache.put(device, i % 7, aead)
                cache.get(device, (i + 1) % 7)
                if i % 97 == 0:
                    cache.forget_device(device)
                if i % 13 == 0:
                    cache.set_current(device, i % 7, aead, ttl_seconds=60)
                    cache.current(device)
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(cache) <= 50
    for device in devices:
        cache.forget_device(device)
    # Every remaining entry was reachable through the per-device index.
    assert len(cache) == 0
