"""The embedded broker's own parts, without sockets: the filter index, the writer, the reader."""

from __future__ import annotations

import asyncio
import itertools
import struct
from typing import Any

import pytest
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.publish import PublishPacket

from iotvault.broker.embedded import _BufferedWriter, _FilterIndex, _FramedReader


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
    index = _FilterIndex()
    index.add(topic_filter)
    for topic in TOPICS:
        if matches(topic, topic_filter):
            assert index.may_match(topic), (topic_filter, topic)


def test_filter_index_keeps_device_events_apart_from_command_subscriptions() -> None:
    index = _FilterIndex()
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
    monkeypatch.setattr("iotvault.broker.embedded._MAX_FILTER_KEYS", 2)
    index = _FilterIndex()
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


def buffered() -> tuple[_BufferedWriter, FakeTransport]:
    stream = FakeStreamWriter()
    return _BufferedWriter(stream), stream.transport  # type: ignore[arg-type]


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


async def test_close_sends_what_waits_and_drain_sends_a_large_backlog_at_once() -> None:
    writer, transport = buffered()
    writer.write(b"x" * (64 * 1024))
    await writer.drain()
    assert transport.writes == [b"x" * (64 * 1024)]
    writer.write(b"last")
    await writer.close()
    assert transport.writes[1:] == [b"last"]
    writer.write(b"after close")
    await asyncio.sleep(0)
    assert transport.writes[1:] == [b"last"]


async def test_a_dropped_connection_sends_what_was_written_before_then_nothing() -> None:
    writer, transport = buffered()
    reader = _FramedReader(asyncio.StreamReader(), writer, 1024, ("127.0.0.1", 1))
    reader.send(b"\x40\x02\x00\x07")
    reader.abort()
    assert transport.writes == [b"\x40\x02\x00\x07"]
    assert reader.closed
    reader.send(b"\x40\x02\x00\x08")
    await asyncio.sleep(0)
    assert transport.writes == [b"\x40\x02\x00\x07"]


# ---- the reader: read ahead, cut small reads, follow the framing ----------------------------


def publish(packet_id: int, payload: bytes) -> bytes:
    topic = b"iot-2/type/t/id/d1/evt/reading/fmt/json"
    body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", packet_id) + payload
    length = len(body)
    encoded = bytearray()
    while True:
        length, digit = divmod(length, 128)
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            break
    return b"\x32" + bytes(encoded) + body


def reader_for(max_packet_size: int = 4096) -> tuple[_FramedReader, asyncio.StreamReader, FakeTransport]:
    stream = asyncio.StreamReader()
    writer, transport = buffered()
    reader = _FramedReader(stream, writer, max_packet_size, ("127.0.0.1", 1))
    reader.replay_connect()  # past the door: nothing to replay
    return reader, stream, transport


@pytest.mark.parametrize("piece", [1, 7, 100, 10_000])
async def test_packets_read_the_same_however_the_bytes_arrive(piece: int) -> None:
    reader, stream, _ = reader_for()
    packets = [publish(i + 1, b'{"n": %d}' % i + b" " * (i * 37 % 300)) for i in range(40)]
    data = b"".join(packets)

    async def feed() -> None:
        for at in range(0, len(data), piece):
            stream.feed_data(data[at : at + piece])
            await asyncio.sleep(0)
        stream.feed_eof()

    feeding = asyncio.ensure_future(feed())
    for i in range(40):
        header = await MQTTFixedHeader.from_stream(reader)
        packet = await PublishPacket.from_stream(reader, fixed_header=header)
        assert packet.variable_header.packet_id == i + 1
        assert bytes(packet.data).startswith(b'{"n": %d}' % i)
    await feeding
    assert await MQTTFixedHeader.from_stream(reader) is None  # the end of the stream


async def test_the_end_of_the_stream_inside_a_read_is_an_incomplete_read() -> None:
    reader, stream, _ = reader_for()
    stream.feed_data(b"\x32\x05ab")
    stream.feed_eof()
    assert await reader.read(1) == b"\x32"
    assert await reader.read(1) == b"\x05"
    with pytest.raises(asyncio.IncompleteReadError):
        await reader.read(5)


async def test_an_oversized_packet_is_refused_from_its_header_before_the_body_arrives() -> None:
    reader, stream, transport = reader_for(max_packet_size=1024)
    stream.feed_data(b"\x32\x80\x80\x04")  # 64 KiB announced
    assert await reader.read(1) == b"\x32"
    assert await reader.read(1) == b"\x80"
    assert await reader.read(1) == b"\x80"
    assert await reader.read(1) == b""  # refused: amqtt sees the end of the stream
    assert transport.closing
    assert reader.closed


async def test_the_connect_read_at_the_door_is_served_again_then_what_followed_it() -> None:
    stream = asyncio.StreamReader()
    writer, _ = buffered()
    reader = _FramedReader(stream, writer, 4096, ("127.0.0.1", 1))
    connect = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x1e\x00\x01d"
    following = publish(1, b"{}")
    stream.feed_data(connect + following)  # a client that does not wait for CONNACK
    header = await MQTTFixedHeader.from_stream(reader)
    assert header is not None
    assert await reader.read(header.remaining_length) == connect[2:]
    reader.replay_connect()
    assert await reader.read(len(connect)) == connect
    assert await reader.read(len(following)) == following
