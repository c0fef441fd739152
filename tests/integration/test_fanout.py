"""Wake-ups and deletions between nodes over real PostgreSQL LISTEN/NOTIFY and real Redis pub/sub."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable

import psycopg
import pytest
import redis
from helpers import unavailable

from fanoutcalls import FanoutCalls
from iotvault.fanout import MAX_PAYLOAD, Fanout, announce_deleted, chunks

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("IOTVAULT_TEST_REDIS", "redis://127.0.0.1:6379/0")


class Node(FanoutCalls):
    """What a node's fan-out calls, recorded; and its fan-out."""

    def fanout(self, redis_url: str, database_url: str) -> Fanout:
        f = Fanout.for_settings(redis_url, database_url, self.wake, self.wake_all, self.forget)
        assert f is not None
        return f


async def _until(predicate: Callable[[], bool], node: Node, within_s: float = 5.0) -> None:
    await node.until(predicate, within_s)


@pytest.fixture(params=["postgresql", "redis"])
def urls(request: pytest.FixtureRequest) -> tuple[str, str]:
    if request.param == "redis":
        try:
            redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
        except redis.RedisError as exc:
            unavailable(f"Redis at {REDIS_URL} does not answer: {exc}")
        return REDIS_URL, ""
    return "", str(request.getfixturevalue("pg_url"))


async def test_commits_wake_and_deletions_reach_the_other_node(urls: tuple[str, str]) -> None:
    a, b = Node(), Node()
    async with a.fanout(*urls) as fa, b.fanout(*urls) as fb:
        fa.start()
        fb.start()
        await asyncio.wait_for(asyncio.gather(fa.listening.wait(), fb.listening.wait()), 10)
        mine = {f"dev-{uuid.uuid4().hex[:8]}" for _ in range(3)}
        fa.publish(mine)
        await _until(lambda: any(mine <= w for w in b.woken), b)
        gone = f"gone-{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(fa.announce_forget, gone)  # deletions run in worker threads
        await _until(lambda: {gone} in b.forgotten, b)
        assert not any(gone in w for w in b.woken)  # a deletion is not a wake-up
        # many devices at once: several messages, none over PostgreSQL's limit, nothing lost
        many = {f"d{uuid.uuid4().hex}" for _ in range(1000)}
        fa.publish(many)
        await _until(lambda: many <= set().union(*b.woken), b)


async def test_a_lost_listening_connection_comes_back_and_wakes_every_stream(pg_url: str) -> None:
    b = Node()
    async with b.fanout("", pg_url) as fb:
        fb.start()
        await asyncio.wait_for(fb.listening.wait(), 10)
        assert b.woken_all == 1
        first = fb.hearing()  # the session a kept page is believed in (iotvault.api.readcache)
        assert first is not None
        sessions: set[int | None] = set()

        async def watch() -> None:
            while True:
                sessions.add(fb.hearing())
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        # reconnected: every stream woken once more, since it may have missed a wake-up
        await _until(lambda: b.woken_all >= 2, b, within_s=15)
        watcher.cancel()
        # not listening in between (no page believed), and a new session after: none believed
        # in the old one, whose messages may have been missed
        assert None in sessions, sessions
        assert fb.hearing() not in (None, first)
        a = Node()
        async with a.fanout("", pg_url) as fa:
            fa.start()
            fa.publish({"after-reconnect"})
            await _until(lambda: {"after-reconnect"} in b.woken, b)


def test_chunks_stay_below_the_notify_limit_and_keep_every_id() -> None:
    ids = {f"device-{i:06d}-{'x' * 40}" for i in range(2000)}
    parts = chunks(ids)
    assert len(parts) > 1
    assert all(len(p) + 2 < MAX_PAYLOAD for p in parts)
    assert set(",".join(parts).split(",")) == ids
    assert chunks(set()) == []


async def test_a_deletion_from_the_command_line_reaches_running_nodes(urls: tuple[str, str]) -> None:
    b = Node()
    async with b.fanout(*urls) as fb:
        fb.start()
        await asyncio.wait_for(fb.listening.wait(), 10)
        gone = f"cli-{uuid.uuid4().hex[:8]}"
        assert await asyncio.to_thread(announce_deleted, *urls, gone)
        await _until(lambda: {gone} in b.forgotten, b)
    assert not announce_deleted("redis://127.0.0.1:1/0", "", "nobody")  # unreachable: said, not raised
