"""The SQLite deployment's fan-out: the hub on ``<data dir>/fanout.sock`` (iotvault.localfanout).

Real Unix sockets and locks in one process: two transports on one directory behave as two
processes would (``flock`` locks of separate open files exclude each other in one process
too). The attacker's side: oversized lines, garbage, floods of connections, clients that never
read, and descriptors back at their baseline afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from fanoutcalls import FanoutCalls
from iotvault import localfanout
from iotvault.fanout import MAX_PAYLOAD, Fanout, announce, announce_deleted, chunks
from iotvault.localfanout import MAX_CLIENTS, MAX_LINE, MAX_PENDING, LocalTransport, send_once

pytestmark = pytest.mark.integration


class Node(FanoutCalls):
    """What a node's fan-out calls, recorded; and its fan-out."""

    def fanout(self, data_dir: Path, database_url: str = "") -> Fanout:
        f = Fanout.for_settings(
            "", database_url, self.wake, self.wake_all, self.forget,
            access_changed=self.access_changed, data_dir=data_dir,
        )  # fmt: skip
        assert f is not None
        return f


async def _until(predicate: Callable[[], bool], node: Node, within_s: float = 5.0) -> None:
    await node.until(predicate, within_s)


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),  # what `iotvault serve` runs
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "d"  # short: a Unix socket's path has ~100 bytes
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
async def hub(data_dir: Path) -> AsyncIterator[LocalTransport]:
    """A transport that became the hub, listening (as a node's fan-out does)."""
    t = LocalTransport(data_dir)
    gen = t.listen()
    assert await anext(gen) == ""
    assert t.hub is not None
    yield t
    await gen.aclose()
    await t.close()


async def _client(data_dir: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(data_dir / "fanout.sock"), limit=2 * MAX_LINE)


async def _closed_by_hub(reader: asyncio.StreamReader, within_s: float = 5.0) -> bool:
    """True once the hub closed this connection (EOF or reset), reading what it still sent."""
    async with asyncio.timeout(within_s):
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
    return True


async def _line(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), 5)


async def _close(w: asyncio.StreamWriter) -> None:
    w.close()
    with contextlib.suppress(ConnectionError):
        await w.wait_closed()


def _fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


async def _polled(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    """Until ``predicate()``: the hub's state and the descriptor count have no event to await."""
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110 - nothing to wait on but the state itself
            await asyncio.sleep(0.01)


async def test_two_nodes_on_one_data_dir_hear_each_other_and_themselves(data_dir: Path) -> None:
    a, b = Node(), Node()
    async with a.fanout(data_dir) as fa, b.fanout(data_dir) as fb:
        fa.start()
        fb.start()
        await asyncio.wait_for(fa.listening.wait(), 5)
        await asyncio.wait_for(fb.listening.wait(), 5)
        assert (fa._transport.hub is None) != (fb._transport.hub is None), "exactly one hub"  # type: ignore[attr-defined]
        assert a.woken_all == b.woken_all == 1  # "" once each: every stream woken,
        assert a.access == b.access == 1  # and the authentication cache emptied
        fa.publish({"dev-1", "dev-2"})
        await _until(lambda: {"dev-1", "dev-2"} in a.woken and {"dev-1", "dev-2"} in b.woken, b)
        fb.announce_forget("dev-9")
        fb.announce_access_changed()
        await _until(lambda: a.forgotten == [{"dev-9"}] and a.access == 2, a)
        await _until(lambda: b.forgotten == [{"dev-9"}] and b.access == 2, b)
        # the largest message the fan-out sends goes through whole
        ids = {f"d{i:05d}-" + "x" * 57 for i in range(200)}
        big = chunks(ids)
        assert max(len(p) for p in big) + 2 > MAX_PAYLOAD - 100
        fa.publish(ids)
        await _until(lambda: set().union(*b.woken) >= ids, b)
    sock = data_dir / "fanout.sock"
    assert not sock.exists(), "the hub removes its socket when it stops"


async def test_socket_and_lock_are_owner_only_and_a_stale_socket_is_replaced(data_dir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a dead hub's file: bound, not listening
    stale.bind(str(data_dir / "fanout.sock"))
    stale.close()
    t = LocalTransport(data_dir)
    gen = t.listen()
    try:
        assert await anext(gen) == ""
        assert t.hub is not None
        for name in ("fanout.sock", "fanout.lock"):
            mode = stat.S_IMODE((data_dir / name).stat().st_mode)
            assert mode == 0o600, f"{name}: {oct(mode)}"
    finally:
        await gen.aclose()
        await t.close()


async def test_when_the_hub_stops_a_client_becomes_the_hub_and_hears_the_others(data_dir: Path) -> None:
    a, b, c = Node(), Node(), Node()
    fa = a.fanout(data_dir)
    fa.start()
    await asyncio.wait_for(fa.listening.wait(), 5)
    async with b.fanout(data_dir) as fb:
        fb.start()
        await asyncio.wait_for(fb.listening.wait(), 5)
        assert fa._transport.hub is not None  # type: ignore[attr-defined]
        assert fb._transport.hub is None  # type: ignore[attr-defined]
        await fa.__aexit__(None, None, None)  # the hub goes away
        await _until(lambda: fb._transport.hub is not None and b.woken_all >= 2, b)  # type: ignore[attr-defined]
        async with c.fanout(data_dir) as fc:
            fc.start()
            await asyncio.wait_for(fc.listening.wait(), 5)
            fc.publish({"after"})
            await _until(lambda: {"after"} in b.woken, b)
            await _until(lambda: {"after"} in c.woken, c)


async def test_a_line_longer_than_the_bound_drops_that_client_only(
    data_dir: Path, hub: LocalTransport
) -> None:
    good_r, good_w = await _client(data_dir)
    bad_r, bad_w = await _client(data_dir)
    bad_w.write(b"e:" + b"x" * MAX_LINE)  # no newline yet: the hub must not wait for one
    await bad_w.drain()
    assert await _closed_by_hub(bad_r)
    await _close(bad_w)
    # a complete line one byte too long too
    bad_r, bad_w = await _client(data_dir)
    bad_w.write(b"e:" + b"x" * (MAX_LINE - 2) + b"\n")
    assert await _closed_by_hub(bad_r)
    await _close(bad_w)
    good_w.write(b"e:still-here\n")
    assert await _line(good_r) == b"e:still-here\n"
    await _close(good_w)


@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xfe\x00\x01\n", b"e:caf\xc3\xa9\n", b"\n", b"hello\n", b"e:a b\n", b"E:x\n", b"e:\x1b[2J\n"],
)
async def test_garbage_drops_the_client(data_dir: Path, hub: LocalTransport, garbage: bytes) -> None:
    r, w = await _client(data_dir)
    w.write(garbage)
    assert await _closed_by_hub(r)
    await _close(w)
    r, w = await _client(data_dir)  # and the hub goes on
    w.write(b"a:*\n")
    assert await _line(r) == b"a:*\n"
    await _close(w)


async def test_connections_beyond_the_bound_are_closed_at_once(data_dir: Path, hub: LocalTransport) -> None:
    assert hub.hub is not None
    conns = []
    try:
        for _ in range(MAX_CLIENTS - 1):  # the hub's own connection counts
            conns.append(await _client(data_dir))
        await _polled(lambda: len(hub.hub.peers) >= MAX_CLIENTS)  # type: ignore[union-attr]
        extra_r, extra_w = await _client(data_dir)
        assert await _closed_by_hub(extra_r, within_s=2)
        await _close(extra_w)
        assert len(hub.hub.peers) == MAX_CLIENTS
        r, w = conns[0]
        w.write(b"e:x\n")
        assert await _line(r) == b"e:x\n"
        assert await _line(conns[-1][0]) == b"e:x\n"
    finally:
        for _, w in conns:
            await _close(w)


async def test_a_client_that_never_reads_is_dropped_and_blocks_nobody(
    data_dir: Path, hub: LocalTransport
) -> None:
    assert hub.hub is not None
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    mute.connect(str(data_dir / "fanout.sock"))
    reader_r, reader_w = await _client(data_dir)
    sender_r, sender_w = await _client(data_dir)
    await asyncio.sleep(0.05)
    assert len(hub.hub.peers) == 4
    line = b"e:" + b"d" * (MAX_LINE - 4) + b"\n"
    received = 0

    async def drain_reader() -> None:
        nonlocal received
        while chunk := await reader_r.read(1 << 16):
            received += len(chunk)

    draining = asyncio.create_task(drain_reader())
    drain_sender = asyncio.create_task(sender_r.read(-1))  # the sender reads its echo too
    sent = 0
    started = time.monotonic()
    try:
        while len(hub.hub.peers) == 4:
            sender_w.write(line)
            await sender_w.drain()
            sent += len(line)
            assert sent < 20 * MAX_PENDING, "the mute client was never dropped"
            await asyncio.sleep(0)
        took = time.monotonic() - started
        assert sent > MAX_PENDING  # dropped for what waited, not earlier
        assert took < 10, f"the hub was held up: {took:.1f} s"
        # the others still get every line
        sender_w.write(b"e:after\n")
        await sender_w.drain()
        await _polled(lambda: received >= sent + len(b"e:after\n"))
        assert received == sent + len(b"e:after\n")
    finally:
        mute.close()
        draining.cancel()
        drain_sender.cancel()
        await _close(reader_w)
        await _close(sender_w)


async def test_descriptors_return_to_baseline_after_100_abusive_rounds(
    data_dir: Path, hub: LocalTransport
) -> None:
    assert hub.hub is not None
    await asyncio.sleep(0.05)
    baseline = _fds()
    abuse = [b"e:" + b"x" * (MAX_LINE + 10), b"\xff\n", b"e:ok\n", b"", b"e:half-a-line"]
    for i in range(100):
        _, w = await _client(data_dir)
        w.write(abuse[i % len(abuse)])
        await w.drain()
        if i % 3 == 0:
            w.transport.abort()
        else:
            await _close(w)
            await w.wait_closed()
    assert send_once(data_dir, "e:from-cli")
    await _polled(lambda: len(hub.hub.peers) == 1 and _fds() == baseline)  # type: ignore[union-attr]
    assert _fds() == baseline
    assert len(hub.hub.peers) == 1  # the hub's own connection


async def test_the_command_line_sends_through_the_hub_and_is_quiet_without_one(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = f"sqlite:///{data_dir / 'iotvault.db'}"
    assert announce("", db, "a:*", data_dir=data_dir) is False  # nobody runs: nobody to tell
    assert announce_deleted("", "", "gone", data_dir=data_dir) is False
    assert not caplog.records
    a = Node()
    async with a.fanout(data_dir, db) as fa:
        fa.start()
        await asyncio.wait_for(fa.listening.wait(), 5)
        assert await asyncio.to_thread(announce_deleted, "", db, "gone", data_dir=data_dir) is True
        assert await asyncio.to_thread(announce, "", "", "a:*", data_dir=data_dir) is True
        await _until(lambda: a.forgotten == [{"gone"}] and a.access == 2, a)


def test_no_local_socket_for_postgresql_or_redis_or_a_path_too_long(tmp_path: Path) -> None:
    n = Node()
    for redis_url, db in (("", "postgresql://u@127.0.0.1:5432/x"), ("redis://127.0.0.1:6379/0", "")):
        f = Fanout.for_settings(redis_url, db, n.wake, n.wake_all, data_dir=tmp_path)
        assert f is not None
        assert not isinstance(f._transport, LocalTransport)
    deep = tmp_path / ("x" * 120)
    assert Fanout.for_settings("", "", n.wake, n.wake_all, data_dir=deep) is None
    assert not localfanout.usable(deep)
    assert list(tmp_path.iterdir()) == []
