"""The MQTT 5 codec: inverse, strict about properties, never fooled by an outer or inner length."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codec5_strategies import packets5
from iotvault.broker.codec import MalformedPacketError, fixed_header_size
from iotvault.broker.codec5 import (
    MAX_USER_PROPERTIES,
    Ack5,
    Connect5,
    Disconnect5,
    Packet5,
    Publish5,
    decode5,
    encode5,
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


@given(packets5)
def test_decode_inverts_encode(packet: Packet5) -> None:
    assert decode5(encode5(packet)) == packet


@given(packets5)
def test_every_truncation_is_rejected(packet: Packet5) -> None:
    raw = encode5(packet)
    for end in range(len(raw)):
        with pytest.raises(MalformedPacketError):
            decode5(raw[:end])


@given(packets5, st.integers(0, 20_000))
def test_every_other_remaining_length_is_rejected(packet: Packet5, announced: int) -> None:
    first, body = split(encode5(packet))
    if announced == len(body):
        announced += 1
    with pytest.raises(MalformedPacketError):
        decode5(bytes([first]) + remaining_length(announced) + body)


@given(packets5, st.data())
def test_a_mutated_inner_length_is_rejected_or_reads_a_whole_packet(
    packet: Packet5, data: st.DataObject
) -> None:
    """Any byte of the body changed (a property length, a string length, a count): the decoder either
    refuses the packet or reads exactly what it says, so re-encoding what it read round-trips."""
    first, body = split(encode5(packet))
    if not body:
        return
    at = data.draw(st.integers(0, len(body) - 1))
    value = data.draw(st.integers(0, 255))
    mutated = bytes([first]) + remaining_length(len(body)) + body[:at] + bytes([value]) + body[at + 1 :]
    try:
        decoded = decode5(mutated)
    except MalformedPacketError:
        return
    assert decode5(encode5(decoded)) == decoded


def v5(first: int, body: bytes) -> bytes:
    return bytes([first]) + remaining_length(len(body)) + body


CONNECT_HEAD = b"\x00\x04MQTT\x05\x02\x00\x1e"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (v5(0x10, CONNECT_HEAD + b"\x05\x11\x00\x00\x00\x01\x11" + b"\x00\x00"), "past"),
        (v5(0x10, CONNECT_HEAD + b"\x0a\x11\x00\x00\x00\x01\x11\x00\x00\x00\x02\x00\x00"), "given twice"),
        (v5(0x10, CONNECT_HEAD + b"\x02\x23\x00\x00\x00"), "not allowed on packet type 1"),  # topic alias
        (v5(0x10, CONNECT_HEAD + b"\x03\x21\x00\x00\x00\x00"), "must not be 0"),  # receive maximum 0
        (v5(0x10, CONNECT_HEAD + b"\x02\x17\x02\x00\x00"), "must be 0 or 1"),
        (v5(0x10, CONNECT_HEAD + b"\x01\x7f\x00\x00"), "not allowed"),  # unknown property
        (v5(0x10, CONNECT_HEAD + b"\x80\x00\x00\x00"), "shortest form"),
        (v5(0x30, b"\x00\x01t\x05\x02\x00\x00\x00"), "past"),
        (v5(0x30, b"\x00\x01t\x02\x11\x00"), "not allowed on packet type 3"),
        (v5(0x82, b"\x00\x01\x00\x00\x01a\xc0"), "SUBSCRIBE options"),  # reserved bits
        (v5(0x82, b"\x00\x01\x00\x00\x01a\x32"), "SUBSCRIBE options"),  # retain handling 3
        (v5(0xF0, b"\x00"), "AUTH"),
        (v5(0xE0, b"\x00\x01"), "past"),
    ],
)
def test_malformed_packets_say_why(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedPacketError, match=re.escape(reason)):
        decode5(raw)


def test_user_properties_are_bounded() -> None:
    pair = b"\x26\x00\x01k\x00\x01v"
    many = pair * (MAX_USER_PROPERTIES + 1)
    body = b"\x00\x01t" + remaining_length(len(many)) + many
    with pytest.raises(MalformedPacketError, match="user properties"):
        decode5(v5(0x30, body))
    allowed = pair * MAX_USER_PROPERTIES
    decoded = decode5(v5(0x30, b"\x00\x01t" + remaining_length(len(allowed)) + allowed))
    assert isinstance(decoded, Publish5)
    assert len(decoded.properties) == MAX_USER_PROPERTIES


def test_acknowledgements_may_leave_out_a_success_code_and_empty_properties() -> None:
    assert decode5(b"\x40\x02\x00\x07") == Ack5(4, 7)
    assert decode5(b"\x40\x03\x00\x07\x87") == Ack5(4, 7, 0x87)
    assert decode5(b"\x40\x04\x00\x07\x00\x00") == Ack5(4, 7)
    assert encode5(Ack5(4, 7)) == b"\x40\x02\x00\x07"
    assert decode5(b"\xe0\x00") == Disconnect5()
    assert encode5(Disconnect5(0x95)) == b"\xe0\x01\x95"


def test_a_password_alone_and_properties_in_a_connect() -> None:
    packet = Connect5("dev", password=b"secret", properties=((0x11, 60), (0x27, 1024), (0x26, ("a", "b"))))
    assert decode5(encode5(packet)) == packet
    assert packet.prop(0x27) == 1024


def test_encode_refuses_what_decode_would_refuse() -> None:
    with pytest.raises(ValueError, match="not allowed"):
        encode5(Publish5("t", b"", properties=((0x11, 1),)))
    with pytest.raises(ValueError, match="twice"):
        encode5(Publish5("t", b"", properties=((0x03, "a"), (0x03, "b"))))
    with pytest.raises(ValueError, match="out of range"):
        encode5(Publish5("t", b"", properties=((0x23, 0),)))
