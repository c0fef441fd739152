"""Tells every node's live streams that events were committed, without polling the database.

One node commits a batch; the streams that wait on those devices may sit on another API node.
The wake-up travels over an engine the deployment already runs: PostgreSQL ``LISTEN/NOTIFY``
(channel ``iotvault_events``), or Redis pub/sub when ``IOTVAULT_REDIS_URL`` is set. On SQLite
the processes that share the data dir (``serve --role ingest`` beside ``--role api``, the
command line) relay through a hub on a Unix socket there (:mod:`iotvault.localfanout`).

Three kinds of message. Two are a comma-joined list of device ids after a prefix: ``e:`` these
devices have new events (wake their streams); ``f:`` these devices were deleted (every node
drops their unwrapped data keys, its encoded documents of their events and its cached idea of
them at once, rather than within ``key_cache_ttl_s`` or, for the keys that open old records,
at its next restart). The third, ``a:``, says that who may do what changed (a user, group,
API key or grant): every node empties its cache of authentication results at once
(:mod:`iotvault.api.readcache`), so a revoked key or a group that lost a device is refused on
every node immediately, not within ``auth_cache_ttl_s``.

What is sent is only the ids of the devices that have new events, never an event: a stream that
is woken reads its events from the database behind its own authorization, as before, so the
channel needs no secrecy and a lost wake-up costs latency, not data (the streams' slow safety
poll, ``stream_safety_poll_s``, finds the events anyway).

Bounded on both sides. The sender coalesces device ids in a set (at most one entry per device)
and sends it in chunks below PostgreSQL's 8000-byte payload limit; nothing queues per message.
The receiver sets an :class:`asyncio.Event` per stream: a slow stream client holds one flag,
never a queue, and reads its events in pages of 500 when it gets to them. After a lost
connection to PostgreSQL or Redis, every stream is woken once (it may have missed a wake-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final, Protocol

from iotvault import localfanout

log = logging.getLogger(__name__)

CHANNEL: Final = "iotvault_events"
ACCESS_CHANGED: Final = "a:*"
MAX_PAYLOAD: Final = 7900  # PostgreSQL refuses a NOTIFY payload of 8000 bytes or more (prefix included)


def chunks(device_ids: set[str]) -> list[str]:
    """Comma-joined device ids, each string below :data:`MAX_PAYLOAD` (device ids have no comma)."""
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for d in sorted(device_ids):
        if cur and size + len(d) + 1 > MAX_PAYLOAD:
            out.append(",".join(cur))
            cur, size = [], 0
        cur.append(d)
        size += len(d) + 1
    if cur:
        out.append(",".join(cur))
    return out


class _Transport(Protocol):
    async def send(self, payload: str) -> None: ...
    def listen(self) -> AsyncIterator[str]: ...
    async def close(self) -> None: ...


class _Postgres:
    def __init__(self, url: str) -> None:
        self._url = url
        self._send_conn: Any = None

    async def _connect(self) -> Any:
        import psycopg  # noqa: PLC0415 - only PostgreSQL deployments need it

        return await psycopg.AsyncConnection.connect(self._url, autocommit=True, connect_timeout=5)

    async def send(self, payload: str) -> None:
        if self._send_conn is None or self._send_conn.closed:
            self._send_conn = await self._connect()
        try:
            await self._send_conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
        except Exception:
            await self.close()
            raise

    async def listen(self) -> AsyncIterator[str]:
        conn = await self._connect()
        try:
            await conn.execute(f"LISTEN {CHANNEL}")
            yield ""  # listening: the caller wakes every stream once
            async for n in conn.notifies():
                yield n.payload
        finally:
            await conn.close()

    async def close(self) -> None:
        conn, self._send_conn = self._send_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


class _Redis:
    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis  # noqa: PLC0415 - only Redis deployments need it

        self._redis = aioredis.from_url(url, socket_connect_timeout=5)

    async def send(self, payload: str) -> None:
        await self._redis.publish(CHANNEL, payload)

    async def listen(self) -> AsyncIterator[str]:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(CHANNEL)
            yield ""
            while True:
                msg = await pubsub.get_message(timeout=30.0)
                if msg is not None and msg.get("type") == "message":
                    data = msg["data"]
                    yield data.decode() if isinstance(data, bytes) else str(data)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._redis.aclose()


class Fanout:
    """Sends this node's commits and deletions to the other nodes, and acts on theirs.

    ``publish`` is the pipeline's ``on_commit`` (synchronous, on the event loop): it only adds
    to a set and signals the sender task. ``wake`` is called with the device ids another node
    (or this one: the channel echoes) committed; ``forget`` with the ids of deleted devices.
    """

    def __init__(
        self,
        transport: _Transport,
        wake: Callable[[set[str]], None],
        wake_all: Callable[[], None],
        forget: Callable[[set[str]], None] | None = None,
        access_changed: Callable[[], None] | None = None,
    ) -> None:
        self._transport = transport
        self._wake = wake
        self._wake_all = wake_all
        self._forget = forget
        self._access_changed = access_changed
        self._pending: set[str] = set()
        self._pending_forget: set[str] = set()
        self._pending_access = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signal = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = asyncio.Event()
        self._session = 0  # moves each time listening (re)starts: see hearing()

    @classmethod
    def for_settings(
        cls,
        redis_url: str,
        database_url: str,
        wake: Callable[[set[str]], None],
        wake_all: Callable[[], None],
        forget: Callable[[set[str]], None] | None = None,
        *,
        access_changed: Callable[[], None] | None = None,
        data_dir: Path | None = None,
    ) -> Fanout | None:
        """Redis pub/sub when Redis is configured, else LISTEN/NOTIFY on PostgreSQL, else on
        SQLite the data dir's local socket (:mod:`iotvault.localfanout`), else None."""
        if redis_url:
            return cls(_Redis(redis_url), wake, wake_all, forget, access_changed)
        if database_url.startswith(("postgresql", "postgres")):
            url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
            return cls(_Postgres(url), wake, wake_all, forget, access_changed)
        if data_dir is not None and _local(database_url, data_dir):
            return cls(localfanout.LocalTransport(data_dir), wake, wake_all, forget, access_changed)
        return None

    def hearing(self) -> int | None:
        """The listening session, None while not listening: a kept page is believed current only
        within one session (:mod:`iotvault.api.readcache`), since between two a message may
        have been missed. Read on the event loop."""
        return self._session if self.listening.is_set() else None

    def publish(self, device_ids: set[str]) -> None:
        """These devices have new events (on the event loop: the pipeline's ``on_commit``)."""
        self._pending |= device_ids
        self._signal.set()

    def announce_forget(self, device_id: str) -> None:
        """This device was deleted: tell every node. Safe from any thread (deletions run in one)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._add_forget, device_id)

    def announce_access_changed(self) -> None:
        """Who may do what changed: tell every node. Safe from any thread (changes run in one)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._add_access)

    def _add_access(self) -> None:
        self._pending_access = True
        self._signal.set()

    def _add_forget(self, device_id: str) -> None:
        self._pending_forget.add(device_id)
        self._signal.set()

    async def __aenter__(self) -> Fanout:
        return self

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks.append(asyncio.create_task(self._send_loop(), name="iotvault-fanout-send"))
        self._tasks.append(asyncio.create_task(self._listen_loop(), name="iotvault-fanout-listen"))

    async def __aexit__(self, *exc: object) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self._transport.close()

    async def _send_loop(self) -> None:
        delay = 0.5
        while True:
            await self._signal.wait()
            self._signal.clear()
            batch, self._pending = self._pending, set()
            gone, self._pending_forget = self._pending_forget, set()
            access, self._pending_access = self._pending_access, False
            try:
                if access:
                    await self._transport.send(ACCESS_CHANGED)
                for payload in chunks(gone):
                    await self._transport.send("f:" + payload)
                for payload in chunks(batch):
                    await self._transport.send("e:" + payload)
                delay = 0.5
            except Exception as exc:  # noqa: BLE001 - a lost wake-up costs latency only
                log.warning("fan-out: could not notify other nodes (%s); retrying", type(exc).__name__)
                self._pending |= batch
                self._pending_forget |= gone
                self._pending_access |= access
                self._signal.set()
                await asyncio.sleep(delay * (0.75 + random.random() / 2))  # noqa: S311 - jitter
                delay = min(delay * 2, 10.0)

    def _received(self, payload: str) -> None:
        kind, _, ids = payload.partition(":")
        if kind == "e":
            self._wake(set(ids.split(",")))
        elif kind == "f" and self._forget is not None:
            self._forget(set(ids.split(",")))
        elif kind == "a" and self._access_changed is not None:
            self._access_changed()

    async def _listen_loop(self) -> None:
        delay = 0.5
        while True:
            try:
                async for payload in self._transport.listen():
                    if not payload:
                        self._session += 1
                        self.listening.set()
                        self._wake_all()  # wake-ups may have been missed while not listening
                        if self._access_changed is not None:
                            self._access_changed()  # and so may changes of access
                        delay = 0.5
                        continue
                    self._received(payload)
            except Exception as exc:  # noqa: BLE001 - reconnect; the streams' safety poll covers the gap
                log.warning("fan-out: listening failed (%s); reconnecting", type(exc).__name__)
            self.listening.clear()
            await asyncio.sleep(delay * (0.75 + random.random() / 2))  # noqa: S311 - jitter
            delay = min(delay * 2, 10.0)


def _local(database_url: str, data_dir: Path) -> bool:
    """Whether the processes on this data dir fan out through its socket (SQLite only)."""
    if database_url and not database_url.startswith("sqlite"):
        return False
    if not localfanout.available():
        return False
    if not localfanout.usable(data_dir):
        log.warning(
            "fan-out: the data dir's path is too long for a Unix socket; processes sharing it "
            "see each other's changes only through the streams' poll and the caches' TTL"
        )
        return False
    return True


def announce_deleted(
    redis_url: str, database_url: str, device_id: str, *, data_dir: Path | None = None
) -> bool:
    """Tell the running nodes that a device was deleted, from a process without a fan-out.

    ``iotvault devices delete`` runs outside every node; without this, the nodes would keep the
    device's unwrapped keys that open old records until they restart. One message, sent once:
    False (and a log line) if the channel could not be reached, the deletion itself stands.
    """
    return announce(redis_url, database_url, "f:" + device_id, data_dir=data_dir)


def announce(redis_url: str, database_url: str, payload: str, *, data_dir: Path | None = None) -> bool:
    """Send one message to every running node, from a process without a fan-out (the CLI).

    On SQLite (given its ``data_dir``), to the processes on that data dir through their hub;
    False, quietly, when no node runs there.
    """
    try:
        if redis_url:
            import redis  # noqa: PLC0415 - only Redis deployments need it

            with redis.Redis.from_url(redis_url, socket_connect_timeout=5) as r:
                r.publish(CHANNEL, payload)
            return True
        if database_url.startswith(("postgresql", "postgres")):
            import psycopg  # noqa: PLC0415 - only PostgreSQL deployments need it

            url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
            with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
            return True
        if data_dir is not None and (not database_url or database_url.startswith("sqlite")):
            return localfanout.send_once(data_dir, payload)
    except Exception as exc:  # noqa: BLE001 - the nodes' caches then drop the keys at restart
        log.warning("fan-out: the nodes were not told (%s)", type(exc).__name__)
    return False
