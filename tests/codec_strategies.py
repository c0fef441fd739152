"""Hypothesis strategies for MQTT 3.1.1 packets, shared by the codec and amqtt contract tests."""

from __future__ import annotations

from hypothesis import strategies as st

from iotvault.broker.codec import (
    Connack,
    Connect,
    Disconnect,
    Packet,
    PacketIdOnly,
    PingReq,
    PingResp,
    Publish,
    Suback,
    Subscribe,
    Unsubscribe,
)

# MQTT strings: UTF-8 without U+0000 (and no lone surrogates, which UTF-8 cannot carry)
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
nonempty = text.filter(bool)
topic_names = nonempty.filter(lambda t: "+" not in t and "#" not in t)
packet_ids = st.integers(1, 0xFFFF)
data = st.binary(max_size=300)


@st.composite
def connects(draw: st.DrawFn) -> Connect:
    username = draw(st.none() | text)
    password = draw(st.none() | data) if username is not None else None
    will = draw(st.booleans())
    return Connect(
        client_id=draw(text),
        clean_session=draw(st.booleans()),
        keep_alive=draw(st.integers(0, 0xFFFF)),
        username=username,
        password=password,
        will_topic=draw(topic_names) if will else None,
        will_message=draw(data) if will else None,
        will_qos=draw(st.integers(0, 2)) if will else 0,
        will_retain=draw(st.booleans()) if will else False,
    )


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    qos = draw(st.integers(0, 2))
    return Publish(
        topic=draw(topic_names),
        payload=draw(data),
        qos=qos,
        retain=draw(st.booleans()),
        dup=draw(st.booleans()) if qos else False,
        packet_id=draw(packet_ids) if qos else None,
    )


subscribes = st.builds(
    Subscribe, packet_ids, st.lists(st.tuples(nonempty, st.integers(0, 2)), min_size=1, max_size=5).map(tuple)
)
unsubscribes = st.builds(Unsubscribe, packet_ids, st.lists(nonempty, min_size=1, max_size=5).map(tuple))
acks = st.builds(PacketIdOnly, st.sampled_from([4, 5, 6, 7]), packet_ids)  # PUBACK .. PUBCOMP

# what a client sends to the broker
client_packets: st.SearchStrategy[Packet] = st.one_of(
    connects(), publishes(), subscribes, unsubscribes, acks, st.just(PingReq()), st.just(Disconnect())
)
# and everything the codec knows
packets: st.SearchStrategy[Packet] = st.one_of(
    client_packets,
    st.builds(Connack, st.integers(0, 255), st.booleans()),
    st.builds(
        Suback, packet_ids, st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=5).map(tuple)
    ),
    st.builds(PacketIdOnly, st.just(11), packet_ids),  # UNSUBACK
    st.just(PingResp()),
)
