"""One read per device and wake-up, shared by every live stream of that device on this node.

Each Server-Sent Events stream used to read its device's new events from the database when it
was woken: with 1,000 streams over 100 devices that was ~10,000 small queries a second at
1,000 events/s, and a p99 latency of seconds (BENCHMARKS.md, "Reads as fast as ingest"). Here
the streams of one device share a :class:`_Feed`: the newest events (at most ``keep``) as
what the streams send of them (each event's whole SSE frame, made once); the first stream to
ask after a commit was announced reads what is new, once, and every stream takes the part
after its own cursor.

What a stream sees is unchanged: its events in order, from its cursor on. A stream whose
cursor is older than what the feed holds (a reconnect with an old ``Last-Event-ID``) reads for
itself, as before. A wake-up that may have been missed (the safety poll) marks the feed too.
Deleting a device drops its feed at once with its other decrypted documents
(:meth:`iotvault.api.readcache.EventDocCache.forget` calls :meth:`LiveFeeds.forget`).
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

Item = tuple[str, bytes]  # (event id, what is sent of it: its SSE frame, iotvault.api.routes.stream)
PAGE = 500  # what one read returns at most (the stream's page)


@dataclass
class _Feed:
    base: str  # every event after this id, up to the last item, is held
    items: list[Item] = field(default_factory=list)
    wanted: int = 1  # commits announced for the device (the first read is owed)
    done: int = 0  # announcements covered by the last read
    users: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class LiveFeeds:
    def __init__(self, keep: int = 1000) -> None:
        self.keep = keep
        self._feeds: dict[str, _Feed] = {}
        self.reads = 0  # database reads made for the streams (the benchmark's and tests' view)

    def join(self, device_id: str, cursor: str) -> None:
        feed = self._feeds.get(device_id)
        if feed is None:
            feed = self._feeds[device_id] = _Feed(cursor)
        feed.users += 1

    def leave(self, device_id: str) -> None:
        feed = self._feeds.get(device_id)
        if feed is not None:
            feed.users -= 1
            if feed.users <= 0:
                self._feeds.pop(device_id, None)

    def mark(self, device_ids: Iterable[str]) -> None:
        """New events were committed for these devices (the notifier's listener)."""
        for d in device_ids:
            feed = self._feeds.get(d)
            if feed is not None:
                feed.wanted += 1

    def forget(self, device_ids: Iterable[str]) -> None:
        """These devices were deleted: their documents go now (any thread)."""
        for d in device_ids:
            self._feeds.pop(d, None)

    def streams(self, device_id: str) -> int:
        """How many streams share the device's feed (0: it has none)."""
        feed = self._feeds.get(device_id)
        return feed.users if feed is not None else 0

    def held(self, device_id: str) -> int:
        feed = self._feeds.get(device_id)
        return len(feed.items) if feed is not None else 0

    async def after(
        self, device_id: str, cursor: str, read: Callable[[str], Awaitable[list[Item]]]
    ) -> list[Item]:
        """The events after ``cursor`` (at most a page); ``read(after)`` asks the database."""
        feed = self._feeds.get(device_id)
        if feed is None or cursor < feed.base:
            self.reads += 1
            return await read(cursor)
        async with feed.lock:
            if feed.wanted > feed.done:
                seen = feed.wanted
                self.reads += 1
                new = await read(feed.items[-1][0] if feed.items else feed.base)
                if self._feeds.get(device_id) is not feed:  # deleted meanwhile: keep nothing
                    return new if cursor >= feed.base else []
                feed.items.extend(new)
                if len(new) < PAGE:  # else more may wait: the next call reads on
                    feed.done = seen
                if len(feed.items) > self.keep:
                    drop = len(feed.items) - self.keep
                    feed.base = feed.items[drop - 1][0]
                    del feed.items[:drop]
            if cursor < feed.base:  # trimmed past it while this stream waited
                self.reads += 1
                return await read(cursor)
            start = bisect.bisect_right(feed.items, cursor, key=lambda item: item[0])
            return feed.items[start : start + PAGE]
