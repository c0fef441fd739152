"""Contracts with amqtt: each private internal the adapter touches, checked on the installed amqtt.

When an upgrade of amqtt changes one of these, a test here fails with the internal's number
from :mod:`iotvault.broker.amqtt_adapter`'s docstring, before anything behaves wrongly.
"""

from __future__ import annotations

import asyncio
import inspect

import pytest
from amqtt.adapters import BufferReader
from amqtt.broker import Broker
from amqtt.mqtt import packet_class
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import ProtocolHandler
from amqtt.session import IncomingApplicationMessage, Session
from codec_strategies import client_packets
from hypothesis import given, settings

from iotvault.broker import amqtt_adapter
from iotvault.broker.amqtt_adapter import check_amqtt_version
from iotvault.broker.codec import Packet, encode
from iotvault.errors import BrokerError


def test_the_installed_amqtt_is_the_supported_one() -> None:
    assert check_amqtt_version().startswith(amqtt_adapter.SUPPORTED_AMQTT)


def test_another_amqtt_version_is_a_clear_error() -> None:
    with pytest.raises(BrokerError, match=r"supports amqtt 0\.12\.x, but 0\.13\.0 is installed"):
        check_amqtt_version("0.13.0")


def test_internal_1_handle_client_session_signature() -> None:
    params = list(inspect.signature(Broker._handle_client_session).parameters)
    assert params == ["self", "reader", "writer", "client_session", "handler", "server", "listener_name"]


def test_internal_2_message_flow_is_an_instance_attribute_called_per_publish() -> None:
    assert inspect.iscoroutinefunction(ProtocolHandler._handle_message_flow)
    assert list(inspect.signature(ProtocolHandler._handle_message_flow).parameters) == ["self", "app_message"]
    assert "self._handle_message_flow(" in inspect.getsource(ProtocolHandler.handle_publish)


def test_internal_3_message_and_session_fields() -> None:
    message = IncomingApplicationMessage(7, "t", 1, b"x", retain=False)
    for name in ("topic", "data", "qos", "packet_id", "pubrec_packet", "publish_packet"):
        assert hasattr(message, name), name
    session = Session()
    for name in ("client_id", "username", "keep_alive"):
        assert hasattr(session, name), name


def test_internal_4_keep_alive_is_the_reader_loops_timeout() -> None:
    source = inspect.getsource(ProtocolHandler._reader_loop)
    assert "self.session.keep_alive" in source
    assert "keepalive_timeout = None" in source  # 0 means: no timeout


def test_internal_5_connection_closed_resolves_the_disconnect_waiter() -> None:
    async def run() -> None:
        handler = BrokerProtocolHandler.__new__(BrokerProtocolHandler)
        handler.logger = __import__("logging").getLogger("test")
        handler._disconnect_waiter = asyncio.get_running_loop().create_future()
        waiter = handler._disconnect_waiter
        await handler.handle_connection_closed()
        assert waiter.done()
        assert waiter.result() is None

    asyncio.run(run())


def test_internal_6_retained_messages_are_a_dict_cleared_by_an_empty_payload() -> None:
    source = inspect.getsource(Broker.retain_message)
    assert "self._retained_messages[topic_name]" in source
    assert list(inspect.signature(Broker.retain_message).parameters) == [
        "self", "source_session", "topic_name", "data", "qos",
    ]  # fmt: skip


async def _amqtt_parse(raw: bytes) -> tuple[object, bytes]:
    reader = BufferReader(raw)
    header = await MQTTFixedHeader.from_stream(reader)
    assert header is not None
    parsed = await packet_class(header).from_stream(reader, fixed_header=header)
    return parsed, await reader.read()


@settings(max_examples=300)
@given(client_packets)
def test_amqtt_parses_every_packet_the_codec_accepts_to_its_last_byte(packet: Packet) -> None:
    """The one-packet-at-a-time guarantee rests on this: amqtt never stops inside a packet
    that the codec let through, so it can never read the rest as a new packet."""
    raw = encode(packet)
    parsed, left = asyncio.run(_amqtt_parse(raw))
    assert left == b"", f"amqtt left {len(left)} bytes of {raw!r}"
    assert parsed is not None
