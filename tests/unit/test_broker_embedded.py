"""The embedded broker's own parts, without sockets: the filter index, the writer, the packet stream."""

from __future__ import annotations

import asyncio
import itertools
import struct
from typing import Any

import pytest

from iotvault.broker.codec import Publish, decode
from iotvault.broker.filter_index import FilterIndex
from iotvault.broker.framing import GatheringWriter, PacketStream


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---- which topics could a subscriber receive ------------------------------------------------


def matches(topic: str, topic_filter: str) -> bool:
    """MQTT 3.1.1 section 4.7, written plainly: the reference for the index."""
    t, f = topic.split("/"), topic_filter.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True  # also the parent level: "a/#" matches "a"
        if i >= len(t) or level not in ("+", t[i]):
            return False
    return len(t) == len(f)


LEVELS = ["a", "b", ""]
TOPICS = ["/".join(p) for n in range(1, 4) for p in itertools.product(LEVELS, repeat=n)]
FILTERS = sorted(
    {
        "/".join(p)
        for n in range(1, 4)
        for p in itertools.product([*LEVELS, "+", "#"], repeat=n)
        if "#" not in p[:-1]  # "#" only last, as amqtt checks before asking to authorize
    }
)


@pytest.mark.parametrize("topic_filter", FILTERS)
def test_filter_index_never_misses_a_topic_its_filter_matches(topic_filter: str) -> None:
    index = FilterIndex()
    index.add(topic_filter)
    for topic in TOPICS:
        if matches(topic, topic_filter):
            assert index.may_match(topic), (topic_filter, topic)


def test_filter_index_keeps_device_events_apart_from_command_subscriptions() -> None:
    index = FilterIndex()
    assert not index.may_match("iot-2/type/t/id/d1/evt/reading/fmt/json")  # nothing subscribed
    for device in ("d1", "d2"):
        index.add(f"iot-2/type/t/id/{device}/cmd/+/fmt/json")
    index.add("iot-2/type/t/id/d3/cmd/open/fmt/json")
    assert not index.may_match("iot-2/type/t/id/d1/evt/reading/fmt/json")
    assert not index.may_match("iot-2/type/t/id/d1/mon")
    assert not index.may_match("iot-2/type/t/id/d3/cmd/close/fmt/json")
    assert index.may_match("iot-2/type/t/id/d1/cmd/open/fmt/json")
    assert index.may_match("iot-2/type/t/id/d3/cmd/open/fmt/json")
    index.add("#")
    assert index.may_match("iot-2/type/t/id/d1/evt/reading/fmt/json")


def test_a_full_filter_index_answers_maybe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("iotvault.broker.filter_index._MAX_FILTER_KEYS", 2)
    index = FilterIndex()
    for name in ("a", "b", "c"):
        index.add(f"{name}/+")
    assert index.may_match("z/anything")


# ---- the writer: one write per turn of the loop ---------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        assert not self.closing
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    def close(self) -> None:
        self.closing = True


class FakeStreamWriter:
    """What amqtt's StreamWriterAdapter uses of asyncio.StreamWriter."""

    def __init__(self) -> None:
        self.transport = FakeTransport()
        self.closed = False

    async def drain(self) -> None:
        return None

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self.transport.closing = True

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str) -> Any:
        return None


def buffered() -> tuple[GatheringWriter, FakeTransport]:
    stream = FakeStreamWriter()
    return GatheringWriter(stream), stream.transport  # type: ignore[arg-type]


async def test_writes_of_one_turn_of_the_loop_go_out_together_and_in_order() -> None:
    writer, transport = buffered()
    writer.write(b"\x40\x02\x00\x01")
    await writer.drain()
    writer.write(b"\x40\x02\x00\x02")
    assert transport.writes == []
    await asyncio.sleep(0)
    assert transport.writes == [b"\x40\x02\x00\x01\x40\x02\x00\x02"]
    writer.write(b"\xd0\x00")
    await asyncio.sleep(0)
    assert transport.writes[1:] == [b"\xd0\x00"]


async def test_close_sends_what_waits_then_closes_the_transport_itself() -> None:
    writer, transport = buffered()
    writer.write(b"x" * (64 * 1024))
    await writer.drain()
    assert transport.writes == [b"x" * (64 * 1024)]
    writer.write(b"last")
    writer.close()  # never drains, so a peer that has gone cannot keep the socket open
    assert transport.writes[1:] == [b"last"]
    assert transport.closing
    writer.write(b"after close")
    await asyncio.sleep(0)
    assert transport.writes[1:] == [b"last"]


async def test_a_dropped_connection_sends_what_was_written_before_then_nothing() -> None:
    writer, transport = buffered()
    stream = PacketStream(asyncio.StreamReader(), writer, 1024, ("127.0.0.1", 1))
    stream.send(b"\x40\x02\x00\x07")
    stream.abort()
    assert transport.writes == [b"\x40\x02\x00\x07"]
    assert stream.closed
    stream.send(b"\x40\x02\x00\x08")
    await asyncio.sleep(0)
    assert transport.writes == [b"\x40\x02\x00\x07"]


# ---- the packet stream: whole packets, one at a time ---------------------------------------


def publish(
    packet_id: int, payload: bytes, topic: bytes = b"iot-2/type/t/id/d1/evt/reading/fmt/json"
) -> bytes:
    body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", packet_id) + payload
    length = len(body)
    encoded = bytearray()
    while True:
        length, digit = divmod(length, 128)
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            break
    return b"\x32" + bytes(encoded) + body


def stream_for(max_packet_size: int = 4096) -> tuple[PacketStream, asyncio.StreamReader, FakeTransport]:
    source = asyncio.StreamReader()
    writer, transport = buffered()
    stream = PacketStream(source, writer, max_packet_size, ("127.0.0.1", 1))
    return stream, source, transport


async def read_packet(stream: PacketStream) -> bytes:
    """Read one packet the way amqtt does: a byte at a time for the header, then the body."""
    first = await stream.read(1)
    if not first:
        return b""
    header = first
    while True:
        byte = await stream.read(1)
        header += byte
        if not byte[0] & 0x80:
            break
    size = 0
    for i, b in enumerate(header[1:]):
        size += (b & 0x7F) * 128**i
    return header + await stream.read(size)


@pytest.mark.parametrize("piece", [1, 7, 100, 10_000])
async def test_packets_read_the_same_however_the_bytes_arrive(piece: int) -> None:
    stream, source, _ = stream_for()
    packets = [publish(i + 1, b'{"n": %d}' % i + b" " * (i * 37 % 300)) for i in range(40)]
    data = b"".join(packets)

    async def feed() -> None:
        for at in range(0, len(data), piece):
            source.feed_data(data[at : at + piece])
            await asyncio.sleep(0)
        source.feed_eof()

    feeding = asyncio.ensure_future(feed())
    for i in range(40):
        packet = decode(await read_packet(stream))
        assert isinstance(packet, Publish)
        assert packet.packet_id == i + 1
        assert packet.payload.startswith(b'{"n": %d}' % i)
    await feeding
    assert await stream.read(1) == b""  # the end of the stream


async def test_a_stream_that_ends_inside_a_packet_ends_at_the_last_whole_one() -> None:
    stream, source, _ = stream_for()
    source.feed_data(publish(1, b"{}") + b"\x32\x05ab")
    source.feed_eof()
    assert decode(await read_packet(stream)) == Publish(
        "iot-2/type/t/id/d1/evt/reading/fmt/json", b"{}", 1, packet_id=1
    )
    assert await stream.read(1) == b""  # the partial packet is never served


async def test_an_oversized_packet_is_refused_from_its_header_before_the_body_arrives() -> None:
    stream, source, transport = stream_for(max_packet_size=1024)
    violations: list[str] = []
    stream.on_violation = violations.append
    source.feed_data(b"\x32\x80\x80\x04")  # 64 KiB announced, no body
    assert await stream.read(1) == b""  # refused before any byte of it is served
    assert transport.closing
    assert violations == ["packet of 65540 bytes is over the limit of 1024"]


async def test_a_malformed_packet_is_never_served_and_ends_the_connection() -> None:
    stream, source, transport = stream_for()
    violations: list[str] = []
    stream.on_violation = violations.append
    # the smuggling attack: a wildcard topic, with a PINGREQ hidden in the payload
    source.feed_data(publish(1, b"\xc0\x00", topic=b"a/+") + b"\xc0\x00")
    assert await stream.read(1) == b""
    assert violations == ["wildcard in a topic name"]
    assert transport.closing
    assert transport.writes == []


async def test_a_parser_that_reads_past_the_packet_ends_the_connection() -> None:
    stream, source, transport = stream_for()
    violations: list[str] = []
    stream.on_violation = violations.append
    source.feed_data(b"\xc0\x00\xc0\x00")  # two PINGREQs
    assert await stream.read(1) == b"\xc0"
    assert await stream.read(2) == b""  # asks for more than this packet holds
    assert violations == ["protocol layer out of step with the packet boundaries"]
    assert transport.closing


async def test_the_connect_read_at_the_door_is_served_then_what_followed_it() -> None:
    stream, source, _ = stream_for()
    connect = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x1e\x00\x01d"
    following = publish(1, b"{}")
    source.feed_data(connect + following)  # a client that does not wait for CONNACK
    got = await stream.next_packet()
    assert got is not None
    assert got[0] == connect
    stream.serve(got[0])
    assert await read_packet(stream) == connect
    assert await read_packet(stream) == following


async def test_past_max_inflight_the_stream_is_not_read_until_one_is_stored() -> None:
    source = asyncio.StreamReader()
    writer, _ = buffered()
    stream = PacketStream(source, writer, 4096, ("127.0.0.1", 1), max_inflight=2)
    source.feed_data(publish(1, b"{}") + publish(2, b"{}") + publish(3, b"{}"))
    await read_packet(stream)  # each QoS 1 PUBLISH read holds a slot until it is released
    await read_packet(stream)
    third = asyncio.ensure_future(read_packet(stream))
    await asyncio.sleep(0.05)
    assert not third.done()
    stream.release()
    assert decode(await asyncio.wait_for(third, 1)) == Publish(
        "iot-2/type/t/id/d1/evt/reading/fmt/json", b"{}", 1, packet_id=3
    )


async def test_a_read_waiting_for_in_flight_room_ends_when_the_connection_is_dropped() -> None:
    source = asyncio.StreamReader()
    writer, _ = buffered()
    stream = PacketStream(source, writer, 4096, ("127.0.0.1", 1), max_inflight=1)
    source.feed_data(publish(1, b"{}") + publish(2, b"{}"))
    await read_packet(stream)  # holds the only slot
    waiting = asyncio.ensure_future(stream.read(1))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    stream.abort()  # e.g. a revoked device, while its messages are still being stored
    assert await asyncio.wait_for(waiting, 1) == b""
