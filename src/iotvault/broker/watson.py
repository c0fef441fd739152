"""Watson IoT Platform clients on the embedded broker: their client ids, and a device's topics.

A device written for Watson IoT Platform (``wiotp-sdk``'s ``DeviceClient``, or any MQTT client
configured the Watson way) connects with client id ``d:<org>:<typeId>:<deviceId>``, user name
``use-token-auth`` and its credential as the password, and speaks *device-relative* topics:

==========================================  ==============================================
what the device uses                        what iotvault sees (its own full topic)
==========================================  ==============================================
publish ``iot-2/evt/<event>/fmt/<format>``  ``iot-2/type/<t>/id/<d>/evt/<event>/fmt/<format>``
publish ``iot-2/mon``                       ``iot-2/type/<t>/id/<d>/mon``
subscribe ``iot-2/cmd/<cmd|+>/fmt/<f|+>``   ``iot-2/type/<t>/id/<d>/cmd/<cmd|+>/fmt/<f|+>``
receives ``iot-2/cmd/<cmd>/fmt/<format>``   delivered on ``iot-2/type/<t>/id/<d>/cmd/...``
==========================================  ==============================================

:class:`DeviceTopics` does that mapping for one session, at the door: on the packets a device
sends (PUBLISH, SUBSCRIBE, UNSUBSCRIBE, the will of its CONNECT) before authorization, ingest
or amqtt see them, and on the PUBLISH packets delivered to it. ``<t>`` and ``<d>`` come from
the client id, which the authority checked against the registry at CONNECT (the org equal to
the node's, the type the device's registered type). Everything else is left as it is, so the
topic rules of :mod:`iotvault.broker.acl` decide exactly as for any device: a ``#``, a ``+``
where the type or id would be, another device's full topic or ``$SYS`` all stay outside the
device's own prefix and are refused. The device's own full topics stay allowed, as they are
for every device.

An application (``wiotp-sdk``'s ``ApplicationClient``) connects with client id
``a:<org>:<appId>``, an API key's id as user name and its password; it uses full topics, so it
needs no mapping (the authority decides what it may read and command).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Final

from iotvault.broker.codec import (
    Connect,
    MalformedPacketError,
    Packet,
    Publish,
    Subscribe,
    Unsubscribe,
    decode,
    encode,
    rewrite_whole_packets,
)
from iotvault.domain.topics import PREFIX

__all__ = ["DEVICE_USERNAME", "DeviceTopics", "WatsonApp", "WatsonDevice", "parse_client_id"]

DEVICE_USERNAME: Final = "use-token-auth"
"""The user name every Watson device logs in with; the password is its credential."""

_ID: Final = "[A-Za-z0-9._-]{1,64}"
_DEVICE_CLIENT: Final = re.compile(rf"d:([a-z0-9]{{1,32}}):({_ID}):({_ID})")
_APP_CLIENT: Final = re.compile(rf"[aA]:([a-z0-9]{{1,32}}):({_ID})")


@dataclass(frozen=True, slots=True)
class WatsonDevice:
    """A client id ``d:<org>:<typeId>:<deviceId>`` (not yet checked against anything)."""

    org: str
    type_id: str
    device_id: str


@dataclass(frozen=True, slots=True)
class WatsonApp:
    """A client id ``a:<org>:<appId>`` (``A:`` too: Watson's shared-subscription form)."""

    org: str
    app_id: str


def parse_client_id(client_id: str) -> WatsonDevice | WatsonApp | None:
    """The Watson client a client id names, or None for any other client id.

    A plain deviceId can never parse: it has no ``:``.
    """
    if m := _DEVICE_CLIENT.fullmatch(client_id):
        return WatsonDevice(m[1], m[2], m[3])
    if m := _APP_CLIENT.fullmatch(client_id):
        return WatsonApp(m[1], m[2])
    return None


class DeviceTopics:
    """One ``d:`` session's device-relative topics, mapped both ways (module docstring)."""

    def __init__(self, type_id: str, device_id: str) -> None:
        self.prefix = f"{PREFIX}/type/{type_id}/id/{device_id}/"
        self._pending = bytearray()  # what was written to the device that is not yet a whole packet

    @classmethod
    def for_client(cls, client_id: str) -> DeviceTopics | None:
        """The mapping of a ``d:`` client id, or None (nothing to map)."""
        parsed = parse_client_id(client_id)
        return cls(parsed.type_id, parsed.device_id) if isinstance(parsed, WatsonDevice) else None

    # ---- from the device ------------------------------------------------------------------------

    def topic(self, topic: str) -> str:
        """A topic the device publishes on: ``iot-2/evt/E/fmt/F`` and ``iot-2/mon`` become its own."""
        parts = topic.split("/")
        if parts[0] != PREFIX:
            return topic
        if len(parts) == 5 and parts[1] == "evt" and parts[3] == "fmt":  # iot-2/evt/E/fmt/F
            return f"{self.prefix}{topic[len(PREFIX) + 1 :]}"
        if parts[1:] == ["mon"]:
            return f"{self.prefix}mon"
        return topic

    def filter(self, topic_filter: str) -> str:
        """A filter the device subscribes to: ``iot-2/cmd/C/fmt/F`` (``+`` allowed) becomes its own."""
        parts = topic_filter.split("/")
        if len(parts) == 5 and parts[0] == PREFIX and parts[1] == "cmd" and parts[3] == "fmt":
            return f"{self.prefix}{topic_filter[len(PREFIX) + 1 :]}"
        return topic_filter

    def connect(self, connect: Connect) -> Connect:
        """The CONNECT with its will topic mapped (a Watson device's will is device-relative too)."""
        if connect.will_topic is None:
            return connect
        return replace(connect, will_topic=self.topic(connect.will_topic))

    def inbound(self, raw: bytes, packet: Packet) -> tuple[bytes, Packet]:
        """A decoded packet from the device, its topics mapped (re-encoded only if one changed)."""
        mapped: Packet = packet
        if isinstance(packet, Publish):
            mapped = replace(packet, topic=self.topic(packet.topic))
        elif isinstance(packet, Subscribe):
            mapped = replace(packet, topics=tuple((self.filter(f), q) for f, q in packet.topics))
        elif isinstance(packet, Unsubscribe):
            mapped = replace(packet, filters=tuple(self.filter(f) for f in packet.filters))
        if mapped == packet:
            return raw, packet
        try:
            return encode(mapped), mapped
        except ValueError:  # the device's prefix made a name longer than MQTT can carry
            raise MalformedPacketError("topic too long once mapped to the device's own") from None

    # ---- to the device --------------------------------------------------------------------------

    def delivered(self, topic: str) -> str:
        """A topic delivered to the device: its own ``.../cmd/C/fmt/F`` becomes ``iot-2/cmd/C/fmt/F``."""
        if topic.startswith(self.prefix) and topic[len(self.prefix) :].startswith("cmd/"):
            return f"{PREFIX}/{topic[len(self.prefix) :]}"
        return topic

    def outbound(self, data: bytes) -> bytes:
        """What the broker wrote to the device (MQTT 3.1.1 packets), PUBLISH topics mapped back.

        Whole packets only: a packet written in pieces waits for its end.
        """
        return rewrite_whole_packets(self._pending, data, self._map_back)

    def _map_back(self, raw: bytes) -> bytes:
        if raw[0] >> 4 != 3:  # only PUBLISH names a topic
            return raw
        try:
            packet = decode(raw)
        except MalformedPacketError:
            return raw
        if not isinstance(packet, Publish) or (topic := self.delivered(packet.topic)) == packet.topic:
            return raw
        return encode(replace(packet, topic=topic))
