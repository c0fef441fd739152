"""The contract's MQTT topics: exact round trips, and every malformed topic refused as TopicError."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotvault.domain.ids import IDENTIFIER_PATTERN
from iotvault.domain.topics import (
    EVENT_FILTER,
    MAX_TOPIC_LENGTH,
    STATUS_FILTER,
    CommandTopic,
    EventTopic,
    StatusTopic,
    Topic,
    parse_topic,
)
from iotvault.errors import TopicError, ValidationError

idents = st.from_regex(IDENTIFIER_PATTERN, fullmatch=True)

event_topics = st.builds(EventTopic, idents, idents, idents, idents)
status_topics = st.builds(StatusTopic, idents, idents)
command_topics = st.one_of(
    st.builds(CommandTopic, idents, idents, idents),  # fmt/json: iotvault's signed commands
    st.builds(CommandTopic, idents, idents, idents, idents),  # as a Watson application sent it
)
any_topic = st.one_of(event_topics, status_topics, command_topics)

# Characters that must never appear in a segment: MQTT wildcards and separator, NUL, white
# space (a trailing newline too, which a careless `$` anchor would let through), `$`, and
# anything outside ASCII, including look-alikes of allowed letters.
forbidden_chars = st.one_of(
    st.sampled_from(["+", "#", "/", "\x00", " ", "\t", "\n", "$", "*", ":"]),
    st.characters(min_codepoint=128),
)
bad_segments = st.one_of(
    st.just(""),
    st.from_regex(r"[A-Za-z0-9._-]{65,80}", fullmatch=True),  # one character too many, or more
    st.builds(
        lambda head, bad, tail: head + bad + tail,
        st.from_regex(r"[A-Za-z0-9._-]{0,10}", fullmatch=True),
        forbidden_chars,
        st.from_regex(r"[A-Za-z0-9._-]{0,10}", fullmatch=True),
    ),
)

# The positions (in the '/'-split topic) that carry an identifier, per kind of topic.
EVENT_IDENT_LEVELS = (2, 4, 6, 8)
STATUS_IDENT_LEVELS = (2, 4)
COMMAND_IDENT_LEVELS = (2, 4, 6, 8)


def ident_levels(topic: Topic) -> tuple[int, ...]:
    if isinstance(topic, EventTopic):
        return EVENT_IDENT_LEVELS
    if isinstance(topic, StatusTopic):
        return STATUS_IDENT_LEVELS
    return COMMAND_IDENT_LEVELS


def assert_refused(topic: str) -> TopicError:
    with pytest.raises(TopicError) as info:
        parse_topic(topic)
    assert info.value.field == "topic"
    return info.value


# ---- round trips --------------------------------------------------------------------
@given(any_topic)
def test_rendered_topic_parses_back_to_an_equal_object(topic: Topic) -> None:
    parsed = parse_topic(str(topic))
    assert parsed == topic
    assert type(parsed) is type(topic)
    assert str(parsed) == str(topic)


@given(idents, idents, idents, idents)
def test_event_topic_renders_the_contract_layout(type_id: str, device_id: str, event: str, fmt: str) -> None:
    topic = EventTopic(type_id, device_id, event, fmt)
    assert str(topic) == f"iot-2/type/{type_id}/id/{device_id}/evt/{event}/fmt/{fmt}"
    assert topic.is_command_ack == (event == "cmdack")


@given(idents, idents)
def test_status_topic_renders_the_contract_layout(type_id: str, device_id: str) -> None:
    assert str(StatusTopic(type_id, device_id)) == f"iot-2/type/{type_id}/id/{device_id}/mon"


@given(idents, idents, idents)
def test_command_topic_renders_the_contract_layout(type_id: str, device_id: str, command: str) -> None:
    topic = CommandTopic(type_id, device_id, command)
    assert str(topic) == f"iot-2/type/{type_id}/id/{device_id}/cmd/{command}/fmt/json"


def test_known_topics_parse_to_their_fields() -> None:
    assert parse_topic("iot-2/type/thermo/id/t-1/evt/reading/fmt/json") == EventTopic(
        "thermo", "t-1", "reading", "json"
    )
    assert parse_topic("iot-2/type/thermo/id/t-1/mon") == StatusTopic("thermo", "t-1")
    assert parse_topic("iot-2/type/thermo/id/t-1/cmd/reboot/fmt/json") == CommandTopic(
        "thermo", "t-1", "reboot"
    )
    assert parse_topic("iot-2/type/thermo/id/t-1/cmd/reboot/fmt/text") == CommandTopic(
        "thermo", "t-1", "reboot", "text"
    )
    ack = parse_topic("iot-2/type/thermo/id/t-1/evt/cmdack/fmt/json")
    assert isinstance(ack, EventTopic)
    assert ack.is_command_ack


def test_subscription_filters_are_not_contract_topics() -> None:
    # the filters contain wildcards, so they must never be accepted as a concrete topic
    assert_refused(EVENT_FILTER)
    assert_refused(STATUS_FILTER)


# ---- malformed segments -------------------------------------------------------------
@given(any_topic, bad_segments, st.data())
def test_a_bad_segment_anywhere_is_refused(topic: Topic, bad: str, data: st.DataObject) -> None:
    parts = str(topic).split("/")
    level = data.draw(st.sampled_from(ident_levels(topic)), label="level")
    parts[level] = bad
    assert_refused("/".join(parts))


@given(idents, idents, bad_segments, st.data())
def test_value_objects_refuse_a_bad_segment_as_topic_error(
    good1: str, good2: str, bad: str, data: st.DataObject
) -> None:
    which = data.draw(st.integers(min_value=0, max_value=9), label="which")
    cases: list[Callable[[], Topic]] = [
        lambda: EventTopic(bad, good1, good2, "json"),
        lambda: EventTopic(good1, bad, good2, "json"),
        lambda: EventTopic(good1, good2, bad, "json"),
        lambda: EventTopic(good1, good2, "reading", bad),
        lambda: StatusTopic(bad, good1),
        lambda: StatusTopic(good1, bad),
        lambda: CommandTopic(bad, good1, good2),
        lambda: CommandTopic(good1, bad, good2),
        lambda: CommandTopic(good1, good2, bad),
        lambda: CommandTopic(good1, good2, "reboot", bad),
    ]
    with pytest.raises(TopicError):
        cases[which]()


def test_topic_error_is_a_validation_error() -> None:
    err = assert_refused("iot-2/type/a+b/id/d/mon")
    assert isinstance(err, ValidationError)
    assert "typeId" in err.reason


# ---- malformed structure ------------------------------------------------------------
@given(any_topic, st.from_regex(r"[A-Za-z0-9._$-]{0,10}", fullmatch=True))
def test_a_wrong_prefix_is_refused(topic: Topic, prefix: str) -> None:
    parts = str(topic).split("/")
    if prefix == "iot-2":
        prefix = "iot-3"
    parts[0] = prefix
    assert_refused("/".join(parts))


@pytest.mark.parametrize(
    "topic",
    [
        "$SYS/type/t/id/d/mon",
        "IOT-2/type/t/id/d/mon",
        "/iot-2/type/t/id/d/mon",
        "iot-2/Type/t/id/d/mon",
        "iot-2/type/t/ID/d/mon",
        "iot-2/types/t/id/d/mon",
        "iot-2/type/t/id/d/MON",
        "iot-2/type/t/id/d/evt/e/FMT/json",
        "iot-2/type/t/id/d/Evt/e/fmt/json",
        "iot-2/type/t/id/d/cmd/c/FMT/json",
        "iot-2/type/t/id/d/Cmd/c/fmt/json",
        "iot-2/type/t/id/d/status",
    ],
)
def test_wrong_fixed_levels_are_refused(topic: str) -> None:
    assert_refused(topic)


@given(any_topic, st.lists(st.one_of(idents, st.just("")), min_size=1, max_size=4))
def test_extra_levels_are_refused(topic: Topic, extra: list[str]) -> None:
    assert_refused("/".join([str(topic), *extra]))


@given(any_topic, st.data())
def test_missing_levels_are_refused(topic: Topic, data: st.DataObject) -> None:
    parts = str(topic).split("/")
    keep = data.draw(st.integers(min_value=1, max_value=len(parts) - 1), label="keep")
    assert_refused("/".join(parts[:keep]))


@given(any_topic, st.data())
def test_a_dropped_level_in_the_middle_is_refused(topic: Topic, data: st.DataObject) -> None:
    parts = str(topic).split("/")
    drop = data.draw(st.integers(min_value=0, max_value=len(parts) - 1), label="drop")
    assert_refused("/".join(parts[:drop] + parts[drop + 1 :]))


@pytest.mark.parametrize("topic", ["", "/", "//", "iot-2", "iot-2/", "iot-2/type", "iot-2/type/t/id/d/"])
def test_empty_and_truncated_topics_are_refused(topic: str) -> None:
    assert_refused(topic)


@given(st.integers(min_value=MAX_TOPIC_LENGTH + 1, max_value=4 * MAX_TOPIC_LENGTH))
def test_overlong_topics_are_refused(length: int) -> None:
    # a valid-looking layout, made long by a long device id: the length check comes first
    head = "iot-2/type/t/id/"
    tail = "/mon"
    topic = head + "d" * (length - len(head) - len(tail)) + tail
    assert len(topic) == length
    err = assert_refused(topic)
    assert len(err.topic) <= 80  # the error does not carry the whole overlong topic along


def test_overlong_topic_of_separators_is_refused() -> None:
    assert_refused("/" * (MAX_TOPIC_LENGTH + 1))
    assert_refused("iot-2/type/t/id/d/evt/e/fmt/" + "+" * MAX_TOPIC_LENGTH)


# ---- arbitrary input ----------------------------------------------------------------
topic_ish = st.lists(
    st.one_of(
        st.sampled_from(["iot-2", "type", "id", "evt", "fmt", "mon", "cmd", "json", "", "+", "#"]),
        idents,
        st.text(max_size=8),
    ),
    max_size=12,
).map("/".join)


@given(st.one_of(st.text(), topic_ish))
def test_parse_topic_raises_only_topic_error_and_accepts_only_canonical_topics(text: str) -> None:
    outcome: Topic | TopicError
    try:
        outcome = parse_topic(text)
    except TopicError as exc:  # any other exception escapes and fails the test
        outcome = exc
    if isinstance(outcome, TopicError):
        assert outcome.field == "topic"
    else:
        # whatever is accepted is exactly what the value object renders
        assert str(outcome) == text
