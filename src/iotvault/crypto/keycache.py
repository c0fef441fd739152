"""A bounded, thread-safe cache of unwrapped data keys.

Unwrapping a data key costs a database read and an AES-GCM call; caching the ready AES-GCM
object keeps ingest and reads at one AES-GCM call per event. The cache is an LRU with a hard
bound so that a fleet larger than memory cannot exhaust it.

Two kinds of entry, with different lifetimes:

* ``(device_id, version) -> key``: the key of a given version never changes, so these entries
  stay until evicted, or until :meth:`DataKeyCache.forget_device` when the device is deleted
  (crypto-shredding must not leave the key alive in memory).
* ``device_id -> current version``: this does change when an operator runs ``keys rotate``,
  possibly in another process, so it expires after a ttl and the caller looks it up again.
  The ttl is the longest a running ingest keeps sealing with the old version after a
  rotation, or with a deleted device's key after a deletion made by another process.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class DataKeyCache:
    """LRU cache of AES-GCM objects keyed by ``(device_id, version)``, plus current versions.

    ``clock`` is injectable so that tests can move time; it must be monotonic, because a
    wall clock stepped backwards would keep a stale current version alive.
    """

    def __init__(self, max_entries: int = 100_000, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: OrderedDict[tuple[str, int], AESGCM] = OrderedDict()
        # Which versions each device has in _keys, so forget_device need not scan everything.
        self._versions: dict[str, set[int]] = {}
        self._current: OrderedDict[str, tuple[int, AESGCM, float]] = OrderedDict()

    def get(self, device_id: str, version: int) -> AESGCM | None:
        key = (device_id, version)
        with self._lock:
            aead = self._keys.get(key)
            if aead is not None:
                self._keys.move_to_end(key)
            return aead

    def put(self, device_id: str, version: int, aead: AESGCM) -> None:
        with self._lock:
            self._put_locked(device_id, version, aead)

    def current(self, device_id: str) -> tuple[int, AESGCM] | None:
        """The version new events of the device are sealed with, unless its ttl has run out."""
        now = self._clock()
        with self._lock:
            entry = self._current.get(device_id)
            if entry is None:
                return None
            version, aead, expires_at = entry
            if now >= expires_at:
                del self._current[device_id]
                return None
            self._current.move_to_end(device_id)
            return version, aead

    def set_current(self, device_id: str, version: int, aead: AESGCM, *, ttl_seconds: float) -> None:
        """Record the device's current version; the key is also cached under its version.

        Caching it under its version as well means events just sealed with it decrypt without
        another unwrap.
        """
        if not (ttl_seconds >= 0 and math.isfinite(ttl_seconds)):
            raise ValueError(f"ttl_seconds must be a finite number >= 0, got {ttl_seconds}")
        expires_at = self._clock() + ttl_seconds
        with self._lock:
            self._put_locked(device_id, version, aead)
            self._current[device_id] = (version, aead, expires_at)
            self._current.move_to_end(device_id)
            if len(self._current) > self._max_entries:
                self._current.popitem(last=False)

    def forget_device(self, device_id: str) -> None:
        """Drop every key of the device, so a deleted device's key does not outlive it here."""
        with self._lock:
            for version in self._versions.pop(device_id, ()):
                del self._keys[(device_id, version)]
            self._current.pop(device_id, None)

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()
            self._versions.clear()
            self._current.clear()

    def __len__(self) -> int:
        """The number of ``(device_id, version)`` keys held; current-version pointers aside."""
        with self._lock:
            return len(self._keys)

    def __repr__(self) -> str:
        # Never the keys themselves: only how full the cache is.
        return f"<DataKeyCache {len(self)}/{self._max_entries} keys>"

    def _put_locked(self, device_id: str, version: int, aead: AESGCM) -> None:
        key = (device_id, version)
        self._keys[key] = aead
        self._keys.move_to_end(key)
        self._versions.setdefault(device_id, set()).add(version)
        if len(self._keys) > self._max_entries:
            (old_device, old_version), _ = self._keys.popitem(last=False)
            versions = self._versions[old_device]
            versions.discard(old_version)
            if not versions:
                del self._versions[old_device]
