"""The key ring's per-event path: same records as the record functions, the cache's ttl,
crypto-shredding after lock-free hits, and many threads at once."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence

import pytest

from iotvault.crypto import DataKeyCache, MasterKey, decrypt_event, encrypt_event, record_key_version
from iotvault.crypto.cipher import seal_record
from iotvault.crypto.keyring import KeyRing
from iotvault.errors import DataKeyNotFoundError, RecordDecryptionError

MASTER = MasterKey.from_bytes(bytes(range(32)))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class VersionTakenError(Exception):
    """What the database says when two rotations of one device race for the same version."""


class MemoryKeyStore:
    """A :class:`~iotvault.crypto.keyring.KeyStore` in a dict, counting its reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.keys: dict[str, dict[int, bytes]] = {}
        self.reads = 0
        self.bulk: list[list[str]] = []  # the devices of each bulk read
        #: Runs inside data_keys(), between the read and the return: a concurrent deletion.
        self.during_read: Callable[[str], None] | None = None

    def data_keys(self, device_id: str) -> dict[int, bytes]:
        with self._lock:
            self.reads += 1
            found = dict(self.keys.get(device_id, {}))
        if self.during_read is not None:
            self.during_read(device_id)
        return found

    def latest_data_key(self, device_id: str) -> tuple[int, bytes] | None:
        with self._lock:
            self.reads += 1
            versions = self.keys.get(device_id)
            if not versions:
                return None
            latest = max(versions)
            return latest, versions[latest]

    def latest_data_keys(self, device_ids: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        with self._lock:
            self.reads += 1
            self.bulk.append(list(device_ids))
            return {d: (max(v), v[max(v)]) for d in device_ids if (v := self.keys.get(d))}

    def add_data_key(self, device_id: str, version: int, wrapped: bytes) -> None:
        with self._lock:
            versions = self.keys.setdefault(device_id, {})
            if version in versions:  # the primary key (device_id, version) of the real table
                raise VersionTakenError(device_id, version)
            versions[version] = wrapped

    def delete_device(self, device_id: str) -> None:
        with self._lock:
            self.keys.pop(device_id, None)

    def device_ids(self) -> list[str]:
        with self._lock:
            return sorted(self.keys)


def new_ring(
    *devices: str, ttl: float = 5.0, cache: DataKeyCache | None = None
) -> tuple[KeyRing, MemoryKeyStore]:
    store = MemoryKeyStore()
    ring = KeyRing(MASTER, store, cache_ttl_s=ttl, cache=cache)
    for device in devices:
        store.add_data_key(device, 1, ring.new_device_key(device, 1))
    return ring, store


def test_round_trip() -> None:
    ring, _ = new_ring("d")
    record = ring.encrypt("d", "e1", b"payload")
    assert ring.decrypt("d", "e1", record) == b"payload"
    assert record_key_version(record) == 1


def test_records_are_those_of_the_record_functions() -> None:
    # Both ways: existing databases (sealed by encrypt_event) keep opening, and the reverse.
    ring, _ = new_ring("d")
    version, aead = ring.current("d")
    sealed_by_ring = ring.encrypt("d", "e1", b"one")
    sealed_by_function = encrypt_event(
        aead, device_id="d", event_id="e2", key_version=version, plaintext=b"two"
    )
    assert decrypt_event(ring.for_version("d"), device_id="d", event_id="e1", record=sealed_by_ring) == b"one"
    assert ring.decrypt("d", "e2", sealed_by_function) == b"two"
    assert sealed_by_ring[:5] == sealed_by_function[:5] == b"\x01\x00\x00\x00\x01"
    assert len(sealed_by_ring) == len(sealed_by_function) == 17 + 3 + 16


def test_a_hit_reads_no_store() -> None:
    ring, store = new_ring("d")
    first = ring.encrypt("d", "e0", b"x")
    reads = store.reads
    for i in range(1, 10):
        assert ring.decrypt("d", f"e{i}", ring.encrypt("d", f"e{i}", b"x")) == b"x"
    assert ring.decrypt("d", "e0", first) == b"x"
    assert store.reads == reads


def test_rotation_elsewhere_is_picked_up_after_the_ttl() -> None:
    clock = FakeClock()
    ring, store = new_ring("d", ttl=5, cache=DataKeyCache(clock=clock))
    old = ring.encrypt("d", "e1", b"old")
    # Another process (`iotvault keys rotate`) adds version 2; this ring's cache does not know.
    store.add_data_key("d", 2, ring.new_device_key("d", 2))
    clock.now = 1004.9
    assert record_key_version(ring.encrypt("d", "e2", b"x")) == 1
    clock.now = 1005.0
    new = ring.encrypt("d", "e3", b"new")
    assert record_key_version(new) == 2
    assert ring.current("d")[0] == 2
    assert ring.decrypt("d", "e1", old) == b"old"
    assert ring.decrypt("d", "e3", new) == b"new"
    assert ring.needs_reencrypt("d", "e1", old)
    assert not ring.needs_reencrypt("d", "e3", new)


def test_rotation_here_is_picked_up_at_once() -> None:
    ring, _ = new_ring("d", ttl=3600)
    old = ring.encrypt("d", "e1", b"old")
    assert ring.rotate("d") == 2
    assert record_key_version(ring.encrypt("d", "e2", b"x")) == 2
    assert ring.decrypt("d", "e1", old) == b"old"


def test_forget_after_lock_free_hits_makes_the_keys_unreachable() -> None:
    ring, store = new_ring("d", "other", ttl=3600)
    record = ring.encrypt("d", "e1", b"secret")
    kept = ring.encrypt("other", "e1", b"kept")
    assert ring.decrypt("d", "e1", record) == b"secret"  # both keys now hit without the lock
    store.delete_device("d")
    ring.forget("d")  # what devices.delete_device does after deleting the rows
    with pytest.raises(DataKeyNotFoundError) as info:
        ring.decrypt("d", "e1", record)
    assert info.value.version == 1
    with pytest.raises(DataKeyNotFoundError):
        ring.encrypt("d", "e2", b"x")
    assert ring.decrypt("other", "e1", kept) == b"kept"


def test_a_key_read_just_before_a_deletion_is_not_cached() -> None:
    ring, store = new_ring("d")
    record = ring.encrypt("d", "e1", b"secret")
    ring.forget("d")  # a cold cache: the next decryption reads the store

    def delete_meanwhile(device_id: str) -> None:
        store.during_read = None
        store.delete_device(device_id)
        ring.forget(device_id)

    store.during_read = delete_meanwhile
    # The read began before the deletion: this one event may still open...
    assert ring.decrypt("d", "e1", record) == b"secret"
    # ...but the key must not have gone back into the cache after the forget.
    with pytest.raises(DataKeyNotFoundError):
        ring.decrypt("d", "e1", record)


def test_a_sealing_key_seals_what_encrypt_seals_with_a_fresh_nonce_each() -> None:
    # what ingest does for a batch: one sealing key per device, then seal_record per event
    clock = FakeClock()
    ring, store = new_ring("d", ttl=5, cache=DataKeyCache(clock=clock))
    key = ring.sealing_key("d")
    records = [seal_record(key, f"e{i}", b"same") for i in range(3)]
    assert [ring.decrypt("d", f"e{i}", r) for i, r in enumerate(records)] == [b"same"] * 3
    assert len({r[5:17] for r in records}) == 3  # a nonce of its own for every record
    assert records[0][:5] == ring.encrypt("d", "e9", b"x")[:5]
    # the ttl and rotation hold for it as for encrypt
    store.add_data_key("d", 2, ring.new_device_key("d", 2))
    assert ring.sealing_key("d").version == 1
    clock.now = 1005.0
    assert ring.sealing_key("d").version == 2
    with pytest.raises(DataKeyNotFoundError):
        ring.sealing_key("nobody")
    ring.forget("d")
    store.delete_device("d")
    with pytest.raises(DataKeyNotFoundError):
        ring.sealing_key("d")


def test_missing_keys_raise_data_key_not_found() -> None:
    ring, _ = new_ring("d")
    with pytest.raises(DataKeyNotFoundError) as info:
        ring.encrypt("nobody", "e1", b"x")
    assert info.value.device_id == "nobody"
    relabelled = bytearray(ring.encrypt("d", "e1", b"x"))
    relabelled[1:5] = (9).to_bytes(4, "big")
    with pytest.raises(DataKeyNotFoundError) as info:
        ring.decrypt("d", "e1", bytes(relabelled))
    assert info.value.version == 9
    with pytest.raises(DataKeyNotFoundError):
        ring.for_version("d")(-1)


def test_bad_records_raise_record_decryption_error_without_a_store_read() -> None:
    ring, store = new_ring("d")
    record = ring.encrypt("d", "e1", b"payload")
    reads = store.reads
    with pytest.raises(RecordDecryptionError, match="truncated"):
        ring.decrypt("d", "e1", record[:32])
    with pytest.raises(RecordDecryptionError, match="unknown record format 0x02"):
        ring.decrypt("d", "e1", b"\x02" + record[1:])
    assert store.reads == reads
    with pytest.raises(RecordDecryptionError, match="authentication failed"):
        ring.decrypt("d", "e2", record)
    flipped = bytearray(record)
    flipped[-1] ^= 1
    with pytest.raises(RecordDecryptionError, match="authentication failed"):
        ring.decrypt("d", "e1", bytes(flipped))


def test_nul_in_ids_is_refused_on_seal() -> None:
    ring, store = new_ring("d")
    with pytest.raises(ValueError, match="NUL"):
        ring.encrypt("d", "e\x001", b"x")
    # Device ids are validated at the edge; the cipher refuses NUL all the same.
    store.add_data_key("a\x00b", 1, ring.new_device_key("a\x00b", 1))
    with pytest.raises(ValueError, match="NUL"):
        ring.encrypt("a\x00b", "e1", b"x")


def test_zero_ttl_still_seals() -> None:
    ring, store = new_ring("d", ttl=0)
    record = ring.encrypt("d", "e1", b"x")
    reads = store.reads
    ring.encrypt("d", "e2", b"x")
    assert store.reads == reads + 1  # each seal asks the store again
    assert ring.decrypt("d", "e1", record) == b"x"


def test_many_threads_seal_open_forget_and_rotate() -> None:
    devices = [f"d{i}" for i in range(12)]
    ring, _ = new_ring(*devices, ttl=0.001, cache=DataKeyCache(max_entries=8))
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(400):
                device = devices[(seed * 5 + i) % len(devices)]
                event = f"e{seed}-{i}"
                payload = event.encode()
                record = ring.encrypt(device, event, payload)
                if i % 17 == 0:
                    ring.forget(devices[(seed + i) % len(devices)])
                if i % 101 == seed:
                    with contextlib.suppress(VersionTakenError):  # another thread rotated it first
                        ring.rotate(device)
                assert ring.decrypt(device, event, record) == payload
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_a_refresh_reads_the_keys_due_in_one_read_and_they_run_out_together() -> None:
    clock = FakeClock()
    ring, store = new_ring("a", "b", "c", ttl=10, cache=DataKeyCache(clock=clock))
    ring.sealing_key("a")  # cached until 1010
    store.reads = 0
    clock.now = 1002.0
    ring.refresh_sealing_keys(["a", "b", "c", "gone"])  # a has 8 s left: not due
    assert store.bulk == [["b", "c", "gone"]]
    assert store.reads == 1
    ring.rotate("b")  # here: forgotten at once, read again at the next refresh
    clock.now = 1006.0  # a has 4 s left (< half the ttl), c 6 s
    ring.refresh_sealing_keys(["a", "b", "c"])
    assert store.bulk[1] == ["a", "b"]
    assert ring.current("b")[0] == 2
    assert store.reads == 3  # the rotation's own read, the refresh
    for d in ("a", "b", "c"):  # sealing finds them cached: no read one by one
        ring.sealing_key(d)
    assert store.reads == 3
    assert ring.decrypt("b", "e1", ring.encrypt("b", "e1", b"x")) == b"x"
    with pytest.raises(DataKeyNotFoundError):
        ring.sealing_key("gone")  # a device without keys is refused as before


def test_a_refresh_with_a_ttl_of_zero_reads_nothing() -> None:
    ring, store = new_ring("a", ttl=0)
    ring.refresh_sealing_keys(["a"])
    assert store.reads == 0
    assert store.bulk == []
