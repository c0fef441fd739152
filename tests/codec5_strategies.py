"""Hypothesis strategies for MQTT 5 packets and their properties (codec5 tests, fuzz seeds)."""

from __future__ import annotations

from codec_strategies import data, nonempty, packet_ids, text, topic_names
from hypothesis import strategies as st

from iotvault.broker.codec import PingReq, PingResp
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
)

_user = st.tuples(st.just(0x26), st.tuples(text, text))
_string = text
_VALUES = {  # a value strategy per property identifier (non-zero where 0 is a protocol error)
    0x01: st.integers(0, 1), 0x02: st.integers(0, 0xFFFFFFFF), 0x03: _string, 0x08: topic_names,
    0x09: data, 0x0B: st.integers(1, 268_435_455), 0x11: st.integers(0, 0xFFFFFFFF), 0x12: _string,
    0x13: st.integers(0, 0xFFFF), 0x15: _string, 0x16: data, 0x17: st.integers(0, 1),
    0x18: st.integers(0, 0xFFFFFFFF), 0x19: st.integers(0, 1), 0x1A: _string, 0x1C: _string,
    0x1F: _string, 0x21: st.integers(1, 0xFFFF), 0x22: st.integers(0, 0xFFFF), 0x23: st.integers(1, 0xFFFF),
    0x24: st.integers(0, 1), 0x25: st.integers(0, 1), 0x27: st.integers(1, 0xFFFFFFFF),
    0x28: st.integers(0, 1), 0x29: st.integers(0, 1), 0x2A: st.integers(0, 1),
}  # fmt: skip


def props(*idents: int, repeat: tuple[int, ...] = ()) -> st.SearchStrategy[tuple[Prop, ...]]:
    """Properties drawn from ``idents`` (each at most once, except ``repeat``) and user properties."""
    once = st.lists(st.sampled_from(idents), unique=True, max_size=len(idents)) if idents else st.just([])

    @st.composite
    def build(draw: st.DrawFn) -> tuple[Prop, ...]:
        chosen: list[Prop] = [(i, draw(_VALUES[i])) for i in draw(once)]
        for ident in repeat:
            chosen += [(ident, draw(_VALUES[ident])) for _ in range(draw(st.integers(0, 2)))]
        chosen += draw(st.lists(_user, max_size=3))
        return tuple(draw(st.permutations(chosen)))

    return build()


_WILL_PROPS = (0x01, 0x02, 0x03, 0x08, 0x09, 0x18)


@st.composite
def connects5(draw: st.DrawFn) -> Connect5:
    will = draw(st.booleans())
    return Connect5(
        client_id=draw(text),
        clean_start=draw(st.booleans()),
        keep_alive=draw(st.integers(0, 0xFFFF)),
        username=draw(st.none() | text),
        password=draw(st.none() | data),
        will_topic=draw(topic_names) if will else None,
        will_message=draw(data) if will else None,
        will_qos=draw(st.integers(0, 2)) if will else 0,
        will_retain=draw(st.booleans()) if will else False,
        properties=draw(props(0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x27)),
        will_properties=draw(props(*_WILL_PROPS)) if will else (),
    )


@st.composite
def publishes5(draw: st.DrawFn) -> Publish5:
    qos = draw(st.integers(0, 2))
    return Publish5(
        topic=draw(topic_names),
        payload=draw(data),
        qos=qos,
        retain=draw(st.booleans()),
        dup=draw(st.booleans()) if qos else False,
        packet_id=draw(packet_ids) if qos else None,
        properties=draw(props(0x01, 0x02, 0x03, 0x08, 0x09, 0x23, repeat=(0x0B,))),
    )


_options = st.builds(lambda q, nl, rap, rh: q | nl << 2 | rap << 3 | rh << 4,
                     st.integers(0, 2), st.integers(0, 1), st.integers(0, 1), st.integers(0, 2))  # fmt: skip
_reasons = st.lists(st.integers(0, 255), min_size=1, max_size=5).map(tuple)

packets5: st.SearchStrategy[Packet5] = st.one_of(
    connects5(),
    publishes5(),
    st.builds(Connack5, st.integers(0, 255), st.booleans(),
              props(0x11, 0x12, 0x13, 0x15, 0x1F, 0x21, 0x22, 0x24, 0x25, 0x27, 0x28, 0x29, 0x2A)),
    st.builds(Ack5, st.sampled_from([4, 5, 6, 7]), packet_ids, st.integers(0, 255), props(0x1F)),
    st.builds(Subscribe5, packet_ids,
              st.lists(st.tuples(nonempty, _options), min_size=1, max_size=4).map(tuple), props(0x0B)),
    st.builds(Suback5, packet_ids, _reasons, props(0x1F)),
    st.builds(Unsubscribe5, packet_ids, st.lists(nonempty, min_size=1, max_size=4).map(tuple), props()),
    st.builds(Unsuback5, packet_ids, _reasons, props(0x1F)),
    st.builds(Disconnect5, st.integers(0, 255), props(0x11, 0x1C, 0x1F)),
    st.just(PingReq()),
    st.just(PingResp()),
)  # fmt: skip
