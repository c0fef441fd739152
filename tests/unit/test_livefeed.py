"""The streams of one device share its reads, and still each get exactly their events."""

from __future__ import annotations

import asyncio

from iotvault.api.livefeed import PAGE, LiveFeeds


class Db:
    """Event ids "e0001"...: what ``read(after)`` would return, counting the reads."""

    def __init__(self, n: int = 0) -> None:
        self.ids = [f"e{i:04d}" for i in range(1, n + 1)]
        self.reads = 0

    def add(self, n: int) -> None:
        last = len(self.ids)
        self.ids += [f"e{i:04d}" for i in range(last + 1, last + n + 1)]

    async def read(self, after: str) -> list[tuple[str, bytes]]:
        self.reads += 1
        await asyncio.sleep(0)  # a worker thread in the real thing: others run meanwhile
        return [(i, i.encode()) for i in self.ids if i > after][:PAGE]


async def test_ten_streams_of_a_device_make_one_read_per_commit() -> None:
    feeds, db = LiveFeeds(), Db(3)
    for _ in range(10):
        feeds.join("d1", "e0003")
    db.add(2)
    feeds.mark({"d1"})
    got = await asyncio.gather(*(feeds.after("d1", "e0003", db.read) for _ in range(10)))
    assert all([i for i, _ in g] == ["e0004", "e0005"] for g in got)
    assert db.reads == 1
    assert await feeds.after("d1", "e0005", db.read) == []  # nothing announced: no read
    assert db.reads == 1


async def test_each_stream_gets_what_follows_its_own_cursor_and_an_old_cursor_reads_itself() -> None:
    feeds, db = LiveFeeds(), Db(5)
    feeds.join("d1", "e0003")
    assert [i for i, _ in await feeds.after("d1", "e0003", db.read)] == ["e0004", "e0005"]
    assert [i for i, _ in await feeds.after("d1", "e0004", db.read)] == ["e0005"]
    reads = db.reads
    assert [i for i, _ in await feeds.after("d1", "e0001", db.read)] == ["e0002", "e0003", "e0004", "e0005"]
    assert db.reads == reads + 1  # older than the feed: its own read


async def test_a_commit_announced_during_a_read_is_read_again() -> None:
    feeds, db = LiveFeeds(), Db(1)
    feeds.join("d1", "e0001")

    async def read_and_commit(after: str) -> list[tuple[str, bytes]]:
        out = await db.read(after)
        db.add(1)  # committed after this read's snapshot, announced while it runs
        feeds.mark({"d1"})
        return out

    assert await feeds.after("d1", "e0001", read_and_commit) == []
    assert [i for i, _ in await feeds.after("d1", "e0001", db.read)] == ["e0002"]


async def test_a_full_page_is_followed_by_the_next_and_the_feed_stays_bounded() -> None:
    feeds, db = LiveFeeds(keep=600), Db(0)
    feeds.join("d1", "e0000")
    db.add(PAGE + 20)
    seen: list[str] = []
    cursor = "e0000"
    while page := await feeds.after("d1", cursor, db.read):
        seen += [i for i, _ in page]
        cursor = page[-1][0]
    assert seen == db.ids
    assert feeds.held("d1") <= 600


async def test_a_deleted_device_leaves_no_documents_and_the_last_stream_drops_the_feed() -> None:
    feeds, db = LiveFeeds(), Db(3)
    feeds.join("d1", "e0000")
    feeds.join("d1", "e0000")
    await feeds.after("d1", "e0000", db.read)
    assert feeds.held("d1") == 3
    feeds.forget(["d1"])
    assert feeds.held("d1") == 0
    feeds.join("d2", "e0000")
    await feeds.after("d2", "e0000", db.read)
    feeds.leave("d2")
    assert feeds.held("d2") == 0
