"""MQTT 5 packets: the strict, pure codec for devices that speak MQTT 5 (no asyncio, no amqtt).

The same rules as :mod:`iotvault.broker.codec` (one whole packet, decoded in full, anything
ill-formed raises :class:`~iotvault.broker.codec.MalformedPacketError`), plus what MQTT 5 adds:
a property list on most packets and reason codes on acknowledgements. Properties are read into a
tuple of ``(identifier, value)`` pairs in the order they came; an identifier the specification
does not allow on that packet, a second copy of a property that may appear once, or more than
:data:`MAX_USER_PROPERTIES` user properties is a malformed packet — so what a client can make the
broker hold per packet is bounded by the maximum packet size *and* by a count.

``decode(encode(p)) == p`` for every packet :func:`encode` accepts. MQTT 5 lets an
acknowledgement leave out a success reason code and an empty property list; :func:`encode`
writes the shortest form and :func:`decode` accepts all three.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from iotvault.broker.codec import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    MalformedPacketError,
    PingReq,
    PingResp,
    _binary,
    _Cursor,
    _remaining_length,
    _string,
    fixed_header_size,
    publish_head,
    topic_name_problem,
)

__all__ = [
    "AUTH",
    "MAX_USER_PROPERTIES",
    "Ack5",
    "Connack5",
    "Connect5",
    "Disconnect5",
    "Packet5",
    "Prop",
    "Publish5",
    "Suback5",
    "Subscribe5",
    "Unsuback5",
    "Unsubscribe5",
    "decode5",
    "encode5",
]

AUTH: Final = 15
MAX_USER_PROPERTIES: Final = 32  # per packet; the specification sets none, a broker must
_ACKS: Final = frozenset({PUBACK, PUBREC, PUBREL, PUBCOMP})
_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")

PropValue = int | str | bytes | tuple[str, str]
Prop = tuple[int, PropValue]

# property identifier -> (type, packets it may appear on) (MQTT 5 section 2.2.2.2)
_BYTE, _TWO, _FOUR, _VARINT, _STR, _BIN, _PAIR = range(7)
_WILL: Final = 0  # the will properties of a CONNECT, a "packet" of their own here
_PROPS: Final[dict[int, tuple[int, frozenset[int]]]] = {
    0x01: (_BYTE, frozenset({PUBLISH, _WILL})),  # payload format indicator
    0x02: (_FOUR, frozenset({PUBLISH, _WILL})),  # message expiry interval
    0x03: (_STR, frozenset({PUBLISH, _WILL})),  # content type
    0x08: (_STR, frozenset({PUBLISH, _WILL})),  # response topic
    0x09: (_BIN, frozenset({PUBLISH, _WILL})),  # correlation data
    0x0B: (_VARINT, frozenset({PUBLISH, SUBSCRIBE})),  # subscription identifier
    0x11: (_FOUR, frozenset({CONNECT, CONNACK, DISCONNECT})),  # session expiry interval
    0x12: (_STR, frozenset({CONNACK})),  # assigned client identifier
    0x13: (_TWO, frozenset({CONNACK})),  # server keep alive
    0x15: (_STR, frozenset({CONNECT, CONNACK, AUTH})),  # authentication method
    0x16: (_BIN, frozenset({CONNECT, CONNACK, AUTH})),  # authentication data
    0x17: (_BYTE, frozenset({CONNECT})),  # request problem information
    0x18: (_FOUR, frozenset({_WILL})),  # will delay interval
    0x19: (_BYTE, frozenset({CONNECT})),  # request response information
    0x1A: (_STR, frozenset({CONNACK})),  # response information
    0x1C: (_STR, frozenset({CONNACK, DISCONNECT})),  # server reference
    0x1F: (_STR, frozenset({CONNACK, *_ACKS, SUBACK, UNSUBACK, DISCONNECT, AUTH})),  # reason string
    0x21: (_TWO, frozenset({CONNECT, CONNACK})),  # receive maximum
    0x22: (_TWO, frozenset({CONNECT, CONNACK})),  # topic alias maximum
    0x23: (_TWO, frozenset({PUBLISH})),  # topic alias
    0x24: (_BYTE, frozenset({CONNACK})),  # maximum QoS
    0x25: (_BYTE, frozenset({CONNACK})),  # retain available
    0x26: (
        _PAIR,
        frozenset(
            {
                CONNECT,
                CONNACK,
                PUBLISH,
                _WILL,
                *_ACKS,
                SUBSCRIBE,
                SUBACK,
                UNSUBSCRIBE,
                UNSUBACK,
                DISCONNECT,
                AUTH,
            }
        ),
    ),  # user property
    0x27: (_FOUR, frozenset({CONNECT, CONNACK})),  # maximum packet size
    0x28: (_BYTE, frozenset({CONNACK})),  # wildcard subscription available
    0x29: (_BYTE, frozenset({CONNACK})),  # subscription identifiers available
    0x2A: (_BYTE, frozenset({CONNACK})),  # shared subscription available
}
_BOOLEAN: Final = frozenset({0x01, 0x17, 0x19, 0x25, 0x28, 0x29, 0x2A})  # bytes that are 0 or 1
_NONZERO: Final = frozenset({0x21, 0x27, 0x0B, 0x23})  # [MQTT-3.1.2-...]: 0 is a protocol error
_MAX_VARINT: Final = 268_435_455


@dataclass(frozen=True, slots=True)
class Connect5:
    client_id: str
    clean_start: bool = True
    keep_alive: int = 0
    username: str | None = None
    password: bytes | None = None
    will_topic: str | None = None
    will_message: bytes | None = None
    will_qos: int = 0
    will_retain: bool = False
    properties: tuple[Prop, ...] = ()
    will_properties: tuple[Prop, ...] = ()

    def prop(self, ident: int, default: PropValue | None = None) -> PropValue | None:
        return _first(self.properties, ident, default)


@dataclass(frozen=True, slots=True)
class Connack5:
    reason: int
    session_present: bool = False
    properties: tuple[Prop, ...] = ()

    def prop(self, ident: int, default: PropValue | None = None) -> PropValue | None:
        return _first(self.properties, ident, default)


@dataclass(frozen=True, slots=True)
class Publish5:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: tuple[Prop, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack5:
    """PUBACK, PUBREC, PUBREL or PUBCOMP: a packet id, a reason code, properties."""

    packet_type: int
    packet_id: int
    reason: int = 0
    properties: tuple[Prop, ...] = ()


@dataclass(frozen=True, slots=True)
class Subscribe5:
    packet_id: int
    topics: tuple[tuple[str, int], ...]  # (filter, subscription options byte)
    properties: tuple[Prop, ...] = ()


@dataclass(frozen=True, slots=True)
class Suback5:
    packet_id: int
    reasons: tuple[int, ...]
    properties: tuple[Prop, ...] = ()


@dataclass(frozen=True, slots=True)
class Unsubscribe5:
    packet_id: int
    filters: tuple[str, ...]
    properties: tuple[Prop, ...] = ()


@dataclass(frozen=True, slots=True)
class Unsuback5:
    packet_id: int
    reasons: tuple[int, ...]
    properties: tuple[Prop, ...] = ()


@dataclass(frozen=True, slots=True)
class Disconnect5:
    reason: int = 0
    properties: tuple[Prop, ...] = ()


Packet5 = (
    Connect5 | Connack5 | Publish5 | Ack5 | Subscribe5 | Suback5 | Unsubscribe5 | Unsuback5 | PingReq
    | PingResp | Disconnect5
)  # fmt: skip


def _first(props: tuple[Prop, ...], ident: int, default: PropValue | None) -> PropValue | None:
    for key, value in props:
        if key == ident:
            return value
    return default


# ---- properties ----------------------------------------------------------------------------


def _read_varint(body: _Cursor) -> int:
    value, multiplier = 0, 1
    for i in range(4):
        byte = body.u8()
        if i and byte == 0:
            raise MalformedPacketError("variable byte integer not in its shortest form")
        value += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return value
        multiplier *= 128
    raise MalformedPacketError("variable byte integer longer than four bytes")


def _read_props(body: _Cursor, kind: int) -> tuple[Prop, ...]:
    length = _read_varint(body)
    end = body.pos + length
    if end > len(body.body):
        raise MalformedPacketError("properties run past the end of the packet")
    props: list[Prop] = []
    seen: set[int] = set()
    users = 0
    while body.pos < end:
        ident = _read_varint(body)
        spec = _PROPS.get(ident)
        if spec is None or kind not in spec[1]:
            raise MalformedPacketError(f"property {ident:#x} not allowed on packet type {kind}")
        if ident in seen and not _repeatable(ident, kind):
            raise MalformedPacketError(f"property {ident:#x} given twice")  # [MQTT-2.2.2-2]
        seen.add(ident)
        users += ident == 0x26
        if users > MAX_USER_PROPERTIES:
            raise MalformedPacketError(f"more than {MAX_USER_PROPERTIES} user properties")
        props.append((ident, _read_value(body, ident, spec[0])))
    if body.pos != end:
        raise MalformedPacketError("a property runs past the property length")
    return tuple(props)


def _read_value(body: _Cursor, ident: int, kind: int) -> PropValue:  # noqa: PLR0911 -- one per type
    if kind == _BYTE:
        value = body.u8()
        if ident in _BOOLEAN and value > 1:
            raise MalformedPacketError(f"property {ident:#x} must be 0 or 1")
        if ident == 0x24 and value > 1:
            raise MalformedPacketError("maximum QoS must be 0 or 1")
        return value
    if kind == _TWO:
        return _nonzero(ident, body.u16())
    if kind == _FOUR:
        return _nonzero(ident, int(_U32.unpack(body.take(4))[0]))
    if kind == _VARINT:
        return _nonzero(ident, _read_varint(body))
    if kind == _STR:
        return body.string()
    if kind == _BIN:
        return body.binary()
    return (body.string(), body.string())


def _repeatable(ident: int, kind: int) -> bool:
    """User properties, and a PUBLISH's subscription identifiers, may come more than once."""
    return ident == 0x26 or (ident == 0x0B and kind == PUBLISH)


def _nonzero(ident: int, value: int) -> int:
    if value == 0 and ident in _NONZERO:
        raise MalformedPacketError(f"property {ident:#x} must not be 0")
    return value


def _varint(n: int) -> bytes:
    if not 0 <= n <= _MAX_VARINT:
        raise ValueError("variable byte integer out of range")
    return _remaining_length(n)


def _props(props: tuple[Prop, ...], kind: int) -> bytes:
    out = bytearray()
    seen: set[int] = set()
    for ident, value in props:
        spec = _PROPS.get(ident)
        if spec is None or kind not in spec[1]:
            raise ValueError(f"property {ident:#x} not allowed on packet type {kind}")
        if ident in seen and not _repeatable(ident, kind):
            raise ValueError(f"property {ident:#x} given twice")
        seen.add(ident)
        out += _varint(ident) + _write_value(ident, spec[0], value)
    if sum(1 for ident, _ in props if ident == 0x26) > MAX_USER_PROPERTIES:
        raise ValueError("too many user properties")
    return _varint(len(out)) + bytes(out)


def _write_value(ident: int, kind: int, value: PropValue) -> bytes:  # noqa: PLR0911 -- one per type
    if kind == _PAIR:
        if not isinstance(value, tuple):
            raise TypeError("a user property is a (name, value) pair")
        return _string(value[0]) + _string(value[1])
    if kind == _STR:
        if not isinstance(value, str) or "\x00" in value:
            raise ValueError(f"property {ident:#x} is a string without U+0000")
        return _string(value)
    if kind == _BIN:
        if not isinstance(value, bytes):
            raise TypeError(f"property {ident:#x} is binary")
        return _binary(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"property {ident:#x} is an integer")
    limit = {_BYTE: 1 if ident in _BOOLEAN or ident == 0x24 else 0xFF, _TWO: 0xFFFF, _FOUR: 0xFFFFFFFF,
             _VARINT: _MAX_VARINT}[kind]  # fmt: skip
    if not 0 <= value <= limit or (value == 0 and ident in _NONZERO):
        raise ValueError(f"property {ident:#x} out of range")
    if kind == _BYTE:
        return bytes([value])
    if kind == _TWO:
        return _U16.pack(value)
    if kind == _FOUR:
        return _U32.pack(value)
    return _varint(value)


# ---- decode --------------------------------------------------------------------------------


def decode5(packet: bytes) -> Packet5:  # noqa: PLR0912, PLR0915 -- one branch per packet type
    """The MQTT 5 packet that ``packet`` (one whole packet, fixed header included) holds."""
    size = fixed_header_size(packet)
    if size is None:
        raise MalformedPacketError("incomplete fixed header")
    header_len, length = size
    if header_len + length != len(packet):
        raise MalformedPacketError("the remaining length does not match the packet's size")
    kind, flags = packet[0] >> 4, packet[0] & 0x0F
    body = _Cursor(packet[header_len:])
    if kind == PUBLISH:
        return _decode_publish(flags, body)
    if flags != (2 if kind in (PUBREL, SUBSCRIBE, UNSUBSCRIBE) else 0):
        raise MalformedPacketError(f"reserved flags {flags:#x} on packet type {kind}")
    result: Packet5
    if kind == CONNECT:
        return _decode_connect(body)
    if kind == CONNACK:
        ack_flags, code = body.u8(), body.u8()
        if ack_flags & 0xFE:
            raise MalformedPacketError("reserved CONNACK flags")
        result = Connack5(code, bool(ack_flags), _read_props(body, CONNACK))
    elif kind in _ACKS:
        pid = body.packet_id()
        reason = body.u8() if not body.at_end() else 0
        result = Ack5(kind, pid, reason, _read_props(body, kind) if not body.at_end() else ())
    elif kind == SUBSCRIBE:
        result = _decode_subscribe(body)
    elif kind in (SUBACK, UNSUBACK):
        pid = body.packet_id()
        props = _read_props(body, kind)
        reasons = tuple(body.rest())
        if not reasons:
            raise MalformedPacketError("acknowledgement without reason codes")
        result = Suback5(pid, reasons, props) if kind == SUBACK else Unsuback5(pid, reasons, props)
    elif kind == UNSUBSCRIBE:
        pid = body.packet_id()
        props = _read_props(body, UNSUBSCRIBE)
        filters = []
        while not body.at_end():
            filters.append(_filter(body))
        if not filters:
            raise MalformedPacketError("UNSUBSCRIBE without a topic filter")  # [MQTT-3.10.3-2]
        result = Unsubscribe5(pid, tuple(filters), props)
    elif kind == PINGREQ:
        result = PingReq()
    elif kind == PINGRESP:
        result = PingResp()
    elif kind == DISCONNECT:
        reason = body.u8() if not body.at_end() else 0
        result = Disconnect5(reason, _read_props(body, DISCONNECT) if not body.at_end() else ())
    elif kind == AUTH:
        raise MalformedPacketError("AUTH without an authentication method")  # [MQTT-4.12.0-1]
    else:
        raise MalformedPacketError(f"reserved packet type {kind}")
    body.finish()
    return result


def _decode_publish(flags: int, body: _Cursor) -> Publish5:
    topic, qos, dup, pid = publish_head(flags, body)
    props = _read_props(body, PUBLISH)
    return Publish5(topic, body.rest(), qos, bool(flags & 0x01), dup, pid, props)


def _decode_connect(body: _Cursor) -> Connect5:
    if body.string() != "MQTT" or body.u8() != 5:
        raise MalformedPacketError("not an MQTT 5 CONNECT")
    flags = body.u8()
    keep_alive = body.u16()
    if flags & 0x01:
        raise MalformedPacketError("reserved CONNECT flag set")  # [MQTT-3.1.2-3]
    will, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    if will_qos == 3 or (not will and (will_qos or will_retain)):
        raise MalformedPacketError("will QoS or retain flags")  # [MQTT-3.1.2-11..15]
    props = _read_props(body, CONNECT)
    client_id = body.string()
    will_props = _read_props(body, _WILL) if will else ()
    will_topic = body.string() if will else None
    if will_topic is not None and (problem := topic_name_problem(will_topic)) is not None:
        raise MalformedPacketError(f"will topic: {problem}")
    will_message = body.binary() if will else None
    username = body.string() if flags & 0x80 else None
    password = body.binary() if flags & 0x40 else None  # MQTT 5 allows a password alone
    body.finish()
    return Connect5(
        client_id, bool(flags & 0x02), keep_alive, username, password, will_topic, will_message, will_qos,
        will_retain, props, will_props,
    )  # fmt: skip


def _filter(body: _Cursor) -> str:
    topic_filter = body.string()
    if not topic_filter:
        raise MalformedPacketError("empty topic filter")  # [MQTT-4.7.3-1]
    return topic_filter


def _decode_subscribe(body: _Cursor) -> Subscribe5:
    pid = body.packet_id()
    props = _read_props(body, SUBSCRIBE)
    topics = []
    while not body.at_end():
        topic_filter = _filter(body)
        options = body.u8()
        if options & 0xC0 or options & 0x03 == 3 or (options >> 4) & 0x03 == 3:
            raise MalformedPacketError("SUBSCRIBE options")  # [MQTT-3.8.3-5]
        topics.append((topic_filter, options))
    if not topics:
        raise MalformedPacketError("SUBSCRIBE without a topic filter")  # [MQTT-3.8.3-3]
    return Subscribe5(pid, tuple(topics), props)


# ---- encode --------------------------------------------------------------------------------


def encode5(packet: Packet5) -> bytes:
    """The bytes of ``packet``; ``ValueError`` for one that :func:`decode5` would refuse."""
    first, body = _encode_body(packet)
    return bytes([first]) + _remaining_length(len(body)) + body


def _encode_body(p: Packet5) -> tuple[int, bytes]:  # noqa: PLR0911, PLR0912 -- one branch per packet type
    if isinstance(p, Publish5):
        if p.qos not in (0, 1, 2) or (p.qos == 0) != (p.packet_id is None) or (p.dup and p.qos == 0):
            raise ValueError("PUBLISH QoS, packet id and DUP do not fit together")
        if topic_name_problem(p.topic) is not None or (
            p.packet_id is not None and not 0 < p.packet_id <= 0xFFFF
        ):
            raise ValueError("PUBLISH topic or packet id")
        first = (PUBLISH << 4) | (0x08 if p.dup else 0) | (p.qos << 1) | (0x01 if p.retain else 0)
        pid = _U16.pack(p.packet_id) if p.packet_id else b""
        return first, _string(p.topic) + pid + _props(p.properties, PUBLISH) + p.payload
    if isinstance(p, Connect5):
        return CONNECT << 4, _encode_connect(p)
    if isinstance(p, Connack5):
        return CONNACK << 4, bytes([int(p.session_present), _u8(p.reason)]) + _props(p.properties, CONNACK)
    if isinstance(p, Ack5):
        if p.packet_type not in _ACKS or not 0 < p.packet_id <= 0xFFFF:
            raise ValueError("packet type or id")
        body = _U16.pack(p.packet_id)
        if p.properties:
            body += bytes([_u8(p.reason)]) + _props(p.properties, p.packet_type)
        elif p.reason:
            body += bytes([_u8(p.reason)])
        return (p.packet_type << 4) | (2 if p.packet_type == PUBREL else 0), body
    if isinstance(p, Subscribe5):
        if not p.topics or any(not f or o & 0xC0 or o & 3 == 3 or (o >> 4) & 3 == 3 for f, o in p.topics):
            raise ValueError("SUBSCRIBE topics")
        return (SUBSCRIBE << 4) | 2, _U16.pack(p.packet_id) + _props(p.properties, SUBSCRIBE) + b"".join(
            _string(f) + bytes([o]) for f, o in p.topics
        )
    if isinstance(p, Suback5 | Unsuback5):
        if not p.reasons:
            raise ValueError("an acknowledgement needs reason codes")
        kind = SUBACK if isinstance(p, Suback5) else UNSUBACK
        return kind << 4, _U16.pack(p.packet_id) + _props(p.properties, kind) + bytes(p.reasons)
    if isinstance(p, Unsubscribe5):
        if not p.filters or not all(p.filters):
            raise ValueError("UNSUBSCRIBE filters")
        return (UNSUBSCRIBE << 4) | 2, _U16.pack(p.packet_id) + _props(p.properties, UNSUBSCRIBE) + b"".join(
            _string(f) for f in p.filters
        )
    if isinstance(p, PingReq):
        return PINGREQ << 4, b""
    if isinstance(p, PingResp):
        return PINGRESP << 4, b""
    if p.properties:
        return DISCONNECT << 4, bytes([_u8(p.reason)]) + _props(p.properties, DISCONNECT)
    return DISCONNECT << 4, bytes([_u8(p.reason)]) if p.reason else b""


def _u8(value: int) -> int:
    if not 0 <= value <= 0xFF:
        raise ValueError("a reason code is one byte")
    return value


def _encode_connect(p: Connect5) -> bytes:
    will = p.will_topic is not None
    if will != (p.will_message is not None) or (
        not will and (p.will_qos or p.will_retain or p.will_properties)
    ):
        raise ValueError("will topic, message, QoS, retain and properties do not fit together")
    flags = (
        (0x80 if p.username is not None else 0)
        | (0x40 if p.password is not None else 0)
        | (0x20 if p.will_retain else 0)
        | (p.will_qos << 3)
        | (0x04 if will else 0)
        | (0x02 if p.clean_start else 0)
    )
    out = bytearray(_string("MQTT") + bytes([5, flags]) + _U16.pack(p.keep_alive))
    out += _props(p.properties, CONNECT) + _string(p.client_id)
    if p.will_topic is not None and p.will_message is not None:
        out += _props(p.will_properties, _WILL) + _string(p.will_topic) + _binary(p.will_message)
    if p.username is not None:
        out += _string(p.username)
    if p.password is not None:
        out += _binary(p.password)
    return bytes(out)
