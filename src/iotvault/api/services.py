"""What the HTTP layer needs, built once per process and handed to :func:`create_app`."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from iotvault.api.livefeed import LiveFeeds
from iotvault.api.ratelimit import RateLimiter
from iotvault.api.readcache import EventDocCache, PrincipalCache
from iotvault.auth.policy import Principal
from iotvault.auth.tokens import TokenVerifier
from iotvault.config import Settings
from iotvault.context import Context
from iotvault.ingest.pipeline import Inbound, Outcome
from iotvault.metrics import Metrics
from iotvault.storage.db import is_sqlite


class Waker(Protocol):
    """What a notification wakes: an ``asyncio.Event``, or a live stream itself."""

    def set(self) -> None: ...


class EventNotifier:
    """Wakes live streams when this process commits events for a device.

    Streams also poll the database every few seconds, so events ingested by another node
    reach them too; this only makes the common single-node case immediate.
    """

    def __init__(self) -> None:
        self._waiters: dict[str, set[Waker]] = defaultdict(set)
        # told of every notification first (iotvault.api.livefeed: the feeds owe a read)
        self.listeners: list[Callable[[set[str]], None]] = []

    def subscribe(self, device_id: str, waker: Waker) -> None:
        """Wake ``waker`` (``set()``) at each commit for the device, until unsubscribed."""
        self._waiters[device_id].add(waker)

    def unsubscribe(self, device_id: str, ev: Waker) -> None:
        waiters = self._waiters.get(device_id)
        if waiters is not None:
            waiters.discard(ev)
            if not waiters:
                del self._waiters[device_id]

    def watching(self, device_id: str) -> int:
        """How many wakers wait for the device's commits (tests; a stream that ended is not one)."""
        return len(self._waiters.get(device_id, ()))

    def notify(self, device_ids: set[str]) -> None:
        for listener in self.listeners:
            listener(device_ids)
        for d in device_ids:
            for ev in self._waiters.get(d, ()):
                ev.set()

    def wake_all(self) -> None:
        """Wake every stream (at shutdown: they see ``stopping`` at once, not at their next poll)."""
        self.notify(set(self._waiters))


@dataclass
class ApiServices:
    settings: Settings
    ctx: Context
    metrics: Metrics
    verifier: TokenVerifier | None = None
    limiter: RateLimiter | None = None
    notifier: EventNotifier = field(default_factory=EventNotifier)
    stream_poll_s: float = 2.0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # (kind, client address, detail) of an abusive HTTP client: a security event (node.py)
    on_abuse: Callable[[str, str, dict[str, Any]], None] | None = None
    # (kind, subject, detail): a security event about a device (SecurityEventLog.record)
    security_event: Callable[..., None] | None = None
    # the ingest pipeline's door for HTTP device messaging (IngestPipeline.enqueue), or None
    ingest: Callable[[Inbound], asyncio.Future[Outcome]] | None = None
    # iotvault.api.readcache, sized by the settings unless given: emptied on every change of
    # access and every deletion (watch_changes)
    principals: PrincipalCache[Principal] = None  # type: ignore[assignment]
    event_docs: EventDocCache = None  # type: ignore[assignment]
    # another process's figures that /metrics adds to this one's (iotvault.metrics.SnapshotFile)
    metrics_plus: Callable[[], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        s = self.settings
        given: tuple[Any, Any] = (self.principals, self.event_docs)  # None unless passed
        if given[0] is None:
            self.principals = PrincipalCache(s.auth_cache_ttl_s)
        if given[1] is None:
            self.event_docs = EventDocCache(
                s.read_cache_mib * 2**20, s.key_cache_ttl_s, trust_s=s.page_trust_ms / 1000
            )
        # device reads run on the event loop on SQLite (iotvault.api.routes.devices._read)
        self.inline_reads = is_sqlite(self.ctx.engine)
        self.feeds = LiveFeeds()
        self.notifier.listeners.append(self.feeds.mark)
        self.notifier.listeners.append(self.event_docs.heard)  # kept pages are asked about again
        self.event_docs.listeners.append(self.feeds.forget)


class Announcer(Protocol):
    """What tells the other nodes (:class:`iotvault.fanout.Fanout`); safe from any thread."""

    def announce_forget(self, device_id: str) -> None: ...
    def announce_access_changed(self) -> None: ...


def watch_changes(
    ctx: Context,
    principals: PrincipalCache[Principal],
    event_docs: EventDocCache,
    announcer: Announcer | None = None,
) -> Callable[[], None]:
    """Empty the caches the moment access changes or a device is deleted through ``ctx``.

    A committed change to users, groups or API keys empties the authentication results; a
    deleted device's encoded events go with its keys. Both are told to every other node
    through ``announcer`` (which calls back the same caches there). Returns what a revoked
    OpenID Connect grant calls (:attr:`iotvault.identity.store.IdentityStore.on_change`).
    """

    def access_changed() -> None:
        principals.clear()  # before the change is answered: the next request sees it
        if announcer is not None:
            announcer.announce_access_changed()

    def deleted(device_id: str) -> None:
        event_docs.forget({device_id})
        if announcer is not None:
            announcer.announce_forget(device_id)

    ctx.accounts.on_change = access_changed
    ctx.keyring.on_forget = deleted
    return access_changed
