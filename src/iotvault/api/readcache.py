"""Two caches in front of the device-data reads, in memory only and emptied on every change.

**Authentication results** (:class:`PrincipalCache`): a bearer token or an API key that was
accepted, and the :class:`~iotvault.auth.policy.Principal` (groups, devices, roles) it
resolved to, kept for at most ``auth_cache_ttl_s`` and never past the credential's expiry.
Authorization is still decided on every request, from the cached principal. What empties it:
any committed change to users, groups, API keys or OpenID Connect grants
(:attr:`iotvault.storage.db.EngineStore.on_change`), on this node at once and on every other
through the fan-out (:mod:`iotvault.fanout`, message ``a:``; on SQLite the processes on one
data dir, the command line included, through its socket). The TTL bounds only a lost message,
or processes on one SQLite file whose data dirs differ.

**Encoded events** (:class:`EventDocCache`): the finished JSON document of an event (its
payload decrypted), by event id, per device. A stored event never changes, so a document
never goes stale; a page is still read from the database (which events, in which order,
whether the device exists) and only the decryption and encoding of each event are saved.
Only documents that decrypted are kept. When a device is deleted (crypto-shredding) its
documents go at once with its keys, here and, through the fan-out's ``f:`` message, on every
node; a node no fan-out reaches keeps them unreachable (a page is built only from event ids
the database still returns) until they age out (``key_cache_ttl_s``, like the keys) or are
evicted. Bounded in bytes (``read_cache_mib``); least recently read devices go first.

**Newest-first pages** (:meth:`EventDocCache.page`): the last answer to a read of a device's
newest ``count`` events, with its event ids and documents. Before such a page is served again,
one statement (:meth:`iotvault.storage.events.EventTable.page_news`: how many events from the
page's oldest id on, and the events after its newest id) tells what became of it. Events are
only ever added (a device's go all at once, with the device): if nothing came, the answer, kept
as it was sent, is sent again without reading the events; if only newer events came, the page
is those (decrypted now) and the kept page's newest; anything else reads the page again. This
holds whichever process wrote to the database. (On SQLite, while nothing at all was committed
since a page was found current, SQLite's own data version says so without the statement.) A
page goes with its device's documents, and ages out with them.

**Pages known current** (:meth:`EventDocCache.kept`, ``page_trust_ms``): a page found current
by that statement is answered again without it while this process has heard of no new event
of its device, for at most ``page_trust_ms``. It hears of every commit of its own ingest before
the commit's messages are acknowledged, and of every other process's through the fan-out
(``e:``, the message that wakes the live streams): the page is then asked about again. Only
while the fan-out listens (:meth:`iotvault.fanout.Fanout.hearing`); a session that ended, or
none, and every read asks as before. So a read on the process that ingested an event answers
with it as soon as it is acknowledged; on another process as soon as the fan-out brought the
message (well under a millisecond here), or, were it lost, after ``page_trust_ms`` at the most.
``0`` asks on every read.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

from iotvault.storage.repository import PageCheck

T = TypeVar("T")

MAX_PRINCIPALS = 10_000
PER_DEVICE = 2_000  # documents kept per device: more than the largest page (1000)
PAGES_PER_DEVICE = 8  # newest-first pages kept per device (one per count asked for)
PAGE_BYTES = 200  # what a kept page counts against the cache's size besides its answer
PAGE_EVENT_BYTES = 100  # and per event (its id; the documents are the cache's own)


def deaf() -> int | None:
    """What :attr:`EventDocCache.hearing` is without a fan-out: no session, no page believed."""
    return None


@dataclass
class _Entry(Generic[T]):
    value: T
    until: float


class PrincipalCache(Generic[T]):
    """Accepted credentials (by a hash of the whole header value) and what they resolved to."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[bytes, _Entry[T]] = {}
        self.generation = 0  # moves on every clear: a lookup begun before one is not stored

    def get(self, digest: bytes) -> T | None:
        hit = self._entries.get(digest)
        if hit is None:
            return None
        if hit.until <= self._clock():
            self._entries.pop(digest, None)
            return None
        return hit.value

    def put(self, digest: bytes, value: T, *, generation: int, expires_in_s: float | None = None) -> None:
        """Keep ``value`` unless the cache was emptied since ``generation`` was read."""
        ttl = self.ttl_s if expires_in_s is None else min(self.ttl_s, max(0.0, expires_in_s))
        if ttl <= 0 or generation != self.generation:
            return
        now = self._clock()
        if len(self._entries) >= MAX_PRINCIPALS:
            self._entries = {k: v for k, v in self._entries.items() if v.until > now}
            if len(self._entries) >= MAX_PRINCIPALS:
                self._entries.clear()
        self._entries[digest] = _Entry(value, now + ttl)

    def clear(self) -> None:
        """Safe from any thread: the dictionary is replaced, not emptied in place."""
        self.generation += 1
        self._entries = {}

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class Page:
    """A newest-first page as it was answered, and what proves it current.

    The answer itself is kept (not only its event ids): serving it again is then one check
    and no assembly; and each event's document, so that a page to which events were added
    since is made again from them and the new events alone. It counts against the cache's
    size like the documents (which it shares with them).
    """

    ids: tuple[str, ...]  # newest first, at least one
    docs: tuple[bytes, ...]  # each event's document, in the same order
    full: bool  # as many events as asked for: only ids from the oldest one on decide it
    body: bytes

    @classmethod
    def of(cls, event_ids: list[str], count: int, docs: list[bytes], body: bytes) -> Page:
        """The page of these ids (newest first, at least one) and documents, answered as ``body``."""
        return cls(tuple(event_ids), tuple(docs), len(event_ids) == count, body)

    @property
    def check(self) -> PageCheck:
        """What :meth:`iotvault.storage.events.EventTable.page_news` checks it against."""
        return PageCheck(self.ids[-1] if self.full else "", len(self.ids), self.ids[0])

    @property
    def size(self) -> int:
        return len(self.body) + PAGE_BYTES + PAGE_EVENT_BYTES * len(self.ids)


class Kept(NamedTuple):
    """A kept page (:meth:`EventDocCache.kept`), and whether it may be answered without a check."""

    page: Page
    current: bool  # found current and heard of no change since, within page_trust_ms
    ticket: tuple[int, int]  # the device's changes heard of and the fan-out's session (-1: none)


@dataclass
class _Device:
    born: float
    docs: dict[str, bytes] = field(default_factory=dict)
    size: int = 0
    pages: dict[int, Page] = field(default_factory=dict)  # by the count asked for
    heard: int = 0  # new events heard of (EventDocCache.heard): a check begun before does not trust
    trusted: dict[int, tuple[float, int]] = field(default_factory=dict)  # count: (until, session)


class EventDocCache:
    """Encoded event documents by event id, per device, at most ``max_bytes`` in all."""

    def __init__(
        self,
        max_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        trust_s: float = 0.0,
    ) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.trust_s = trust_s  # page_trust_ms: how long a page found current is believed
        # the fan-out's listening session, None while it does not listen (or there is none):
        # only while it listens is every other process's commit heard of (Fanout.hearing)
        self.hearing: Callable[[], int | None] = deaf
        self._clock = clock
        self._devices: OrderedDict[str, _Device] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()  # read threads fill it; the event loop empties it
        self.listeners: list[Callable[[Iterable[str]], None]] = []  # told of every forget
        # moves on every forget: documents decrypted by a read that began before a deletion
        # are not put back after it (the read passes the generation it saw to put)
        self.generation = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, device_id: str, event_ids: Iterable[str]) -> list[bytes | None]:
        with self._lock:
            d = self._devices.get(device_id)
            if d is None:
                return [None for _ in event_ids]
            if self._clock() - d.born > self.ttl_s:
                self._drop(device_id)
                return [None for _ in event_ids]
            self._devices.move_to_end(device_id)
            docs = d.docs
            return [docs.get(e) for e in event_ids]

    def put(self, device_id: str, items: list[tuple[str, bytes]], *, generation: int) -> None:
        if not self.enabled or not items:
            return
        with self._lock:
            if generation != self.generation:
                return
            d = self._devices.get(device_id)
            if d is None:
                d = self._devices[device_id] = _Device(self._clock())
            for event_id, doc in items:
                old = d.docs.get(event_id)
                if old is not None:
                    continue
                d.docs[event_id] = doc
                d.size += len(doc)
                self._size += len(doc)
            while len(d.docs) > PER_DEVICE:  # the oldest put first
                gone = d.docs.pop(next(iter(d.docs)))
                d.size -= len(gone)
                self._size -= len(gone)
            self._trim()

    def _trim(self) -> None:
        while self._size > self.max_bytes and self._devices:
            self._drop(next(iter(self._devices)))

    def page(self, device_id: str, count: int) -> Page | None:
        """The page last answered for the newest ``count`` events of the device, if it is kept."""
        kept = self.kept(device_id, count)
        return None if kept is None else kept.page

    def kept(self, device_id: str, count: int) -> Kept | None:
        """:meth:`page`, and whether it may be answered as it is: found current by a check and
        no new event of the device heard of since, within ``trust_s``, in one fan-out session."""
        with self._lock:
            d = self._devices.get(device_id)
            if d is None:
                return None
            now = self._clock()
            if now - d.born > self.ttl_s:
                self._drop(device_id)
                return None
            page = d.pages.get(count)
            if page is None:
                return None
            self._devices.move_to_end(device_id)
            session = self.hearing() if self.trust_s > 0 else None
            trust = d.trusted.get(count)
            current = session is not None and trust is not None and trust[1] == session and now < trust[0]
            return Kept(page, current, (d.heard, -1 if session is None else session))

    def trust(self, device_id: str, count: int, kept: Kept) -> None:
        """A check begun after ``kept`` was looked up found its page current: answer it without
        one until ``trust_s`` passed or a new event of the device is heard of. Not if one was
        heard of meanwhile, the fan-out's session changed, or the page was replaced."""
        heard, session = kept.ticket
        if session < 0:
            return
        with self._lock:
            d = self._devices.get(device_id)
            if d is None or d.heard != heard or d.pages.get(count) is not kept.page:
                return
            if self.hearing() != session:
                return
            d.trusted[count] = (self._clock() + self.trust_s, session)

    def heard(self, device_ids: Iterable[str]) -> None:
        """New events of these devices were committed (by this process, or another's through the
        fan-out): their pages are asked about again (:class:`iotvault.api.services.EventNotifier`)."""
        with self._lock:
            for device_id in device_ids:
                d = self._devices.get(device_id)
                if d is not None:
                    d.heard += 1
                    d.trusted.clear()

    def put_page(self, device_id: str, count: int, page: Page, *, generation: int) -> None:
        """Keep a newest-first page (whose documents were just put) unless a forget came between."""
        if not self.enabled:
            return
        with self._lock:
            d = self._devices.get(device_id)
            if generation != self.generation or d is None:
                return
            old = d.pages.pop(count, None)
            if old is None and len(d.pages) >= PAGES_PER_DEVICE:
                old = d.pages.pop(next(iter(d.pages)))
            grown = page.size - (old.size if old is not None else 0)
            d.pages[count] = page
            d.trusted.pop(count, None)  # a new page is believed after a check of its own
            d.size += grown
            self._size += grown
            self._trim()

    def _drop(self, device_id: str) -> None:
        d = self._devices.pop(device_id, None)
        if d is not None:
            self._size -= d.size

    def forget(self, device_ids: Iterable[str]) -> None:
        """These devices were deleted: their documents go now (any thread)."""
        device_ids = list(device_ids)
        with self._lock:
            self.generation += 1
            for device_id in device_ids:
                self._drop(device_id)
        for listener in self.listeners:
            listener(device_ids)

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            self._devices.clear()
            self._size = 0

    def holds(self, device_id: str) -> bool:
        with self._lock:
            return device_id in self._devices

    @property
    def size_bytes(self) -> int:
        return self._size
