"""Identifiers: exactly the contract's alphabet, and UUIDv7 event ids that never go backwards."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotvault.domain.ids import DeviceId, EventIdFactory, TypeId, check_identifier, event_id_millis
from iotvault.errors import ValidationError

ALLOWED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
N_IDS = 100_000

valid_idents = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)


def is_valid(value: str) -> bool:
    """The contract spelled out without a regular expression, as an independent oracle."""
    return 1 <= len(value) <= 64 and all(c in ALLOWED for c in value)


# ---- identifiers --------------------------------------------------------------------
@given(valid_idents)
def test_valid_identifiers_are_accepted_unchanged(value: str) -> None:
    assert check_identifier("deviceId", value) == value
    assert DeviceId(value).value == value
    assert str(DeviceId(value)) == value
    assert str(TypeId(value)) == value


@given(
    st.one_of(
        st.text(),
        st.text(alphabet=sorted(ALLOWED), min_size=60, max_size=70),
        st.text(alphabet=[*sorted(ALLOWED)[:5], "\n", " ", "+", "#", "/", "\x00", "é"], max_size=6),
    )
)
def test_identifiers_are_accepted_exactly_when_they_match_the_contract(value: str) -> None:
    if is_valid(value):
        assert check_identifier("typeId", value) == value
        assert TypeId(value).value == value
    else:
        with pytest.raises(ValidationError) as info:
            check_identifier("typeId", value)
        assert info.value.field == "typeId"
        with pytest.raises(ValidationError):
            TypeId(value)
        with pytest.raises(ValidationError):
            DeviceId(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "a" * 65,
        "dev\n",  # a trailing newline slips past a `$` anchor; fullmatch must refuse it
        "\ndev",
        "dev ice",
        "dev/ice",
        "dev+",
        "#",
        "dev\x00",
        "d\u0435v",  # a Cyrillic look-alike of the ASCII letter e
        "\uff44\uff45\uff56",  # full-width letters
        "dev\u0661",  # Arabic-Indic digit one, a digit to \d but not to the contract
        "$SYS",
    ],
)
def test_known_bad_identifiers_are_refused(value: str) -> None:
    with pytest.raises(ValidationError):
        check_identifier("deviceId", value)
    with pytest.raises(ValidationError) as info:
        DeviceId(value)
    assert info.value.field == "deviceId"
    with pytest.raises(ValidationError) as info:
        TypeId(value)
    assert info.value.field == "typeId"


@pytest.mark.parametrize("value", ["a", "a" * 64, ".", "..", "-", "_", "A.b_c-9"])
def test_boundary_identifiers_are_accepted(value: str) -> None:
    assert check_identifier("deviceId", value) == value


@pytest.mark.parametrize("value", [None, 42, b"dev", ["dev"]])
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(ValidationError):
        check_identifier("deviceId", value)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        DeviceId(value)  # type: ignore[arg-type]


def test_identifier_value_objects_compare_by_value() -> None:
    assert DeviceId("d-1") == DeviceId("d-1")
    assert hash(DeviceId("d-1")) == hash(DeviceId("d-1"))
    assert DeviceId("d-1") != DeviceId("d-2")


# ---- event ids ----------------------------------------------------------------------
def assert_uuid7(event_id: str) -> uuid.UUID:
    parsed = uuid.UUID(event_id)
    assert str(parsed) == event_id  # canonical, lower-case, hyphenated
    assert parsed.variant == uuid.RFC_4122  # the RFC 9562 variant bits 10
    assert (parsed.int >> 62) & 0b11 == 0b10
    assert parsed.version == 7
    assert (parsed.int >> 76) & 0xF == 7
    return parsed


def assert_strictly_increasing(values: list[str]) -> None:
    for earlier, later in itertools.pairwise(values):
        assert earlier < later, (earlier, later)


def make_ids(factory: EventIdFactory, n: int = N_IDS) -> list[str]:
    return [factory.new() for _ in range(n)]


def test_event_ids_are_uuid7_with_the_rfc_9562_variant() -> None:
    factory = EventIdFactory()
    for event_id in make_ids(factory, 2_000):
        assert_uuid7(event_id)


def test_event_ids_strictly_increase_in_a_tight_loop() -> None:
    made = make_ids(EventIdFactory())
    assert_strictly_increasing(made)
    assert len(set(made)) == N_IDS
    # the string order is the integer order, so sorting ids sorts by arrival
    assert sorted(made, key=lambda e: uuid.UUID(e).int) == made
    assert_uuid7(made[0])
    assert_uuid7(made[-1])


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> int:
    """A wall clock that stands still (the factory reads time.time_ns from the time module)."""
    now_ns = 1_700_000_000_123_456_789
    monkeypatch.setattr(time, "time_ns", lambda: now_ns)
    return now_ns // 1_000_000


def test_event_ids_strictly_increase_when_the_clock_stands_still(frozen_clock: int) -> None:
    made = make_ids(EventIdFactory())
    assert_strictly_increasing(made)
    assert event_id_millis(made[0]) == frozen_clock
    # the counter runs over into the next millisecond only when a millisecond's 12-bit counter
    # is used up (at least 3072 ids each), so the ids stay close to the clock
    drift = event_id_millis(made[-1]) - frozen_clock
    assert 0 < drift <= N_IDS // 3072 + 1
    for event_id in made[:: N_IDS // 50]:
        assert_uuid7(event_id)


def test_event_ids_strictly_increase_when_the_clock_steps_backwards(monkeypatch: pytest.MonkeyPatch) -> None:
    def backwards() -> Iterator[int]:
        t = 1_700_000_000_000_000_000
        while True:
            yield t
            t -= 1_000_000  # one millisecond back at every call

    clock = backwards()
    monkeypatch.setattr(time, "time_ns", lambda: next(clock))
    made = make_ids(EventIdFactory())
    assert_strictly_increasing(made)
    assert event_id_millis(made[0]) == 1_700_000_000_000


def test_event_ids_strictly_increase_across_a_backward_jump_then_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readings = iter([5_000, 5_000, 1_000, 1_000, 4_000, 9_000, 9_000])
    monkeypatch.setattr(time, "time_ns", lambda: next(readings) * 1_000_000)
    factory = EventIdFactory()
    made = [factory.new() for _ in range(7)]
    assert_strictly_increasing(made)
    assert [event_id_millis(e) for e in made] == [5_000] * 5 + [9_000] * 2


def test_event_ids_from_several_threads_are_unique() -> None:
    factory = EventIdFactory()
    results: list[list[str]] = [[] for _ in range(4)]

    def work(out: list[str]) -> None:
        out.extend(factory.new() for _ in range(5_000))

    threads = [threading.Thread(target=work, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [e for out in results for e in out]
    assert len(set(every)) == len(every) == 20_000
    for out in results:  # each thread sees its own ids in increasing order
        assert_strictly_increasing(out)


def test_two_factories_do_not_collide() -> None:
    a, b = EventIdFactory(), EventIdFactory()
    assert not set(make_ids(a, 5_000)) & set(make_ids(b, 5_000))


def test_event_id_millis_is_the_time_the_id_was_made() -> None:
    factory = EventIdFactory()
    for _ in range(50):
        before = time.time_ns() // 1_000_000
        event_id = factory.new()
        after = time.time_ns() // 1_000_000
        assert before <= event_id_millis(event_id) <= after + 2


def test_event_id_millis_reads_a_known_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: 1_234_567_890_123_999_999)
    assert event_id_millis(EventIdFactory().new()) == 1_234_567_890_123


@given(st.integers(min_value=0, max_value=(1 << 48) - 1))
def test_event_ids_are_canonical_and_carry_their_time_at_any_millisecond(unix_ms: int) -> None:
    # leading zero digits included: the id is formatted without going through uuid.UUID
    event_id = EventIdFactory().new_at(unix_ms)
    assert len(event_id) == 36
    assert_uuid7(event_id)
    assert event_id_millis(event_id) == unix_ms


def test_the_bounds_of_a_millisecond_enclose_every_id_made_in_it() -> None:
    """One layout: the factory, the time read back and the query bounds agree."""
    from iotvault.domain.ids import event_id_bound  # noqa: PLC0415

    factory = EventIdFactory()
    at_ms = 1_795_311_554_123
    ids = [factory.new_at(at_ms) for _ in range(50)]
    low, high = event_id_bound(at_ms * 1000 + 999, upper=False), event_id_bound(at_ms * 1000, upper=True)
    assert all(low <= i <= high for i in ids)
    assert {event_id_millis(i) for i in ids} == {at_ms}
    assert event_id_bound((at_ms + 1) * 1000, upper=False) > max(ids)
    assert event_id_bound((at_ms - 1) * 1000, upper=True) < min(ids)


# ---- a batch's ids in one call (ingest) -----------------------------------------------
def test_a_batch_of_ids_is_the_same_sequence_as_one_at_a_time(frozen_clock: int) -> None:
    factory = EventIdFactory()
    times = [
        frozen_clock,
        frozen_clock,
        frozen_clock + 3,
        frozen_clock + 1,
        frozen_clock + 3,
        frozen_clock + 9,
    ]
    made = factory.new_many(times)
    ids = [e for e, _ in made]
    assert_strictly_increasing(ids)
    # each with the millisecond it carries: the wanted one, or the previous id's if the clock
    # stood still or went back
    assert [ms for _, ms in made] == [event_id_millis(e) for e in ids]
    assert [ms - frozen_clock for _, ms in made] == [0, 0, 3, 3, 3, 9]
    for event_id in ids:
        assert_uuid7(event_id)
    # and the factory goes on after the batch, one at a time or in the next batch
    later = [factory.new_at(frozen_clock), *(e for e, _ in factory.new_many([frozen_clock] * 3))]
    assert_strictly_increasing(ids + later)
    assert factory.new_many([]) == []


def test_a_batch_that_uses_up_a_millisecond_runs_into_the_next() -> None:
    made = EventIdFactory().new_many([1_700_000_000_000] * 10_000)
    ids = [e for e, _ in made]
    assert_strictly_increasing(ids)
    assert len(set(ids)) == 10_000
    assert [ms for _, ms in made] == [event_id_millis(e) for e in ids]
    assert 0 < made[-1][1] - 1_700_000_000_000 <= 10_000 // 3072 + 1
    # the random part differs from id to id, not only the counter
    assert len({e[19:] for e in ids}) == 10_000
