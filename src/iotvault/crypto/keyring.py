"""The key ring: per-device data keys, wrapped by the master key, cached unwrapped.

Each device has numbered data keys (versions 1, 2, …); the newest one encrypts, any existing
one decrypts, because every record names its key version in its header. ``iotvault keys
rotate`` adds a new version for every device while iotvault runs: the ingest path learns of it
within ``key_cache_ttl_s`` and until then keeps encrypting with the previous version, which is
still valid, so rotation needs no downtime. Deleting a device deletes its keys, after which its
records (in backups too) cannot be decrypted: crypto-shredding.

The store it reads is any :class:`KeyStore`, declared here beside its one user so that crypto
imports nothing of storage (:class:`~iotvault.storage.sql.SqlStore` is one); the ring itself
does no SQL.

:meth:`KeyRing.encrypt` and :meth:`KeyRing.decrypt` run once per event, so on a cache hit they
do no more than one lock-free cache lookup (see :mod:`.keycache`) and one call to the positional
record functions of :mod:`.cipher`, which stay the only definition of the format. Misses go to
the store and are rare: once per device and ttl for sealing, once per device and version for
opening. Ingest seals a batch: it asks :meth:`KeyRing.sealing_key` once per device and batch and
calls :func:`~iotvault.crypto.cipher.seal_record` per event, each with a fresh nonce.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from iotvault.crypto.cipher import SealingKey, open_record, record_key_version, seal_record
from iotvault.crypto.keycache import CurrentKey, DataKeyCache
from iotvault.crypto.master_key import MasterKey, generate_data_key
from iotvault.errors import DataKeyNotFoundError

FINGERPRINT_META = "master_key_fingerprint"


class KeyStore(Protocol):
    """The wrapped data keys of each device, by version: what the ring asks of storage."""

    def data_keys(self, device_id: str) -> dict[int, bytes]: ...
    def latest_data_key(self, device_id: str) -> tuple[int, bytes] | None: ...
    def latest_data_keys(self, device_ids: Sequence[str]) -> dict[str, tuple[int, bytes]]: ...
    def add_data_key(self, device_id: str, version: int, wrapped: bytes) -> None: ...
    def device_ids(self) -> list[str]: ...


class KeyRing:
    """Seals and opens event records with the right data key of each device.

    ``cache`` is injectable so that tests can give it a clock of their own.
    """

    def __init__(
        self,
        master: MasterKey,
        store: KeyStore,
        *,
        cache_ttl_s: float = 5.0,
        cache: DataKeyCache | None = None,
    ) -> None:
        self._master = master
        self._store = store
        self._ttl = cache_ttl_s
        self._cache = DataKeyCache() if cache is None else cache
        # The per-event path reads these through instance attributes, bound once.
        self._current_entry = self._cache.current_entry
        self._cached_key = self._cache.cached_key
        self._clock = self._cache.clock
        self._load_for_record = self._load
        # set by a node whose deletions must reach other nodes' caches (iotvault.fanout)
        self.on_forget: Callable[[str], None] | None = None

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
        """Drop the device's unwrapped keys here, and (``on_forget``) on every other node."""
        self._cache.forget_device(device_id)
        if self.on_forget is not None:
            self.on_forget(device_id)

    def forget_here(self, device_id: str) -> None:
        """Drop the device's unwrapped keys in this process only (another node deleted it)."""
        self._cache.forget_device(device_id)

    # ---- use -------------------------------------------------------------------------
    def current(self, device_id: str) -> tuple[int, AESGCM]:
        key = self._cache.sealing_key(device_id) or self._load_current(device_id)[0]
        return key.version, key.aead

    def for_version(self, device_id: str) -> Callable[[int], AESGCM]:
        def lookup(version: int) -> AESGCM:
            hit = self._cache.get(device_id, version)
            return self._load(device_id, version) if hit is None else hit

        return lookup

    def encrypt(self, device_id: str, event_id: str, plaintext: bytes) -> bytes:
        # DataKeyCache.sealing_key, inlined: this runs once per event.
        entry = self._current_entry(device_id)
        if entry is None or self._clock() >= entry[1]:
            entry = self._load_current(device_id)
        return seal_record(entry[0], event_id, plaintext)

    def sealing_key(self, device_id: str) -> SealingKey:
        """The device's current data key, bound for :func:`~iotvault.crypto.cipher.seal_record`.

        For a caller that seals many events of one device at once (an ingest batch): it asks
        once, then calls ``seal_record`` per event, which draws a fresh nonce from the OS for
        each record as :meth:`encrypt` does. Raises :class:`DataKeyNotFoundError` for a device
        without keys (deleted).
        """
        entry = self._current_entry(device_id)
        if entry is None or self._clock() >= entry[1]:
            entry = self._load_current(device_id)
        return entry[0]

    def refresh_sealing_keys(self, device_ids: Iterable[str]) -> None:
        """Read, in one statement, the current keys of these devices that are not cached or
        whose entry ends within half the ttl, and cache them for the ttl from now.

        For an ingest batch's devices before it is sealed: one by one, each device's key ran
        out on its own and was read on its own (a connection's check-out, the read and its
        rollback: three round trips on PostgreSQL, each waiting for the interpreter lock after),
        ~40 a second for 200 devices. Read early and together, they run out together too. A
        device without a key is left alone: :meth:`sealing_key` says so as before.
        """
        if self._ttl <= 0:
            return
        soon = self._clock() + self._ttl / 2
        due = [d for d in device_ids if (entry := self._current_entry(d)) is None or entry[1] < soon]
        if not due:
            return
        generation = self._cache.generation  # before the read: see DataKeyCache.put
        for device_id, (version, wrapped) in self._store.latest_data_keys(due).items():
            aead = self._cache.get(device_id, version) or AESGCM(
                self._master.unwrap_data_key(device_id, version, wrapped)
            )
            self._cache.set_current(device_id, version, aead, ttl_seconds=self._ttl, generation=generation)

    def decrypt(self, device_id: str, event_id: str, record: bytes) -> bytes:
        return open_record(self._cached_key, self._load_for_record, device_id, event_id, record)

    def needs_reencrypt(self, device_id: str, event_id: str, record: bytes) -> bool:
        current, _ = self.current(device_id)
        return record_key_version(record, device_id=device_id, event_id=event_id) != current

    # ---- cache misses ----------------------------------------------------------------
    def _load(self, device_id: str, version: int) -> AESGCM:
        generation = self._cache.generation  # before the read: see DataKeyCache.put
        wrapped = self._store.data_keys(device_id).get(version)
        if wrapped is None:
            raise DataKeyNotFoundError(device_id, version)
        aead = AESGCM(self._master.unwrap_data_key(device_id, version, wrapped))
        self._cache.put(device_id, version, aead, generation=generation)
        return aead

    def _load_current(self, device_id: str) -> CurrentKey:
        generation = self._cache.generation
        latest = self._store.latest_data_key(device_id)
        if latest is None:
            raise DataKeyNotFoundError(device_id)
        version, wrapped = latest
        aead = self._cache.get(device_id, version) or AESGCM(
            self._master.unwrap_data_key(device_id, version, wrapped)
        )
        return self._cache.set_current(device_id, version, aead, ttl_seconds=self._ttl, generation=generation)
