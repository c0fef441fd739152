"""A bounded, thread-safe cache of unwrapped data keys.

Unwrapping a data key costs a database read and an AES-GCM call; caching the ready AES-GCM
object keeps ingest and reads at one AES-GCM call per event. The cache has a hard bound on its
entries so that a fleet larger than memory cannot exhaust it.

Two kinds of entry, with different lifetimes:

* ``(device_id, version) -> key``: the key of a given version never changes, so these entries
  stay until evicted, or until :meth:`DataKeyCache.forget_device` when the device is deleted
  (crypto-shredding must not leave the key alive in memory).
* ``device_id -> current version``: this does change when an operator runs ``keys rotate``,
  possibly in another process, so it expires after a ttl and the caller looks it up again.
  The ttl is the longest a running ingest keeps sealing with the old version after a
  rotation, or with a deleted device's key after a deletion made by another process. The
  entry holds the key as a :class:`~iotvault.crypto.cipher.SealingKey`, bound to the device
  and version once, so that sealing an event prepares nothing that all its events share.

**Reads take no lock.** Every event looks a key up here, from the ingest writer thread and the
API's worker threads at once, and a lock plus an LRU reordering on every hit were a large part
of what the key ring added to each event. So a hit is one ``dict.get`` (plus a clock read for
the current version), through :attr:`~DataKeyCache.cached_key` and
:attr:`~DataKeyCache.current_entry`, straight into C. Under the GIL a ``get`` is atomic: the
keys are ``str`` or tuples of ``str`` and ``bytes``, whose hashing and comparison run no Python
code that could let another thread in halfway. Every change (put, eviction,
:meth:`~DataKeyCache.forget_device`) still happens under the lock, so writers never interleave,
and a reader sees an entry whole or not at all: replacing an entry assigns the new value over
the old one, it never removes it first. Once ``forget_device`` has returned, no lookup can find
the device's keys; a lookup that got a key just before may finish the one event it is sealing
or opening, exactly as it would have had it taken the lock a moment earlier. A lookup that
*missed* before the forget and is still reading the key store must not put the key back
afterwards: it passes the :attr:`~DataKeyCache.generation` it started from, and
:meth:`~DataKeyCache.put` drops a key loaded before a forget.

**Eviction is first in, first out**, not least recently used: hits do not reorder anything
(that reordering is what needed the lock). A put, and the renewal of a current version when its
ttl runs out, move the entry to the back of the queue, and the oldest entry goes when the
cache is full. In a process that seals, active devices renew their entries every ttl, so
their keys stay near the back; in one that only opens records, keys leave in the order they
came. A key in use that falls out is merely unwrapped again, once: the bound is there to
protect memory, not to tune the hit rate.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from iotvault.crypto.cipher import MAX_KEY_VERSION, SealingKey, bind_key, key_version_bytes

#: ``(key, expires_at)``: what new events of a device are sealed with, believed without asking
#: the key store again while ``clock() < expires_at``.
CurrentKey = tuple[SealingKey, float]


class DataKeyCache:
    """Bounded cache of AES-GCM objects keyed by ``(device_id, version)``, plus current versions.

    ``clock`` is injectable so that tests can move time; it must be monotonic, because a
    wall clock stepped backwards would keep a stale current version alive.
    """

    #: ``cached_key((device_id, version))``: the key of a version, by its 4-byte header form,
    #: or None; the lock-free hit path of :func:`~iotvault.crypto.cipher.open_record`.
    cached_key: Callable[[tuple[str, bytes]], AESGCM | None]
    #: ``current_entry(device_id)``: the device's :data:`CurrentKey` or None, *expired or
    #: not*: the caller compares its ``expires_at`` with :attr:`clock` (see :meth:`sealing_key`).
    current_entry: Callable[[str], CurrentKey | None]

    def __init__(self, max_entries: int = 100_000, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._max_entries = max_entries
        self.clock = clock
        self._lock = threading.Lock()
        # Oldest first. The dicts are never replaced (clear() empties them in place), so the
        # bound methods below stay valid.
        self._keys: OrderedDict[tuple[str, bytes], AESGCM] = OrderedDict()
        self._current: OrderedDict[str, CurrentKey] = OrderedDict()
        # Which versions each device has in _keys, so forget_device need not scan everything.
        self._versions: dict[str, set[bytes]] = {}
        self._generation = 0
        self.cached_key = self._keys.get
        self.current_entry = self._current.get

    # ---- lock-free reads ------------------------------------------------------------------
    def sealing_key(self, device_id: str) -> SealingKey | None:
        """The key new events of the device are sealed with, unless its ttl has run out."""
        entry = self.current_entry(device_id)
        if entry is not None and self.clock() < entry[1]:
            return entry[0]
        return None

    def get(self, device_id: str, version: int) -> AESGCM | None:
        if not 0 <= version <= MAX_KEY_VERSION:
            return None
        return self.cached_key((device_id, key_version_bytes(version)))

    def current(self, device_id: str) -> tuple[int, AESGCM] | None:
        """The version new events of the device are sealed with, unless its ttl has run out."""
        key = self.sealing_key(device_id)
        if key is None:
            return None
        return key.version, key.aead

    @property
    def generation(self) -> int:
        """Changes whenever keys are forgotten; see :meth:`put`."""
        return self._generation

    # ---- changes, under the lock ----------------------------------------------------------
    def put(self, device_id: str, version: int, aead: AESGCM, *, generation: int | None = None) -> None:
        """Cache the key of ``version``.

        A caller that read the key from the store passes the :attr:`generation` it saw before
        the read: if a device was forgotten in between, the key is not cached, because it may
        belong to the device just deleted.
        """
        key_version = key_version_bytes(version)
        with self._lock:
            if generation is None or generation == self._generation:
                self._put_locked(device_id, key_version, aead)

    def set_current(
        self,
        device_id: str,
        version: int,
        aead: AESGCM,
        *,
        ttl_seconds: float,
        generation: int | None = None,
    ) -> CurrentKey:
        """Record the device's current version; the key is also cached under its version.

        Caching it under its version as well means events just sealed with it decrypt without
        another unwrap. ``generation`` works as in :meth:`put`. Returns the entry, so that the
        caller can seal with it even when the ttl is zero or the entry was not kept.
        """
        if not (ttl_seconds >= 0 and math.isfinite(ttl_seconds)):
            raise ValueError(f"ttl_seconds must be a finite number >= 0, got {ttl_seconds}")
        key = bind_key(aead, device_id, version)
        entry = (key, self.clock() + ttl_seconds)
        with self._lock:
            if generation is None or generation == self._generation:
                self._put_locked(device_id, key_version_bytes(version), aead)
                self._current[device_id] = entry
                self._current.move_to_end(device_id)
                if len(self._current) > self._max_entries:
                    self._current.popitem(last=False)
        return entry

    def forget_device(self, device_id: str) -> None:
        """Drop every key of the device, so a deleted device's key does not outlive it here."""
        with self._lock:
            self._generation += 1
            for version in self._versions.pop(device_id, ()):
                del self._keys[(device_id, version)]
            self._current.pop(device_id, None)

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
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

    def _put_locked(self, device_id: str, version: bytes, aead: AESGCM) -> None:
        # Assigned over the old value, then moved: a reader sees one of the two, never none.
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
