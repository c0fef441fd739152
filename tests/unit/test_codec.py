"""The embedded broker's packet codec: inverse, strict, and never fooled by a length."""

from __future__ import annotations

import re

import pytest
from codec_strategies import packets
from hypothesis import given
from hypothesis import strategies as st

from iotvault.broker.codec import (
    Connect,
    MalformedPacketError,
    Packet,
    Publish,
    decode,
    encode,
    fixed_header_size,
)


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def split(raw: bytes) -> tuple[int, bytes]:
    size = fixed_header_size(raw)
    assert size is not None
    return raw[0], raw[size[0] :]


@given(packets)
def test_decode_inverts_encode(packet: Packet) -> None:
    assert decode(encode(packet)) == packet


@given(packets)
def test_every_truncation_is_rejected(packet: Packet) -> None:
    raw = encode(packet)
    for end in range(len(raw)):
        with pytest.raises(MalformedPacketError):
            decode(raw[:end])


@given(packets, st.integers(0, 20_000))
def test_every_other_remaining_length_is_rejected(packet: Packet, announced: int) -> None:
    first, body = split(encode(packet))
    if announced == len(body):
        announced += 1
    with pytest.raises(MalformedPacketError):
        decode(bytes([first]) + remaining_length(announced) + body)


@given(packets, st.binary(min_size=1, max_size=8))
def test_bytes_after_a_packet_are_rejected(packet: Packet, extra: bytes) -> None:
    first, body = split(encode(packet))
    with pytest.raises(MalformedPacketError):
        decode(bytes([first]) + remaining_length(len(body)) + body + extra)  # announced too short


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x36\x07\x00\x01t\x00\x01{}", "PUBLISH with QoS 3"),
        (b"\x38\x03\x00\x01t", "DUP set on a QoS 0 PUBLISH"),
        (b"\x32\x07\x00\x03a/+\x00\x01", "wildcard in a topic name"),
        (b"\x30\x03\x00\x01#", "wildcard in a topic name"),
        (b"\x30\x02\x00\x00", "empty topic"),
        (b"\x32\x05\x00\x01t\x00\x00", "packet id 0"),
        (b"\x30\x04\x00\x02\xff\xfe", "a string is not valid UTF-8"),
        (b"\x30\x03\x00\x01\x00", "a string contains U+0000"),
        (b"\x60\x02\x00\x01", "reserved flags"),  # PUBREL needs flags 0b0010
        (b"\x80\x06\x00\x01\x00\x01a\x00", "reserved flags"),  # SUBSCRIBE needs flags 0b0010
        (b"\x82\x02\x00\x01", "SUBSCRIBE without a topic filter"),
        (b"\x82\x06\x00\x01\x00\x01a\x03", "SUBSCRIBE options"),
        (b"\xc0\x01\x00", "bytes left over"),
        (b"\xf0\x00", "reserved packet type 15"),
        (b"\x00\x00", "reserved packet type 0"),
        (b"\x30\x80\x00", "shortest form"),
        (b"\x30\xff\xff\xff\xff\x01", "longer than four bytes"),
        (b"\x10\x0c\x00\x04MQTT\x04\x01\x00\x1e\x00\x00", "reserved CONNECT flag"),
        (b"\x10\x0c\x00\x04MQTT\x04\x40\x00\x1e\x00\x00", "password without a user name"),
        (b"\x10\x0c\x00\x04MQTT\x04\x18\x00\x1e\x00\x00", "will QoS or retain"),
        (b"\x10\x0c\x00\x04HTTP\x04\x02\x00\x1e\x00\x00", "unknown protocol name"),
    ],
)
def test_malformed_packets_say_why(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedPacketError, match=re.escape(reason)):
        decode(raw)


def test_another_protocol_level_decodes_to_its_level_only() -> None:
    v5 = b"\x10\x0f\x00\x04MQTT\x05\x02\x00\x1e\x00\x00\x02v5"  # MQTT 5: properties follow
    assert decode(v5) == Connect("", protocol_level=5)


def test_encode_refuses_what_decode_would_refuse() -> None:
    with pytest.raises(ValueError, match="QoS"):
        encode(Publish("t", b"", qos=1))  # no packet id
    with pytest.raises(ValueError, match="topic"):
        encode(Publish("a/#", b""))
    with pytest.raises(ValueError, match="password"):
        encode(Connect("c", password=b"p"))
