"""The live stream (Server-Sent Events) over a real uvicorn, read by raw sockets.

Raw sockets, so that a test decides when a client reads (a slow client reads nothing) and
when it goes (a closed socket, not a polite end of the response). What each test proves:
what a client receives (head, hello, keep-alive, resume), that a slow client holds up no
one and still gets every event, that the node's shutdown ends streams at once, and that a
stream that lost its client leaves nothing behind: no waker, no feed, no task, no descriptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import pytest
from apifixture import Built, build_api, serving, stored_event

import iotvault.api.routes.stream as stream_module
from iotvault.domain.ids import EventIdFactory
from iotvault.storage.repository import BatchWrite

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture
def built(tmp_path: Path, database_url: str) -> Iterator[Built]:
    """On SQLite a stream's reads run on the event loop, on PostgreSQL in worker threads."""
    b = build_api(tmp_path, database_url)
    yield b
    b.close()


@asynccontextmanager
async def served(built: Built) -> AsyncIterator[int]:
    async with serving(built.app) as base:
        try:
            yield int(base.rsplit(":", 1)[1])
        finally:  # streams still open end now, so that the server can stop
            built.svc.stopping.set()
            built.svc.notifier.wake_all()


class Client:
    """One stream, by hand: the request, the head, then whatever the test reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        self.reader, self.writer, self.head = reader, writer, head
        self.buf = b""

    @classmethod
    async def open(
        cls,
        port: int,
        token: str,
        device: str = "d1",
        *,
        last_id: str | None = None,
        rcvbuf: int | None = None,
    ) -> Client:
        sock = socket.socket()
        if rcvbuf is not None:  # before connecting, so the window is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**22)
        extra = f"Last-Event-ID: {last_id}\r\n" if last_id is not None else ""
        writer.write(
            f"GET /iotf/devices/{device}/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Accept: text/event-stream\r\n{extra}\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return cls(reader, writer, head)

    async def until(self, marker: bytes, within_s: float = 10) -> bytes:
        """The (dechunked) body up to and including ``marker``."""
        async with asyncio.timeout(within_s):
            while marker not in self.buf:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                if size == 0:
                    raise EOFError(self.buf)
                self.buf += (await self.reader.readexactly(size + 2))[:-2]
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    async def events(self, n: int, within_s: float = 10) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        while len(out) < n:
            block = await self.until(b"\n\n", within_s)
            lines = block.decode().splitlines()
            data = [line[6:] for line in lines if line.startswith("data: ")]
            if data:
                ids = [line[4:] for line in lines if line.startswith("id: ")]
                doc = json.loads(data[0])
                assert ids == [doc["eventId"]]
                assert "event: event" in lines
                out.append(doc)
        return out

    def close(self) -> None:
        self.writer.transport.abort()  # the client is gone: a reset, not a polite end


def commit(built: Built, device: str, n: int, size: int = 20) -> list[str]:
    """``n`` events stored and announced as ingest would; their ids in order."""
    ids = EventIdFactory()
    batch = BatchWrite()
    out = []
    for i in range(n):
        eid = ids.new()
        body = json.dumps({"d": {"seq": i, "pad": "x" * size}}).encode()
        batch.events.append(stored_event(built.ctx, device, eid, body))
        out.append(eid)
    built.ctx.store.write_batch(batch)
    built.svc.notifier.notify({device})
    return out


def descriptors(built: Built) -> int:
    """This process's open descriptors, not counting the database pool's connections: the pool
    may open one while a test commits (or the audit log flushes) and keep it, up to its size,
    which the pool's own tests bound. A stream's socket, its tasks' and anything else count."""
    url = built.ctx.engine.url
    port = (url.port or 5432) if url.get_backend_name() == "postgresql" else None
    pool = {c.fd for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr[1] == port}
    db_file = str(url.database) if url.get_backend_name() == "sqlite" else None
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        if int(fd.name) in pool:
            continue
        with contextlib.suppress(OSError):
            if db_file and str(fd.readlink()).startswith(db_file):  # the file, its -wal and -shm
                continue
        count += 1
    return count


async def settle(check: Callable[[], bool], within_s: float = 5.0) -> None:
    """Until ``check()`` holds: what it watches changes on the server's side of the loop."""
    async with asyncio.timeout(within_s):
        while not check():  # noqa: ASYNC110 - nothing to wait on: the server's state is polled
            await asyncio.sleep(0.02)


async def test_head_hello_and_keep_alive(built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_module, "KEEPALIVE_S", 0.3)
    async with served(built) as port:
        c = await Client.open(port, built.token("alice"))
        head = c.head.decode().lower().split("\r\n")
        assert head[0] == "http/1.1 200 ok"
        for line in (
            "content-type: text/event-stream; charset=utf-8",
            "x-accel-buffering: no",
            "cache-control: no-store",
            "transfer-encoding: chunked",
            "x-content-type-options: nosniff",
        ):
            assert line in head
        assert await c.until(b"retry: 2000\n\n") == b": connected\n\nretry: 2000\n\n"
        assert await c.until(b"\n\n", within_s=3) == b": keep-alive\n\n"  # nothing happened: a comment
        c.close()


async def test_resume_from_last_event_id_then_live(built: Built) -> None:
    stored = built.events["d1"]
    async with served(built) as port:
        c = await Client.open(port, built.token("alice"), last_id=stored[49])
        await c.until(b"retry: 2000\n\n")
        assert [e["eventId"] for e in await c.events(10)] == stored[50:]  # what it missed, in order
        new = commit(built, "d1", 3)
        assert [e["eventId"] for e in await c.events(3)] == new
        # a second stream from further back than the feed holds reads for itself, the same
        built.svc.feeds.keep = 5
        commit(built, "d1", 10)
        old = await Client.open(port, built.token("alice"), last_id=stored[0])
        await old.until(b"retry: 2000\n\n")
        got = [str(e["eventId"]) for e in await old.events(59 + 3 + 10)]
        assert got[:62] == [*stored[1:], *new]
        assert got == sorted(got)
        c.close()
        old.close()


@pytest.mark.parametrize("last_id", ["not-an-id", "0" * 5000])
async def test_a_malformed_last_event_id_is_refused_and_opens_nothing(built: Built, last_id: str) -> None:
    async with served(built) as port:
        c = await Client.open(port, built.token("alice"), last_id=last_id)
        assert c.head.startswith(b"HTTP/1.1 422")
        assert built.svc.notifier.watching("d1") == 0
        c.close()


async def test_a_client_that_reads_nothing_holds_up_no_one_and_misses_nothing(built: Built) -> None:
    built.svc.feeds.keep = 50  # the slow stream falls behind what the device's feed holds
    async with served(built) as port:
        token = built.token("alice")
        slow = await Client.open(port, token, rcvbuf=4096)
        fast = await Client.open(port, token)
        await fast.until(b"retry: 2000\n\n")
        sent: list[str] = []
        for _ in range(10):  # ~5 MB: far more than the socket buffers hold
            sent += commit(built, "d1", 100, size=5000)
            got = await fast.events(100)
            assert [e["eventId"] for e in got] == sent[-100:]
        assert built.svc.notifier.watching("d1") == 2  # the slow one is still there, blocked
        await slow.until(b"retry: 2000\n\n")  # now it reads, and catches up in order
        assert [e["eventId"] for e in await slow.events(len(sent), within_s=30)] == sent
        slow.close()
        fast.close()
        await settle(lambda: built.svc.notifier.watching("d1") == 0)


async def test_a_slow_client_that_goes_away_is_freed(built: Built) -> None:
    async with served(built) as port:
        fds = descriptors(built)
        slow = await Client.open(port, built.token("alice"), rcvbuf=4096)
        for _ in range(5):
            commit(built, "d1", 100, size=5000)
        await asyncio.sleep(0.5)  # its stream now waits for the socket to drain
        assert built.svc.notifier.watching("d1") == 1
        slow.close()
        await settle(lambda: built.svc.notifier.watching("d1") == 0 and built.svc.feeds.streams("d1") == 0)
        await settle(lambda: descriptors(built) <= fds)


async def test_streams_that_lose_their_clients_leave_nothing_behind(built: Built) -> None:
    built.svc.stream_poll_s = 30.0  # no poll comes to notice: the disconnect itself must
    async with served(built) as port:
        tokens = {"d1": built.token("alice"), "d2": built.token("carol")}

        def connections() -> int:  # either end of a connection to the server, not yet closed by it
            return sum(
                port in (c.laddr[1], c.raddr[1])
                for c in psutil.Process().net_connections("tcp")
                if c.raddr and c.status in ("ESTABLISHED", "CLOSE_WAIT")
            )

        tracemalloc.start()
        try:
            held, fds, tasks = [], 0, 0
            for i in range(4):  # a flood of streams opened and dropped
                clients = [await Client.open(port, tokens[d], device=d) for d in ("d1", "d2") * 25]
                for c in clients:
                    await c.until(b"retry: 2000\n\n")
                assert built.svc.notifier.watching("d1") == 25
                assert built.svc.feeds.streams("d2") == 25
                assert connections() == 100  # each end of each connection
                for c in clients:
                    c.close()
                del clients
                await settle(
                    lambda: built.svc.notifier.watching("d1") + built.svc.notifier.watching("d2") == 0,
                    within_s=2,
                )
                assert built.svc.feeds.streams("d1") == built.svc.feeds.streams("d2") == 0
                await settle(lambda: connections() == 0, within_s=2)
                gc.collect()
                if i == 0:  # the first round filled what lasts (the database pool, caches)
                    fds, tasks = descriptors(built), len(asyncio.all_tasks())

                def back(fds: int = fds, tasks: int = tasks) -> bool:
                    # the connections above are all closed; other descriptors may still be
                    # opened by the database pool (PostgreSQL: one more connection, up to its size)
                    return len(asyncio.all_tasks()) <= tasks and descriptors(built) <= fds + 10

                await settle(back, within_s=2)
                held.append(tracemalloc.get_traced_memory()[0])
        finally:
            tracemalloc.stop()
        # after the first round, 150 more streams leave less than 3 KiB each (the audit entries
        # of the requests, ~1 KiB, wait for their writer here): a stream held on to is ~30 KiB
        assert held[-1] - held[0] < 150 * 3 * 1024, held


async def test_the_node_stopping_ends_every_stream_at_once(built: Built) -> None:
    built.svc.stream_poll_s = 30.0
    async with served(built) as port:
        tokens = {"d1": built.token("alice"), "d2": built.token("carol")}
        clients = [await Client.open(port, tokens[d], device=d) for d in ("d1", "d1", "d2")]
        for c in clients:
            await c.until(b"retry: 2000\n\n")
        built.svc.stopping.set()
        built.svc.notifier.wake_all()
        for c in clients:
            async with asyncio.timeout(2):
                assert await c.reader.readuntil(b"0\r\n\r\n")  # the chunked body's end
        await settle(lambda: built.svc.feeds.streams("d1") + built.svc.feeds.streams("d2") == 0)
        for c in clients:
            c.close()


async def test_a_body_sent_to_a_stream_is_dropped_and_too_much_of_it_ends_the_stream(built: Built) -> None:
    async with served(built) as port:
        fds = descriptors(built)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        token = built.token("alice")
        writer.write(
            f"GET /iotf/devices/d1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Accept: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
        with contextlib.suppress(ConnectionError):
            for _ in range(10):  # 640 KiB: read and dropped, the stream goes on
                writer.write(chunk)
                await writer.drain()
            await asyncio.sleep(0.3)
            assert built.svc.notifier.watching("d1") == 1
            for _ in range(16):  # past the 1 MiB request limit
                writer.write(chunk)
                await writer.drain()
        await settle(lambda: built.svc.notifier.watching("d1") == 0)
        assert built.svc.feeds.streams("d1") == 0
        writer.transport.abort()
        await settle(lambda: descriptors(built) <= fds)
