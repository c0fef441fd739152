"""The MQTT 5 translator of one connection: what amqtt reads, and what the device is sent."""

from __future__ import annotations

import pytest

from iotvault.broker.codec import Connack, PacketIdOnly, Publish, Suback, decode, encode
from iotvault.broker.codec5 import (
    Ack5,
    Connack5,
    Connect5,
    Disconnect5,
    Publish5,
    Suback5,
    Subscribe5,
    Unsuback5,
    Unsubscribe5,
    decode5,
    encode5,
)
from iotvault.broker.mqtt5 import ProtocolViolationError, V5Limits, V5Session, reason_for

LIMITS = V5Limits(max_packet_size=4096, receive_maximum=16, retain_available=False)


def session(**props: int) -> V5Session:
    ids = {"session_expiry": 0x11, "max_packet": 0x27}
    return V5Session(Connect5("dev", properties=tuple((ids[k], v) for k, v in props.items())), LIMITS)


def test_connack_announces_the_brokers_limits_and_caps_session_expiry() -> None:
    s = session(session_expiry=3600)
    sent = decode5(s.outbound(encode(Connack(0))))
    assert isinstance(sent, Connack5)
    assert sent.reason == 0
    assert sent.prop(0x11) == 0  # asked 3600, told 0
    assert (sent.prop(0x21), sent.prop(0x27), sent.prop(0x25)) == (16, 4096, 0)
    assert sent.prop(0x22) is None  # topic alias maximum: absent means 0
    assert session().connack_properties()[0] == (0x21, 16)  # nothing to cap, nothing said


def test_amqtt_reads_a_311_session_that_ends_with_the_connection() -> None:
    connect = Connect5("dev", clean_start=False, username="dev", password=b"pw", properties=((0x11, 99),))
    v4 = V5Session(connect, LIMITS).as_v4()
    assert (v4.protocol_level, v4.clean_session, v4.username, v4.password) == (4, True, "dev", b"pw")


def test_inbound_packets_become_the_311_packets_amqtt_reads() -> None:
    s = session()
    raw, packet = s.inbound(encode5(Publish5("a/b", b"{}", 1, packet_id=9, properties=((0x03, "json"),))))
    assert packet == Publish("a/b", b"{}", 1, packet_id=9)
    assert decode(raw) == packet
    assert s.inbound(encode5(Ack5(4, 3, 0x10)))[1] == PacketIdOnly(4, 3)


@pytest.mark.parametrize(
    ("packet", "code"),
    [
        (Publish5("a", b"", 1, packet_id=1, properties=((0x23, 1),)), 0x94),
        (Subscribe5(1, (("a", 1),), ((0x0B, 5),)), 0xA1),
        (Connect5("again"), 0x82),
        (Disconnect5(0x04), 0x04),
    ],
)
def test_what_breaks_a_rule_of_the_connection_carries_its_reason_code(packet: object, code: int) -> None:
    with pytest.raises(ProtocolViolationError) as caught:
        session().inbound(encode5(packet))  # type: ignore[arg-type]
    assert reason_for(caught.value) == code


def test_outbound_reason_codes_and_the_clients_maximum_packet_size() -> None:
    s = session(max_packet=64)
    assert decode5(s.outbound(encode(Suback(1, (1, 0x80))))) == Suback5(1, (1, 0x87))
    s.inbound(encode5(Unsubscribe5(5, ("a", "b", "c"))))
    assert decode5(s.outbound(encode(PacketIdOnly(11, 5)))) == Unsuback5(5, (0, 0, 0))
    assert decode5(s.outbound(encode(Publish("c", b"x", 1, packet_id=2)))) == Publish5(
        "c", b"x", 1, packet_id=2
    )
    assert s.outbound(encode(Publish("c", b"x" * 100, 1, packet_id=3))) == b""  # over the client's maximum
    # a packet written in two pieces goes out once whole
    whole = encode(Publish("c", b"y", 0))
    assert s.outbound(whole[:3]) == b""
    assert decode5(s.outbound(whole[3:])) == Publish5("c", b"y")
