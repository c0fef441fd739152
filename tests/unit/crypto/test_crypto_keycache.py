"""The data key cache: FIFO bound, lock-free hits, crypto-shredding, expiry of the current version."""

from __future__ import annotations

import threading

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from iotvault.crypto import DataKeyCache, generate_data_key
from iotvault.crypto.cipher import MAX_KEY_VERSION, key_version_bytes


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def new_aead() -> AESGCM:
    return AESGCM(generate_data_key())


V1 = key_version_bytes(1)


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


def test_oldest_entry_is_evicted_and_hits_do_not_reorder() -> None:
    # First in, first out (see the module docstring): a hit is a lock-free read, no reordering.
    cache = DataKeyCache(max_entries=2)
    a, b, c = new_aead(), new_aead(), new_aead()
    cache.put("a", 1, a)
    cache.put("b", 1, b)
    assert cache.get("a", 1) is a
    assert cache.cached_key(("a", V1)) is a
    cache.put("c", 1, c)
    assert len(cache) == 2
    assert cache.get("a", 1) is None
    assert cache.get("b", 1) is b
    assert cache.get("c", 1) is c


def test_putting_an_entry_again_moves_it_to_the_back() -> None:
    cache = DataKeyCache(max_entries=2)
    a, b, c = new_aead(), new_aead(), new_aead()
    cache.put("a", 1, a)
    cache.put("b", 1, b)
    cache.put("a", 1, a)
    cache.put("c", 1, c)
    assert cache.get("b", 1) is None
    assert cache.get("a", 1) is a
    assert cache.get("c", 1) is c


def test_renewing_the_current_version_moves_its_key_to_the_back() -> None:
    clock = FakeClock()
    cache = DataKeyCache(max_entries=2, clock=clock)
    a, b, c = new_aead(), new_aead(), new_aead()
    cache.set_current("a", 1, a, ttl_seconds=5)
    cache.set_current("b", 1, b, ttl_seconds=5)
    clock.now += 5
    cache.set_current("a", 1, a, ttl_seconds=5)  # what a sealing key ring does when the ttl runs out
    cache.set_current("c", 1, c, ttl_seconds=5)
    assert cache.get("b", 1) is None
    assert cache.current("b") is None
    assert cache.get("a", 1) is a
    assert cache.current("a") == (1, a)
    assert cache.current("c") == (1, c)


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


def test_bound_holds_when_hits_come_between_puts() -> None:
    cache = DataKeyCache(max_entries=5)
    aead = new_aead()
    for i in range(50):
        cache.put(f"d{i % 9}", i % 4, aead)
        assert cache.get(f"d{(i + 3) % 9}", (i + 1) % 4) in (aead, None)
        assert len(cache) <= 5
    for i in range(9):
        cache.forget_device(f"d{i}")
    assert len(cache) == 0


def test_forget_device_after_a_lock_free_hit() -> None:
    clock = FakeClock()
    cache = DataKeyCache(clock=clock)
    aead = new_aead()
    cache.set_current("d", 1, aead, ttl_seconds=60)
    assert cache.cached_key(("d", V1)) is aead
    key = cache.sealing_key("d")
    assert key is not None
    assert key.aead is aead
    cache.forget_device("d")
    assert cache.cached_key(("d", V1)) is None
    assert cache.current_entry("d") is None
    assert cache.sealing_key("d") is None
    assert cache.get("d", 1) is None


def test_a_key_loaded_before_a_forget_is_not_cached() -> None:
    cache = DataKeyCache()
    aead = new_aead()
    before = cache.generation
    cache.forget_device("other")  # any forget: the loader cannot tell whose key it read
    cache.put("d", 1, aead, generation=before)
    assert cache.get("d", 1) is None
    entry = cache.set_current("d", 1, aead, ttl_seconds=60, generation=before)
    assert entry[0].aead is aead  # the caller may still seal the one event it loaded the key for
    assert cache.current("d") is None
    assert len(cache) == 0
    cache.put("d", 1, aead, generation=cache.generation)
    assert cache.get("d", 1) is aead


def test_clear_changes_the_generation_too() -> None:
    cache = DataKeyCache()
    before = cache.generation
    cache.clear()
    cache.put("d", 1, new_aead(), generation=before)
    assert len(cache) == 0


def test_sealing_key_expires_after_its_ttl_but_the_raw_entry_stays() -> None:
    clock = FakeClock()
    cache = DataKeyCache(clock=clock)
    aead = new_aead()
    cache.set_current("d", 7, aead, ttl_seconds=5)
    clock.now += 4.999
    key = cache.sealing_key("d")
    assert key is not None
    assert (key.version, key.aead) == (7, aead)
    clock.now += 0.001
    assert cache.sealing_key("d") is None
    # The lock-free entry is handed out expired or not; its reader compares the expiry itself.
    entry = cache.current_entry("d")
    assert entry is not None
    assert entry[0] == key
    assert entry[1] <= clock.now


def test_current_version_is_bound_to_its_device() -> None:
    aead = new_aead()
    key, _expires_at = DataKeyCache().set_current("dev-1", 258, aead, ttl_seconds=60)
    assert key.header == b"\x01\x00\x00\x01\x02"
    assert key.aad_prefix == b"iotvault/event/v1\x00dev-1\x00"
    assert key.aad_suffix == b"\x00\x00\x00\x01\x02"
    assert (key.aead, key.version) == (aead, 258)


@pytest.mark.parametrize("version", [-1, MAX_KEY_VERSION + 1])
def test_key_version_out_of_range_is_refused(version: int) -> None:
    cache = DataKeyCache()
    with pytest.raises(ValueError, match="key_version"):
        cache.put("d", version, new_aead())
    with pytest.raises(ValueError, match="key_version"):
        cache.set_current("d", version, new_aead(), ttl_seconds=60)
    assert cache.get("d", version) is None
    assert len(cache) == 0


def test_lock_free_reads_during_changes_see_whole_entries() -> None:
    cache = DataKeyCache(max_entries=16)
    aeads = [new_aead() for _ in range(4)]
    devices = [f"d{i}" for i in range(24)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        try:
            for i in range(3000):
                device = devices[(seed * 7 + i) % len(devices)]
                cache.put(device, i % 3, aeads[i % 4])
                if i % 5 == 0:
                    cache.set_current(device, i % 3, aeads[i % 4], ttl_seconds=60)
                if i % 11 == 0:
                    cache.forget_device(device)
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread below
            errors.append(exc)

    def reader() -> None:
        try:
            while not stop.is_set():
                for device in devices:
                    for version in range(3):
                        hit = cache.cached_key((device, key_version_bytes(version)))
                        assert hit is None or hit in aeads
                    key = cache.sealing_key(device)
                    assert key is None or (key.aead in aeads and 0 <= key.version < 3)
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread below
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    readers = [threading.Thread(target=reader) for _ in range(4)]
    for thread in writers + readers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in readers:
        thread.join()
    assert errors == []
    assert len(cache) <= 16
    for device in devices:
        cache.forget_device(device)
        assert cache.sealing_key(device) is None
    assert len(cache) == 0
