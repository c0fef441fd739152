"""The key ring: per-device data keys, wrapped by the master key, cached unwrapped.

Each device has numbered data keys (versions 1, 2, …); the newest one encrypts, any existing
one decrypts, because every record names its key version in its header. ``iotvault keys
rotate`` adds a new version for every device while iotvault runs: the ingest path learns of it
within ``key_cache_ttl_s`` and until then keeps encrypting with the previous version, which is
still valid, so rotation needs no downtime. Deleting a device deletes its keys, after which its
records (in backups too) cannot be decrypted: crypto-shredding.

The store it reads is any :class:`~iotvault.storage.repository.KeyStore`; the ring itself does
no SQL.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from iotvault.crypto.cipher import decrypt_event, encrypt_event, record_key_version
from iotvault.crypto.keycache import DataKeyCache
from iotvault.crypto.master_key import MasterKey, generate_data_key
from iotvault.errors import DataKeyNotFoundError
from iotvault.storage.repository import KeyStore

FINGERPRINT_META = "master_key_fingerprint"


class KeyRing:
    def __init__(self, master: MasterKey, store: KeyStore, *, cache_ttl_s: float = 5.0) -> None:
        self._master = master
        self._store = store
        self._ttl = cache_ttl_s
        self._cache = DataKeyCache()

    # ---- key management --------------------------------------------------------------
    def new_device_key(self, device_id: str, version: int = 1) -> bytes:
        """A fresh data key for *device_id*, wrapped by the master key, ready to store."""
        return self._master.wrap_data_key(device_id, version, generate_data_key())

    def rotate(self, device_id: str) -> int:
        """Add the next key version of *device_id*; return it."""
        latest = self._store.latest_data_key(device_id)
        version = (latest[0] if latest else 0) + 1
        self._store.add_data_key(device_id, version, self.new_device_key(device_id, version))
        self._cache.forget_device(device_id)
        return version

    def forget(self, device_id: str) -> None:
        self._cache.forget_device(device_id)

    # ---- use -------------------------------------------------------------------------
    def _aead(self, device_id: str, version: int, wrapped: bytes) -> AESGCM:
        aead = AESGCM(self._master.unwrap_data_key(device_id, version, wrapped))
        self._cache.put(device_id, version, aead)
        return aead

    def current(self, device_id: str) -> tuple[int, AESGCM]:
        hit = self._cache.current(device_id)
        if hit is not None:
            return hit
        latest = self._store.latest_data_key(device_id)
        if latest is None:
            raise DataKeyNotFoundError(device_id)
        version, wrapped = latest
        aead = self._cache.get(device_id, version) or self._aead(device_id, version, wrapped)
        self._cache.set_current(device_id, version, aead, ttl_seconds=self._ttl)
        return version, aead

    def for_version(self, device_id: str) -> Callable[[int], AESGCM]:
        def lookup(version: int) -> AESGCM:
            hit = self._cache.get(device_id, version)
            if hit is not None:
                return hit
            wrapped = self._store.data_keys(device_id).get(version)
            if wrapped is None:
                raise DataKeyNotFoundError(device_id, version)
            return self._aead(device_id, version, wrapped)

        return lookup

    def encrypt(self, device_id: str, event_id: str, plaintext: bytes) -> bytes:
        version, aead = self.current(device_id)
        return encrypt_event(
            aead, device_id=device_id, event_id=event_id, key_version=version, plaintext=plaintext
        )

    def decrypt(self, device_id: str, event_id: str, record: bytes) -> bytes:
        return decrypt_event(
            self.for_version(device_id), device_id=device_id, event_id=event_id, record=record
        )

    def needs_reencrypt(self, device_id: str, event_id: str, record: bytes) -> bool:
        current, _ = self.current(device_id)
        return record_key_version(record, device_id=device_id, event_id=event_id) != current


def now_us() -> int:
    return time.time_ns() // 1000
