"""MQTT 3.1.1 packets: a strict, pure codec (no asyncio, no sockets, no amqtt).

Why iotvault has its own: the embedded broker must never parse a packet from the middle
(issue: a PUBLISH whose topic contained ``+`` had its payload read as new packets by amqtt,
which catches its own parse errors and keeps reading). Every packet a client sends is cut from
the stream by its fixed header, bounded by the broker's maximum packet size, and decoded here
in full *before* any other layer sees a byte of it. Anything that is not a well-formed packet
— reserved flags set, QoS 3, a wildcard in a topic name, a length that does not add up, bytes
left over, a string that is not UTF-8 or holds U+0000 — raises :class:`MalformedPacketError`, and
the connection is closed (MQTT 3.1.1 section 4.8).

:func:`encode` and :func:`decode` are inverse: ``decode(encode(p)) == p`` for every packet
that :func:`encode` accepts, and :func:`decode` accepts only what :func:`encode` could have
written (the remaining length in its shortest form, flags as the specification fixes them).
A CONNECT naming another protocol level decodes to :class:`Connect` with that level and the
rest of the packet unread: the broker decodes an MQTT 5 one with :mod:`iotvault.broker.codec5`
and refuses any other level.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from iotvault.errors import BrokerError

__all__ = [
    "MAX_REMAINING_LENGTH",
    "Connack",
    "Connect",
    "Disconnect",
    "MalformedPacketError",
    "Packet",
    "PacketIdOnly",
    "PingReq",
    "PingResp",
    "Publish",
    "Suback",
    "Subscribe",
    "Unsubscribe",
    "decode",
    "encode",
    "fixed_header_size",
]

MAX_REMAINING_LENGTH: Final = 268_435_455  # four length bytes (MQTT 3.1.1 section 2.2.3)

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
_ID_ONLY: Final = frozenset({PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK})
_FLAGS_TWO: Final = frozenset({PUBREL, SUBSCRIBE, UNSUBSCRIBE})  # [MQTT-3.6.1-1] and the like
_U16: Final = struct.Struct("!H")


class MalformedPacketError(BrokerError):
    """Bytes that are not a well-formed MQTT 3.1.1 packet; ``reason`` says what is wrong."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"malformed MQTT packet: {reason}")


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    protocol_level: int = 4
    clean_session: bool = True
    keep_alive: int = 0
    username: str | None = None
    password: bytes | None = None
    will_topic: str | None = None
    will_message: bytes | None = None
    will_qos: int = 0
    will_retain: bool = False


@dataclass(frozen=True, slots=True)
class Connack:
    return_code: int
    session_present: bool = False


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None


@dataclass(frozen=True, slots=True)
class PacketIdOnly:
    """PUBACK, PUBREC, PUBREL, PUBCOMP or UNSUBACK: a type and a packet id."""

    packet_type: int
    packet_id: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    topics: tuple[tuple[str, int], ...]  # (filter, requested QoS)


@dataclass(frozen=True, slots=True)
class Suback:
    packet_id: int
    return_codes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    filters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PingReq:
    pass


@dataclass(frozen=True, slots=True)
class PingResp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    pass


Packet = (
    Connect
    | Connack
    | Publish
    | PacketIdOnly
    | Subscribe
    | Suback
    | Unsubscribe
    | PingReq
    | PingResp
    | Disconnect
)


# ---- the fixed header ---------------------------------------------------------------------


def fixed_header_size(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """``(header length, remaining length)`` of the packet at the start of ``data``.

    None while the header is incomplete. Raises :class:`MalformedPacketError` for a length of more
    than four bytes or one not in its shortest form, so a reader never waits on a header that
    cannot end.
    """
    length, multiplier = 0, 1
    for i in range(1, min(len(data), 5)):
        byte = data[i]
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            if i > 1 and byte == 0:
                raise MalformedPacketError("remaining length not in its shortest form")
            return i + 1, length
        multiplier *= 128
    if len(data) >= 5:
        raise MalformedPacketError("remaining length longer than four bytes")
    return None


def rewrite_whole_packets(pending: bytearray, data: bytes, rewrite: Callable[[bytes], bytes | None]) -> bytes:
    """Append ``data`` to ``pending`` and return each whole packet in it passed through ``rewrite``.

    For what the broker writes to a client and iotvault re-encodes on the way (MQTT 5 sessions,
    Watson's device-relative topics): a packet written in pieces waits in ``pending`` for its
    end; ``rewrite`` returning None drops the packet. Bytes that do not frame as a packet are not
    ours to judge and go out as they are.
    """
    pending += data
    out = bytearray()
    while len(pending) >= 2:  # the shortest packet
        try:
            size = fixed_header_size(bytes(pending[:5]))
        except MalformedPacketError:
            out += pending
            pending.clear()
            break
        if size is None or len(pending) < size[0] + size[1]:
            break
        total = size[0] + size[1]
        raw = bytes(pending[:total])
        del pending[:total]
        rewritten = rewrite(raw)
        if rewritten is not None:
            out += rewritten
    return bytes(out)


def _remaining_length(n: int) -> bytes:
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError(f"a packet body of {n} bytes cannot be framed")
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


# ---- fields --------------------------------------------------------------------------------


class _Cursor:
    """Reads fields from one packet's body; running past its end is a malformed packet."""

    __slots__ = ("body", "pos")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.body):
            raise MalformedPacketError("a field runs past the end of the packet")
        data = self.body[self.pos : end]
        self.pos = end
        return data

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = _U16.unpack(self.take(2))[0]
        return value

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedPacketError("a string is not valid UTF-8") from None
        if "\x00" in text:
            raise MalformedPacketError("a string contains U+0000")  # [MQTT-1.5.3-2]
        return text

    def packet_id(self) -> int:
        pid = self.u16()
        if pid == 0:
            raise MalformedPacketError("packet id 0")  # [MQTT-2.3.1-1]
        return pid

    def rest(self) -> bytes:
        data = self.body[self.pos :]
        self.pos = len(self.body)
        return data

    def at_end(self) -> bool:
        return self.pos == len(self.body)

    def finish(self) -> None:
        if not self.at_end():
            raise MalformedPacketError("bytes left over after the packet's fields")


def _string(text: str) -> bytes:
    return _binary(text.encode("utf-8"))


def _binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("a field of more than 65,535 bytes cannot be encoded")
    return _U16.pack(len(data)) + data


def topic_name_problem(topic: str) -> str | None:
    """Why ``topic`` is not a valid topic name for a PUBLISH (MQTT 3.1.1 section 4.7), or None."""
    if not topic:
        return "empty topic"
    if "+" in topic or "#" in topic:
        return "wildcard in a topic name"  # [MQTT-3.3.2-2]
    if "\x00" in topic:
        return "NUL character in topic"
    return None


def publish_topic_problem(topic: str) -> str | None:
    """Why a client may not publish to ``topic`` (a topic name, and no ``$`` topics), or None."""
    if topic.startswith("$"):
        return "topic names starting with $ are reserved"
    return topic_name_problem(topic)


# ---- decode --------------------------------------------------------------------------------


def decode(packet: bytes) -> Packet:  # noqa: PLR0912 -- one branch per packet type
    """The packet that ``packet`` (one whole packet, fixed header included) holds."""
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
    expected = 2 if kind in _FLAGS_TWO else 0
    if flags != expected:
        raise MalformedPacketError(f"reserved flags {flags:#x} on packet type {kind}")
    result: Packet
    if kind == CONNECT:
        return _decode_connect(body)
    if kind == CONNACK:
        ack_flags, code = body.u8(), body.u8()
        if ack_flags & 0xFE:
            raise MalformedPacketError("reserved CONNACK flags")
        result = Connack(code, bool(ack_flags))
    elif kind in _ID_ONLY:
        result = PacketIdOnly(kind, body.packet_id())
    elif kind == SUBSCRIBE:
        result = _decode_subscribe(body)
    elif kind == SUBACK:
        pid = body.packet_id()
        codes = tuple(body.rest())
        if not codes or any(c not in (0, 1, 2, 0x80) for c in codes):
            raise MalformedPacketError("SUBACK return codes")
        result = Suback(pid, codes)
    elif kind == UNSUBSCRIBE:
        pid = body.packet_id()
        filters = []
        while not body.at_end():
            filters.append(_filter(body))
        if not filters:
            raise MalformedPacketError("UNSUBSCRIBE without a topic filter")  # [MQTT-3.10.3-2]
        result = Unsubscribe(pid, tuple(filters))
    elif kind == PINGREQ:
        result = PingReq()
    elif kind == PINGRESP:
        result = PingResp()
    elif kind == DISCONNECT:
        result = Disconnect()
    else:
        raise MalformedPacketError(f"reserved packet type {kind}")
    body.finish()
    return result


def publish_head(flags: int, body: _Cursor) -> tuple[str, int, bool, int | None]:
    """A PUBLISH's flags, topic name and packet id (topic, QoS, DUP, packet id), checked the same
    way for MQTT 3.1.1 and 5 (:mod:`iotvault.broker.codec5`)."""
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MalformedPacketError("PUBLISH with QoS 3")  # [MQTT-3.3.1-4]
    dup = bool(flags & 0x08)
    if dup and qos == 0:
        raise MalformedPacketError("DUP set on a QoS 0 PUBLISH")  # [MQTT-3.3.1-2]
    topic = body.string()
    if (problem := topic_name_problem(topic)) is not None:
        raise MalformedPacketError(problem)  # MQTT 5: an empty name needs a topic alias, never granted
    return topic, qos, dup, body.packet_id() if qos else None


def _decode_publish(flags: int, body: _Cursor) -> Publish:
    topic, qos, dup, pid = publish_head(flags, body)
    return Publish(topic, body.rest(), qos, bool(flags & 0x01), dup, pid)


def _decode_connect(body: _Cursor) -> Connect:
    name = body.string()
    level = body.u8()
    if name != "MQTT" or level != 4:
        if name in ("MQTT", "MQIsdp"):
            return Connect("", protocol_level=level)  # answered with "unacceptable protocol version"
        raise MalformedPacketError(f"unknown protocol name {name[:16]!r}")  # [MQTT-3.1.2-1]
    flags = body.u8()
    keep_alive = body.u16()
    if flags & 0x01:
        raise MalformedPacketError("reserved CONNECT flag set")  # [MQTT-3.1.2-3]
    will, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    has_user, has_password = bool(flags & 0x80), bool(flags & 0x40)
    if will_qos == 3 or (not will and (will_qos or will_retain)):
        raise MalformedPacketError("will QoS or retain flags")  # [MQTT-3.1.2-11..15]
    if has_password and not has_user:
        raise MalformedPacketError("password without a user name")  # [MQTT-3.1.2-22]
    client_id = body.string()
    will_topic = body.string() if will else None
    if will_topic is not None and (problem := topic_name_problem(will_topic)) is not None:
        raise MalformedPacketError(f"will topic: {problem}")
    will_message = body.binary() if will else None
    username = body.string() if has_user else None
    password = body.binary() if has_password else None
    body.finish()
    return Connect(
        client_id, 4, bool(flags & 0x02), keep_alive, username, password, will_topic, will_message, will_qos,
        will_retain,
    )  # fmt: skip


def _filter(body: _Cursor) -> str:
    topic_filter = body.string()
    if not topic_filter:
        raise MalformedPacketError("empty topic filter")  # [MQTT-4.7.3-1]
    return topic_filter


def _decode_subscribe(body: _Cursor) -> Subscribe:
    pid = body.packet_id()
    topics = []
    while not body.at_end():
        topic_filter = _filter(body)
        options = body.u8()
        if options > 2:
            raise MalformedPacketError("SUBSCRIBE options")  # [MQTT-3.8.3-4]
        topics.append((topic_filter, options))
    if not topics:
        raise MalformedPacketError("SUBSCRIBE without a topic filter")  # [MQTT-3.8.3-3]
    return Subscribe(pid, tuple(topics))


# ---- encode --------------------------------------------------------------------------------


def encode(packet: Packet) -> bytes:
    """The bytes of ``packet``; ``ValueError`` for one that :func:`decode` would refuse."""
    first, body = _encode_body(packet)
    return bytes([first]) + _remaining_length(len(body)) + body


def _encode_body(p: Packet) -> tuple[int, bytes]:  # noqa: PLR0911, PLR0912 -- one branch per packet type
    if isinstance(p, Publish):
        if p.qos not in (0, 1, 2) or (p.qos == 0) != (p.packet_id is None) or (p.dup and p.qos == 0):
            raise ValueError("PUBLISH QoS, packet id and DUP do not fit together")
        if topic_name_problem(p.topic) is not None or (
            p.packet_id is not None and not 0 < p.packet_id <= 0xFFFF
        ):
            raise ValueError("PUBLISH topic or packet id")
        first = (PUBLISH << 4) | (0x08 if p.dup else 0) | (p.qos << 1) | (0x01 if p.retain else 0)
        return first, _string(p.topic) + (_U16.pack(p.packet_id) if p.packet_id else b"") + p.payload
    if isinstance(p, Connect):
        return CONNECT << 4, _encode_connect(p)
    if isinstance(p, Connack):
        return CONNACK << 4, bytes([int(p.session_present), p.return_code])
    if isinstance(p, PacketIdOnly):
        if p.packet_type not in _ID_ONLY or not 0 < p.packet_id <= 0xFFFF:
            raise ValueError("packet type or id")
        return (p.packet_type << 4) | (2 if p.packet_type in _FLAGS_TWO else 0), _U16.pack(p.packet_id)
    if isinstance(p, Subscribe):
        if not p.topics or any(not f or q not in (0, 1, 2) for f, q in p.topics):
            raise ValueError("SUBSCRIBE topics")
        return (SUBSCRIBE << 4) | 2, _U16.pack(p.packet_id) + b"".join(
            _string(f) + bytes([q]) for f, q in p.topics
        )
    if isinstance(p, Suback):
        return SUBACK << 4, _U16.pack(p.packet_id) + bytes(p.return_codes)
    if isinstance(p, Unsubscribe):
        if not p.filters or not all(p.filters):
            raise ValueError("UNSUBSCRIBE filters")
        return (UNSUBSCRIBE << 4) | 2, _U16.pack(p.packet_id) + b"".join(_string(f) for f in p.filters)
    if isinstance(p, PingReq):
        return PINGREQ << 4, b""
    if isinstance(p, PingResp):
        return PINGRESP << 4, b""
    return DISCONNECT << 4, b""


def _encode_connect(p: Connect) -> bytes:
    will = p.will_topic is not None
    if will != (p.will_message is not None) or (not will and (p.will_qos or p.will_retain)):
        raise ValueError("will topic, message, QoS and retain do not fit together")
    if p.password is not None and p.username is None:
        raise ValueError("a password needs a user name")
    flags = (
        (0x80 if p.username is not None else 0)
        | (0x40 if p.password is not None else 0)
        | (0x20 if p.will_retain else 0)
        | (p.will_qos << 3)
        | (0x04 if will else 0)
        | (0x02 if p.clean_session else 0)
    )
    out = bytearray(_string("MQTT") + bytes([p.protocol_level, flags]) + _U16.pack(p.keep_alive))
    out += _string(p.client_id)
    if p.will_topic is not None and p.will_message is not None:
        out += _string(p.will_topic) + _binary(p.will_message)
    if p.username is not None:
        out += _string(p.username)
    if p.password is not None:
        out += _binary(p.password)
    return bytes(out)
