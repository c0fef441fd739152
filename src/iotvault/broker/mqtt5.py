"""MQTT 5 devices on the embedded broker: iotvault speaks MQTT 5 at the door, amqtt sees 3.1.1.

Why a translation and not an MQTT 5 session layer of our own: amqtt 0.12 has no MQTT 5 broker
side, and what MQTT 5 adds for iotvault's devices (reason codes, announced limits, properties)
lives entirely in the packets a device exchanges with the broker — sessions, subscriptions and
delivery stay as amqtt does them for 3.1.1 (``docs/design/embedded-broker.md``).

:class:`V5Session` is one MQTT 5 connection's translator. Inbound, every packet is decoded in
full by :func:`~iotvault.broker.codec5.decode5` (bounded by the maximum packet size before a
byte of it is read, its properties bounded by :mod:`~iotvault.broker.codec5`) and re-encoded as
the 3.1.1 packet amqtt reads. Outbound, what amqtt writes is re-encoded as MQTT 5. What is
announced in CONNACK is what is enforced:

- *Maximum Packet Size* = the broker's limit (a larger packet: DISCONNECT 0x95);
- *Receive Maximum* = the in-flight limit per connection, enforced as back-pressure (the
  connection is not read while that many QoS 1/2 messages are being stored);
- *Topic Alias Maximum* = 0 (an alias is DISCONNECT 0x94), no shared subscriptions, no
  subscription identifiers (0xA1), *Retain Available* = 0 when retained messages are off;
- *Session Expiry Interval*: sessions of MQTT 5 clients end with the connection; a client that
  asks for more is told 0 (MQTT 5 section 3.2.2.3.2 lets the server cap it). Persistent sessions
  in amqtt are held in memory without bound, and a device's commands expire anyway.

Properties of a device's PUBLISH (content type, user properties, ...) are checked and then not
passed on: ingest stores the payload, as for 3.1.1. A packet iotvault would send that is larger
than the client's own Maximum Packet Size is not sent [MQTT-3.1.2-24].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

from iotvault.broker.codec import (
    PUBACK,
    PUBREC,
    UNSUBACK,
    Connack,
    Connect,
    Disconnect,
    MalformedPacketError,
    Packet,
    PacketIdOnly,
    PingReq,
    PingResp,
    Publish,
    Suback,
    Subscribe,
    Unsubscribe,
    decode,
    encode,
    rewrite_whole_packets,
)
from iotvault.broker.codec5 import (
    Ack5,
    Connack5,
    Connect5,
    Disconnect5,
    Packet5,
    Prop,
    Publish5,
    Suback5,
    Subscribe5,
    Unsuback5,
    Unsubscribe5,
    decode5,
    encode5,
)

__all__ = [
    "ProtocolViolationError",
    "PublishRefusedError",
    "V5Limits",
    "V5Session",
    "connack_refusal",
    "reason_for",
    "refusal_ack",
]

_log = logging.getLogger(__name__)

# MQTT 5 reason codes used here (section 2.4)
MALFORMED: Final = 0x81
PROTOCOL_ERROR: Final = 0x82
NOT_AUTHORIZED: Final = 0x87
IMPLEMENTATION_SPECIFIC: Final = 0x83
TOPIC_NAME_INVALID: Final = 0x90
PAYLOAD_FORMAT_INVALID: Final = 0x99
BAD_CREDENTIALS: Final = 0x86
UNSPECIFIED: Final = 0x80
BAD_AUTH_METHOD: Final = 0x8C
PACKET_TOO_LARGE: Final = 0x95
TOPIC_ALIAS_INVALID: Final = 0x94
SUBSCRIPTION_IDS_UNSUPPORTED: Final = 0xA1
CONNECTION_RATE_EXCEEDED: Final = 0x9F
DISCONNECT_WITH_WILL: Final = 0x04

_REFUSALS: Final = {
    "bad credentials": BAD_CREDENTIALS,
    "throttled": CONNECTION_RATE_EXCEEDED,
    "will topic": NOT_AUTHORIZED,
    "authentication method": BAD_AUTH_METHOD,
}


class ProtocolViolationError(MalformedPacketError):
    """A well-formed MQTT 5 packet that breaks a rule of this connection; ``code`` for DISCONNECT."""

    def __init__(self, reason: str, code: int) -> None:
        super().__init__(reason)
        self.code = code


class PublishRefusedError(MalformedPacketError):
    """An MQTT 5 PUBLISH refused with a reason code (:func:`refusal_ack`); the connection stays."""

    def __init__(self) -> None:
        super().__init__("publish refused")


def refusal_ack(qos: int, packet_id: int, code: int = NOT_AUTHORIZED) -> bytes:
    """PUBACK (QoS 1) or PUBREC (QoS 2) with ``code`` (0x87 unless told): refused, not stored,
    the connection goes on."""
    return encode5(Ack5(PUBACK if qos == 1 else PUBREC, packet_id, code))


def reason_for(exc: MalformedPacketError) -> int:
    """The DISCONNECT reason code for ending a connection on ``exc``."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    if getattr(exc, "limit", None) is not None:  # framing.PacketTooLargeError
        return PACKET_TOO_LARGE
    return MALFORMED


def connack_refusal(refusal: str) -> bytes:
    """The MQTT 5 CONNACK refusing a client for ``refusal`` (the admission's reason)."""
    return encode5(Connack5(_REFUSALS.get(refusal, UNSPECIFIED)))


@dataclass(frozen=True, slots=True)
class V5Limits:
    """What the broker announces in CONNACK, from its own limits."""

    max_packet_size: int
    receive_maximum: int
    retain_available: bool


class V5Session:
    """One MQTT 5 connection: its CONNECT as amqtt reads it, and both directions translated."""

    @classmethod
    def open(cls, raw: bytes, limits: V5Limits) -> V5Session:
        """The session of the MQTT 5 CONNECT ``raw``; :class:`MalformedPacketError` if it is not one."""
        connect = decode5(raw)
        if not isinstance(connect, Connect5):
            raise MalformedPacketError("first packet is not CONNECT")
        return cls(connect, limits)

    def __init__(self, connect: Connect5, limits: V5Limits) -> None:
        self.connect = connect
        self.limits = limits
        size = connect.prop(0x27)
        self.client_max_packet = size if isinstance(size, int) else None
        self._unsubscribes: dict[int, int] = {}  # packet id -> how many filters it named
        self._pending = bytearray()  # what amqtt wrote that is not yet a whole packet

    def as_v4(self) -> Connect:
        """The 3.1.1 CONNECT amqtt is given: the session always ends with the connection."""
        c = self.connect
        return Connect(
            c.client_id, 4, True, c.keep_alive, c.username if c.username is not None else "",
            c.password, c.will_topic, c.will_message, c.will_qos, c.will_retain,
        )  # fmt: skip

    def check_connect(self) -> str | None:
        """Why this CONNECT is refused before authentication, or None."""
        if self.connect.prop(0x15) is not None:
            return "authentication method"  # enhanced authentication is not offered
        return None

    def connack_properties(self) -> tuple[Prop, ...]:
        lim = self.limits
        props: list[Prop] = []
        asked = self.connect.prop(0x11, 0)
        if asked:
            props.append((0x11, 0))  # capped: sessions end with the connection (module docstring)
        props += [(0x21, min(lim.receive_maximum, 0xFFFF)), (0x27, lim.max_packet_size)]
        if not lim.retain_available:
            props.append((0x25, 0))
        props += [(0x28, 1), (0x29, 0), (0x2A, 0)]
        return tuple(props)

    # ---- inbound -----------------------------------------------------------------------------

    def inbound(self, raw: bytes) -> tuple[bytes, Packet]:
        """The 3.1.1 bytes and packet amqtt reads for the MQTT 5 packet ``raw``.

        Raises :class:`MalformedPacketError` (:class:`ProtocolViolationError` with its code).
        """
        packet = decode5(raw)
        v4 = self._to_v4(packet)
        return encode(v4), v4

    def _to_v4(self, p: Packet5) -> Packet:
        if isinstance(p, Publish5):
            if any(ident == 0x23 for ident, _ in p.properties):
                raise ProtocolViolationError("topic alias (none granted)", TOPIC_ALIAS_INVALID)
            return Publish(p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id)
        if isinstance(p, Ack5):
            return PacketIdOnly(p.packet_type, p.packet_id)
        if isinstance(p, Subscribe5):
            if p.properties and any(ident == 0x0B for ident, _ in p.properties):
                raise ProtocolViolationError("subscription identifier", SUBSCRIPTION_IDS_UNSUPPORTED)
            return Subscribe(p.packet_id, tuple((f, options & 0x03) for f, options in p.topics))
        if isinstance(p, Unsubscribe5):
            if len(self._unsubscribes) >= 0xFFFF:
                raise ProtocolViolationError("too many unanswered UNSUBSCRIBEs", PROTOCOL_ERROR)
            self._unsubscribes[p.packet_id] = len(p.filters)
            return Unsubscribe(p.packet_id, p.filters)
        if isinstance(p, PingReq):
            return p
        if isinstance(p, Disconnect5):
            if p.reason == DISCONNECT_WITH_WILL:
                # amqtt drops the will on a DISCONNECT; the end of the stream publishes it
                raise ProtocolViolationError("disconnect with will message", DISCONNECT_WITH_WILL)
            return Disconnect()
        raise ProtocolViolationError(f"{type(p).__name__} from a client", PROTOCOL_ERROR)

    # ---- outbound ----------------------------------------------------------------------------

    def outbound(self, data: bytes) -> bytes:
        """What amqtt (or the broker) wrote as 3.1.1, re-encoded as MQTT 5, whole packets only."""
        return rewrite_whole_packets(self._pending, data, self._to_v5)

    def _to_v5(self, raw: bytes) -> bytes | None:
        try:
            p = decode(raw)
        except MalformedPacketError:
            return raw  # already MQTT 5 (a DISCONNECT or an acknowledgement with a reason)
        out: Packet5 | None = None
        if isinstance(p, Publish):
            out = Publish5(p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id)
        elif isinstance(p, Connack):
            props = self.connack_properties() if p.return_code == 0 else ()
            out = Connack5(0 if p.return_code == 0 else NOT_AUTHORIZED, p.session_present, props)
        elif isinstance(p, Suback):
            out = Suback5(p.packet_id, tuple(NOT_AUTHORIZED if c == 0x80 else c for c in p.return_codes))
        elif isinstance(p, PacketIdOnly) and p.packet_type == UNSUBACK:
            count = self._unsubscribes.pop(p.packet_id, 1)
            out = Unsuback5(p.packet_id, (0,) * count)
        elif isinstance(p, PacketIdOnly):
            out = Ack5(p.packet_type, p.packet_id)
        elif isinstance(p, PingResp):
            return raw
        elif isinstance(p, Disconnect):
            out = Disconnect5()
        if out is None:
            return raw
        encoded = encode5(out)
        if self.client_max_packet is not None and len(encoded) > self.client_max_packet:
            _log.info("MQTT 5 client %r: a %d-byte packet over its maximum packet size not sent",
                      self.connect.client_id, len(encoded))  # fmt: skip
            return None
        return encoded
