"""Watson IoT clients on the embedded broker: client ids, device-relative topics, rules. Pure."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotvault.auth.policy import Grant, Principal
from iotvault.broker.acl import device_may
from iotvault.broker.authority import app_may
from iotvault.broker.codec import (
    Connect,
    MalformedPacketError,
    Publish,
    Subscribe,
    Unsubscribe,
    decode,
    encode,
)
from iotvault.broker.watson import DeviceTopics, WatsonApp, WatsonDevice, parse_client_id

OWN = "iot-2/type/rpi/id/dev1"


@pytest.mark.parametrize(
    ("client_id", "parsed"),
    [
        ("d:myorg:rpi:dev1", WatsonDevice("myorg", "rpi", "dev1")),
        ("a:myorg:app-1", WatsonApp("myorg", "app-1")),
        ("dev1", None),  # today's form: deviceId
        ("d:myorg:rpi", None),
        ("d:myorg:rpi:dev1:x", None),
        ("d:MyOrg:rpi:dev1", None),  # org ids are lower case
        ("d:myorg:r+i:dev1", None),
        ("d:myorg:rpi:#", None),
        ("d:myorg::dev1", None),
        ("a:myorg:", None),
        ("g:myorg:gw:g1", None),  # gateways are not offered
        ("iotvault:service", None),
        (f"d:myorg:rpi:{'x' * 65}", None),
    ],
)
def test_client_ids(client_id: str, parsed: object) -> None:
    assert parse_client_id(client_id) == parsed


@pytest.mark.parametrize(
    ("relative", "full"),
    [
        ("iot-2/evt/reading/fmt/json", f"{OWN}/evt/reading/fmt/json"),
        ("iot-2/evt/photo/fmt/bin", f"{OWN}/evt/photo/fmt/bin"),
        ("iot-2/mon", f"{OWN}/mon"),
        # anything else is left as it is, for the topic rules to refuse
        ("iot-2/evt/reading/fmt/json/x", "iot-2/evt/reading/fmt/json/x"),
        ("iot-2/type/rpi/id/other/evt/e/fmt/json", "iot-2/type/rpi/id/other/evt/e/fmt/json"),
        ("iot-2/cmd/reboot/fmt/json", "iot-2/cmd/reboot/fmt/json"),
        ("$SYS/broker/load", "$SYS/broker/load"),
    ],
)
def test_published_topics_map_to_the_devices_own(relative: str, full: str) -> None:
    assert DeviceTopics("rpi", "dev1").topic(relative) == full


@pytest.mark.parametrize(
    ("relative", "full"),
    [
        ("iot-2/cmd/+/fmt/+", f"{OWN}/cmd/+/fmt/+"),
        ("iot-2/cmd/reboot/fmt/json", f"{OWN}/cmd/reboot/fmt/json"),
        ("iot-2/cmd/#", "iot-2/cmd/#"),
        ("#", "#"),
        ("iot-2/+/+/fmt/+", "iot-2/+/+/fmt/+"),
    ],
)
def test_subscriptions_map_to_the_devices_own(relative: str, full: str) -> None:
    assert DeviceTopics("rpi", "dev1").filter(relative) == full


@pytest.mark.parametrize(
    "relative",
    ["iot-2/evt/reading/fmt/json", "iot-2/mon", "iot-2/cmd/+/fmt/+", "iot-2/cmd/reboot/fmt/json"],
)
def test_what_a_device_reaches_after_mapping_is_its_own_and_nothing_of_another(relative: str) -> None:
    """The mapped topic is inside the device's prefix; the same words from another device are not."""
    mine, theirs = DeviceTopics("rpi", "dev1"), DeviceTopics("rpi", "dev2")
    action = "subscribe" if "/cmd/" in relative else "publish"
    mapped = mine.filter(relative) if action == "subscribe" else mine.topic(relative)
    assert device_may("rpi", "dev1", mapped, action)
    other = theirs.filter(relative) if action == "subscribe" else theirs.topic(relative)
    assert not device_may("rpi", "dev1", other, action)


def test_packets_are_rewritten_and_deliveries_mapped_back() -> None:
    topics = DeviceTopics("rpi", "dev1")
    raw = encode(Publish("iot-2/evt/e/fmt/json", b"{}", 1, packet_id=7))
    new_raw, packet = topics.inbound(raw, decode(raw))
    assert packet == Publish(f"{OWN}/evt/e/fmt/json", b"{}", 1, packet_id=7)
    assert decode(new_raw) == packet
    sub = Subscribe(3, (("iot-2/cmd/+/fmt/+", 1), ("#", 0)))
    _, mapped = topics.inbound(encode(sub), sub)
    assert mapped == Subscribe(3, ((f"{OWN}/cmd/+/fmt/+", 1), ("#", 0)))
    unsub = Unsubscribe(4, ("iot-2/cmd/+/fmt/+",))
    assert topics.inbound(encode(unsub), unsub)[1] == Unsubscribe(4, (f"{OWN}/cmd/+/fmt/+",))
    untouched = encode(Publish(f"{OWN}/evt/e/fmt/json", b"{}"))
    assert topics.inbound(untouched, decode(untouched))[0] is untouched
    # a delivery written in two pieces, with a PUBACK before it, comes out whole and mapped
    delivery = encode(Publish(f"{OWN}/cmd/reboot/fmt/json", b'{"a":1}', 1, packet_id=9))
    puback = b"\x40\x02\x00\x07"
    first = topics.outbound(puback + delivery[:5])
    assert first == puback
    out = topics.outbound(delivery[5:])
    assert decode(out) == Publish("iot-2/cmd/reboot/fmt/json", b'{"a":1}', 1, packet_id=9)
    # another device's command topic is never rewritten into this device's view
    foreign = encode(Publish("iot-2/type/rpi/id/dev2/cmd/x/fmt/json", b"{}"))
    assert topics.outbound(foreign) == foreign


def test_a_name_too_long_once_mapped_is_a_malformed_packet() -> None:
    topics = DeviceTopics("rpi", "dev1")
    relative = "iot-2/evt/" + "e" * 65_500 + "/fmt/json"  # fits in MQTT; with the prefix it does not
    packet = Publish(relative, b"{}", 1, packet_id=1)
    with pytest.raises(MalformedPacketError, match="too long"):
        topics.inbound(encode(packet), packet)


def test_a_will_is_mapped_too() -> None:
    topics = DeviceTopics("rpi", "dev1")
    connect = Connect("d:o:rpi:dev1", will_topic="iot-2/mon", will_message=b"{}")
    assert topics.connect(connect).will_topic == f"{OWN}/mon"
    assert topics.connect(Connect("d:o:rpi:dev1")) == Connect("d:o:rpi:dev1")


@pytest.mark.parametrize(
    ("topic", "action", "allowed"),
    [
        (f"{OWN}/cmd/+/fmt/+", "subscribe", True),
        (f"{OWN}/cmd/reboot/fmt/+", "subscribe", True),
        (f"{OWN}/cmd/+/fmt/text", "subscribe", True),
        (f"{OWN}/cmd/#", "subscribe", False),
        (f"{OWN}/cmd/+/fmt/#", "subscribe", False),
        (f"{OWN}/cmd/+/fmt/+/x", "subscribe", False),
        ("iot-2/type/rpi/id/+/cmd/+/fmt/+", "subscribe", False),
        ("iot-2/type/+/id/dev1/cmd/+/fmt/+", "subscribe", False),
        ("iot-2/type/rpi/id/dev2/cmd/+/fmt/+", "subscribe", False),
        ("iot-2/type/other/id/dev1/cmd/+/fmt/+", "subscribe", False),
        (f"{OWN}/evt/+/fmt/+", "subscribe", False),
    ],
)
def test_device_command_filters(topic: str, action: str, allowed: bool) -> None:
    assert device_may("rpi", "dev1", topic, action) is allowed  # type: ignore[arg-type]


READER = Principal.from_grants("api_key", "k1", [Grant(False, True, False, frozenset({"a1", "a2"}))])
WRITER = Principal.from_grants("api_key", "k2", [Grant(False, True, True, frozenset({"a1"}))])


@pytest.mark.parametrize(
    ("principal", "topic", "action", "allowed"),
    [
        (READER, "iot-2/type/+/id/+/evt/+/fmt/+", "subscribe", True),
        (READER, "iot-2/type/rpi/id/+/evt/temp/fmt/json", "subscribe", True),
        (READER, "iot-2/type/+/id/+/mon", "subscribe", True),
        (READER, "iot-2/type/rpi/id/a1/evt/+/fmt/+", "subscribe", True),
        (READER, "iot-2/type/rpi/id/zz/evt/+/fmt/+", "subscribe", False),  # a device it may not read
        (READER, "#", "subscribe", False),
        (READER, "iot-2/#", "subscribe", False),
        (READER, "iot-2/type/+/id/+/#", "subscribe", False),
        (READER, "iot-2/type/+/id/+/cmd/+/fmt/+", "subscribe", False),
        (READER, "iot-2/type/+/id/+/evt/+/fmt/+/x", "subscribe", False),
        (READER, "$SYS/#", "subscribe", False),
        (READER, "iot-2/type/rpi/id/a1/evt/t/fmt/json", "receive", True),
        (READER, "iot-2/type/rpi/id/a2/mon", "receive", True),
        (READER, "iot-2/type/rpi/id/zz/evt/t/fmt/json", "receive", False),
        (READER, "iot-2/type/rpi/id/a1/cmd/c/fmt/json", "receive", False),
        (READER, "iot-2/type/rpi/id/a1/cmd/c/fmt/json", "publish", False),  # a reader only
        (WRITER, "iot-2/type/rpi/id/a1/cmd/c/fmt/json", "publish", True),
        (WRITER, "iot-2/type/rpi/id/a2/cmd/c/fmt/json", "publish", False),
        (WRITER, "iot-2/type/rpi/id/a1/evt/t/fmt/json", "publish", False),  # never as a device
        (WRITER, "iot-2/type/rpi/id/a1/mon", "publish", False),
        (WRITER, "iot-2/type/rpi/id/+/cmd/c/fmt/json", "publish", False),
    ],
)
def test_application_rules(principal: Principal, topic: str, action: str, allowed: bool) -> None:
    assert app_may(principal, topic, action) is allowed  # type: ignore[arg-type]


_LEVELS = [
    "iot-2",
    "evt",
    "cmd",
    "fmt",
    "type",
    "id",
    "mon",
    "+",
    "#",
    "$SYS",
    "",
    "rpi",
    "cam",
    "dev1",
    "dev2",
    "json",
]


@given(st.lists(st.sampled_from(_LEVELS), min_size=1, max_size=9), st.sampled_from(["publish", "subscribe"]))
@settings(max_examples=3000, deadline=None)
def test_whatever_a_device_sends_it_reaches_only_its_own_topics(levels: list[str], action: str) -> None:
    """Any name a d: session sends, once mapped, is allowed only inside its own prefix."""
    name = "/".join(levels)
    topics = DeviceTopics("rpi", "dev1")
    mapped = topics.filter(name) if action == "subscribe" else topics.topic(name)
    if device_may("rpi", "dev1", mapped, action):  # type: ignore[arg-type]
        assert mapped.startswith(f"{OWN}/")
        assert mapped.split("/")[:5] == ["iot-2", "type", "rpi", "id", "dev1"]
        assert "#" not in mapped
        assert "$" not in mapped
