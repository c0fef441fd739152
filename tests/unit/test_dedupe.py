"""The redelivery rule of the ingest dedupe index, and its on-disk entry format."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotvault.ingest.dedupe import ENTRY, InflightIndex, digest, pack, unpack

WINDOW = 120.0
T0 = 1_000.0
H1 = digest("iot-2/type/t/id/d/evt/e/fmt/json", b'{"v": 1}')
H2 = digest("iot-2/type/t/id/d/evt/e/fmt/json", b'{"v": 2}')

entries_strategy = st.lists(
    st.tuples(st.integers(min_value=0, max_value=65535), st.binary(min_size=16, max_size=16))
)


@pytest.fixture
def index() -> InflightIndex:
    idx = InflightIndex(WINDOW)
    idx.remember("ingest-a", 7, H1, T0)
    return idx


# ---- the rule -----------------------------------------------------------------------
def test_dup_with_same_consumer_packet_id_and_digest_is_recognised_once(index: InflightIndex) -> None:
    assert index.check("ingest-a", 7, H1, dup=True) is True
    assert index.check("ingest-a", 7, H1, dup=True) is False
    assert len(index) == 0


def test_non_dup_with_same_packet_id_is_new_and_ends_the_entry(index: InflightIndex) -> None:
    # the sender reused the id, which it does only after our PUBACK: the old entry is done
    assert index.check("ingest-a", 7, H1, dup=False) is False
    assert len(index) == 0
    assert index.check("ingest-a", 7, H1, dup=True) is False


def test_dup_with_same_packet_id_but_other_digest_is_not_a_duplicate(index: InflightIndex) -> None:
    assert index.check("ingest-a", 7, H2, dup=True) is False
    # and that arrival with the same id ended the old entry too
    assert index.check("ingest-a", 7, H1, dup=True) is False


def test_other_packet_id_does_not_match_nor_touch_the_entry(index: InflightIndex) -> None:
    assert index.check("ingest-a", 8, H1, dup=True) is False
    assert len(index) == 1
    assert index.check("ingest-a", 7, H1, dup=True) is True


def test_entries_of_another_consumer_never_match(index: InflightIndex) -> None:
    assert index.check("ingest-b", 7, H1, dup=True) is False
    assert index.check("", 7, H1, dup=True) is False
    assert len(index) == 1  # nor do they consume ingest-a's entry
    assert index.check("ingest-a", 7, H1, dup=True) is True


def test_each_consumer_keeps_its_own_entry_for_the_same_packet_id() -> None:
    idx = InflightIndex(WINDOW)
    idx.remember("ingest-a", 1, H1, T0)
    idx.remember("ingest-b", 1, H2, T0)
    assert len(idx) == 2
    assert idx.check("ingest-a", 1, H2, dup=True) is False
    assert idx.check("ingest-b", 1, H2, dup=True) is True


def test_remembering_a_packet_id_again_replaces_the_older_entry() -> None:
    idx = InflightIndex(WINDOW)
    idx.remember("ingest-a", 1, H1, T0)
    idx.remember("ingest-a", 1, H2, T0 + 1)
    assert len(idx) == 1
    assert idx.check("ingest-a", 1, H1, dup=True) is False
    idx.remember("ingest-a", 1, H2, T0 + 2)
    assert idx.check("ingest-a", 1, H2, dup=True) is True


def test_empty_index_matches_nothing() -> None:
    idx = InflightIndex(WINDOW)
    assert idx.check("ingest-a", 7, H1, dup=True) is False
    assert len(idx) == 0


# ---- the window ---------------------------------------------------------------------
def test_entries_survive_until_the_window_ends(index: InflightIndex) -> None:
    index.expire(T0 + WINDOW - 0.001)
    assert len(index) == 1
    assert index.check("ingest-a", 7, H1, dup=True) is True


def test_entries_are_dropped_after_the_window(index: InflightIndex) -> None:
    index.expire(T0 + WINDOW + 0.001)
    assert len(index) == 0
    assert index.check("ingest-a", 7, H1, dup=True) is False


def test_expiry_drops_only_the_entries_that_are_old_enough() -> None:
    idx = InflightIndex(WINDOW)
    idx.remember("ingest-a", 1, H1, T0)
    idx.remember("ingest-b", 2, H1, T0 + 50)
    idx.remember("ingest-a", 3, H2, T0 + 100)
    idx.expire(T0 + WINDOW + 60)
    assert len(idx) == 1
    assert idx.check("ingest-a", 1, H1, dup=True) is False
    assert idx.check("ingest-b", 2, H1, dup=True) is False
    assert idx.check("ingest-a", 3, H2, dup=True) is True


def test_a_renewed_entry_is_not_dropped_by_the_older_expiry() -> None:
    idx = InflightIndex(WINDOW)
    idx.remember("ingest-a", 1, H1, T0)
    idx.remember("ingest-a", 1, H2, T0 + 100)  # the id was reused and committed again
    idx.expire(T0 + WINDOW + 1)  # past the first entry's window, inside the second's
    assert len(idx) == 1
    assert idx.check("ingest-a", 1, H2, dup=True) is True


def test_expire_after_check_is_harmless(index: InflightIndex) -> None:
    assert index.check("ingest-a", 7, H1, dup=True) is True
    index.expire(T0 + WINDOW + 1)
    assert len(index) == 0
    index.remember("ingest-a", 7, H1, T0 + WINDOW + 2)
    assert index.check("ingest-a", 7, H1, dup=True) is True


# ---- digest and the stored format ---------------------------------------------------
def test_digest_is_16_bytes_and_covers_topic_and_payload() -> None:
    base = digest("iot-2/type/t/id/d/mon", b"x")
    assert len(base) == 16
    assert base == digest("iot-2/type/t/id/d/mon", b"x")
    assert base != digest("iot-2/type/t/id/e/mon", b"x")
    assert base != digest("iot-2/type/t/id/d/mon", b"y")
    # the separator keeps the topic/payload boundary: moving bytes across it changes the digest
    assert digest("ab", b"c") != digest("a", b"bc")


@given(entries_strategy)
def test_pack_unpack_round_trip(entries: list[tuple[int, bytes]]) -> None:
    blob = pack(entries)
    assert len(blob) == ENTRY * len(entries)
    assert unpack(blob) == entries


@given(entries_strategy, st.binary(min_size=1, max_size=ENTRY - 1))
def test_unpack_ignores_a_truncated_trailing_entry(entries: list[tuple[int, bytes]], tail: bytes) -> None:
    assert unpack(pack(entries) + tail) == entries


def test_pack_layout_is_big_endian_packet_id_then_digest() -> None:
    assert pack([(0x0102, bytes(range(16)))]) == b"\x01\x02" + bytes(range(16))
    assert pack([]) == b""
    assert unpack(b"") == []


def test_restore_undoes_check_for_a_batch_that_was_not_committed() -> None:
    index = InflightIndex(window_s=120)
    h = digest("t", b"x")
    index.remember("c", 13, h, now=0.0)
    taken: list[tuple[str, int, tuple[bytes, float]]] = []
    assert index.check("c", 13, h, dup=True, taken=taken)
    assert len(index) == 0
    assert len(taken) == 1
    index.restore(taken)  # the batch failed: the redelivery, retried, is recognised again
    assert index.check("c", 13, h, dup=True)
    index.restore(taken)
    index.expire(121.0)  # a restored entry keeps its original expiry
    assert not index.check("c", 13, h, dup=True)
