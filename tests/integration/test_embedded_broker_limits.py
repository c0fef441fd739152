"""The embedded broker's limits, against the real broker over raw sockets (in this process)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from iotvault.broker.codec import Connect, PacketIdOnly, Publish, encode
from iotvault.broker.embedded import BrokerLimits, EmbeddedBroker, InboundPublish

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
TIMEOUT = 5.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def until(check: object, what: str) -> None:
    """amqtt keeps a retained message after it acknowledged it, in its own delivery loop."""
    for _ in range(50):
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within 2.5 s: {what}")


async def connected(port: int, client_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(encode(Connect(client_id, keep_alive=30)))
    assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"\x20\x02\x00\x00"
    return reader, writer


async def test_a_flood_of_unknown_pubrels_writes_a_bounded_number_of_log_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding F: 20,000 PUBRELs with unknown packet ids; amqtt warns for each."""
    caplog.set_level(logging.INFO)
    limits = BrokerLimits(log_lines_per_connection=10)
    async with EmbeddedBroker(HOST, 0, limits=limits) as broker:
        reader, writer = await connected(broker.port, "noisy")
        pubrel = encode(PacketIdOnly(6, 1))
        for i in range(20):
            writer.write(pubrel * 1000)
            await writer.drain()
            if i == 0:
                await asyncio.sleep(0.1)
        writer.write(b"\xc0\x00")  # PINGREQ: once it is answered, every PUBREL was read
        data = b""
        while not data.endswith(b"\xd0\x00"):
            data += await asyncio.wait_for(reader.read(65536), TIMEOUT)
        writer.close()
        await asyncio.sleep(0.2)
    lines = [r for r in caplog.records if r.name.startswith(("amqtt", "iotvault.broker"))]
    assert len(lines) <= 10 + 5, [r.getMessage() for r in lines[:20]]
    assert any("further log lines suppressed" in r.getMessage() for r in lines)


async def test_retained_messages_are_bounded_in_count_and_bytes() -> None:
    """Finding C: retained publishes on many topics keep at most the configured number."""

    async def store(message: InboundPublish) -> None:
        return None

    limits = BrokerLimits(max_retained=5, max_retained_bytes=10_000)
    async with EmbeddedBroker(HOST, 0, on_publish=store, limits=limits) as broker:
        reader, writer = await connected(broker.port, "retainer")
        for i in range(50):
            writer.write(encode(Publish(f"t/{i}", b"x" * 100, qos=1, retain=True, packet_id=i + 1)))
        for _ in range(50):
            assert (await asyncio.wait_for(reader.readexactly(4), TIMEOUT))[0] == 0x40
        core = broker._core
        assert core is not None
        await until(lambda: len(core.retained_topics) == 5, "five retained")
        await asyncio.sleep(0.2)
        assert len(core.retained_topics) == 5
        # bytes: one big message does not fit beside them
        writer.write(encode(Publish("t/big", b"x" * 9_800, qos=1, retain=True, packet_id=99)))
        await asyncio.wait_for(reader.readexactly(4), TIMEOUT)
        await asyncio.sleep(0.2)
        assert "t/big" not in core.retained_topics
        # clearing one (empty retained payload) frees its slot, in amqtt too
        writer.write(encode(Publish("t/0", b"", qos=1, retain=True, packet_id=100)))
        await asyncio.wait_for(reader.readexactly(4), TIMEOUT)
        writer.write(encode(Publish("t/new", b"y", qos=1, retain=True, packet_id=101)))
        await asyncio.wait_for(reader.readexactly(4), TIMEOUT)
        await until(lambda: core.retained_topics == {"t/1", "t/2", "t/3", "t/4", "t/new"}, "t/0 replaced")
        writer.close()


async def test_retained_messages_can_be_turned_off() -> None:
    async with EmbeddedBroker(HOST, 0, limits=BrokerLimits(max_retained=0)) as broker:
        reader, writer = await connected(broker.port, "retainer")
        writer.write(encode(Publish("t/1", b"x", qos=1, retain=True, packet_id=1)))
        await asyncio.wait_for(reader.readexactly(4), TIMEOUT)
        await asyncio.sleep(0.2)
        assert broker._core is not None
        assert broker._core.retained_topics == set()
        writer.close()


async def test_in_flight_messages_per_connection_are_bounded_by_back_pressure() -> None:
    """At most max_inflight QoS 1 messages of one connection are being stored at once."""
    release = asyncio.Event()
    running = 0
    most = 0

    async def slow_store(message: InboundPublish) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1

    async with EmbeddedBroker(HOST, 0, on_publish=slow_store, limits=BrokerLimits(max_inflight=8)) as broker:
        reader, writer = await connected(broker.port, "bursty")
        for i in range(100):
            writer.write(encode(Publish("t/e", b"{}", qos=1, packet_id=i + 1)))
        await writer.drain()
        await asyncio.sleep(0.5)
        assert most == 8
        release.set()
        acks = b""
        while len(acks) < 400:
            acks += await asyncio.wait_for(reader.read(4096), TIMEOUT)
        assert len(acks) == 400  # every message stored and acknowledged in the end
        writer.close()


async def test_connections_per_address_and_in_all_are_capped() -> None:
    limits = BrokerLimits(max_connections=6, max_connections_per_address=4)
    async with EmbeddedBroker(HOST, 0, limits=limits) as broker:
        held = [await connected(broker.port, f"c{i}") for i in range(4)]
        reader, writer = await asyncio.open_connection(HOST, broker.port)
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # fifth from this address
        writer.close()
        other = [
            await asyncio.open_connection(HOST, broker.port, local_addr=("127.0.0.2", 0)) for _ in range(2)
        ]
        reader, writer = await asyncio.open_connection(HOST, broker.port, local_addr=("127.0.0.3", 0))
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # seventh in all
        writer.close()
        for _, w in held + other:
            w.close()
        await asyncio.sleep(0.2)
        assert broker.open_connections == 0


async def test_a_client_with_keep_alive_0_is_watched_by_tcp_keep_alive() -> None:
    """Finding G: keep-alive 0 means the broker never drops the client for silence; TCP does."""
    import socket  # noqa: PLC0415 -- only this test looks at socket options

    async with EmbeddedBroker(HOST, 0) as broker:
        reader, writer = await asyncio.open_connection(HOST, broker.port)
        writer.write(encode(Connect("sleepy", keep_alive=0)))
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"\x20\x02\x00\x00"
        (stream,) = broker._streams
        sock = stream.writer.stream.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
        writer.close()


async def test_connect_and_close_leaves_nothing_for_shutdown_to_wait_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 18 finding 7: such clients left stuck connections; shutdown waited 10 s for them."""
    loop = asyncio.get_running_loop()
    async with EmbeddedBroker(HOST, 0) as broker:
        for i in range(100):
            _, writer = await asyncio.open_connection(HOST, broker.port)
            writer.write(encode(Connect(f"dev{i % 5}", keep_alive=30)))
            await writer.drain()
            writer.transport.abort()  # gone before the CONNACK
            writer.close()
        started = loop.time()
        _, writer = await connected(broker.port, "dev1")  # the same id: no wait for a stuck predecessor
        assert loop.time() - started < 1.0
        writer.close()
        await asyncio.sleep(0.5)
        stopping = loop.time()
    assert loop.time() - stopping < 2.0
    assert not any("cancelled at shutdown" in r.getMessage() for r in caplog.records)
