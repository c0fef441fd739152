"""The audit log's rows as the writer builds them (iotvault.storage.audit), against the way
they were built before the writer was made cheaper (issue 17): the same columns, byte for byte,
and a hash the verifier accepts."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from iotvault.domain.audit import GENESIS, AuditEntry, link
from iotvault.storage.audit import _chained, _columns

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.tuples(inner) | st.dictionaries(st.text(max_size=4), inner)
    ),
    max_leaves=8,
)
details = st.one_of(
    st.dictionaries(st.text(max_size=6), st.none() | st.booleans() | st.integers() | st.floats() | st.text()),
    st.dictionaries(st.text(max_size=6), json_values, max_size=4),
    st.dictionaries(st.integers(), st.text(max_size=4), max_size=3),  # keys that JSON turns into text
)
entries = st.builds(
    AuditEntry,
    at_us=st.integers(0, 2**62),
    actor=st.text(min_size=1, max_size=170),  # over each column's width, with NUL and DEL at times
    action=st.text(min_size=1, max_size=70),
    target=st.text(max_size=210),
    outcome=st.sampled_from(["success", "failure", "denied", "error"]),
    client=st.text(max_size=70),
    request_id=st.text(max_size=70),
    detail=details,
)


def _column(value: str, width: int) -> str:
    return value[:width].replace("\x00", "\ufffd")


def reference_row(seq: int, entry: AuditEntry, prev: str) -> tuple[Any, ...]:
    """The row as the writer built it before: a clipped entry, linked, its detail dumped again."""
    d = dict(entry.detail)
    plain = all(type(k) is str and type(v) in {str, int, float, bool, type(None)} for k, v in d.items())
    stored = d if plain else json.loads(json.dumps(d, sort_keys=True))
    clipped = AuditEntry(
        at_us=entry.at_us, actor=_column(entry.actor, 160), action=_column(entry.action, 64),
        target=_column(entry.target, 200), outcome=_column(entry.outcome, 16),
        client=_column(entry.client, 64), request_id=_column(entry.request_id, 64), detail=stored,
    )  # fmt: skip
    record = link(seq, clipped, prev)
    e = record.entry
    detail = json.dumps(dict(e.detail), sort_keys=True, separators=(",", ":"))
    return (seq, e.at_us, e.actor, e.action, e.target, e.outcome, e.client, e.request_id, detail,
            record.prev_hash, record.hash)  # fmt: skip


@given(st.lists(entries, min_size=1, max_size=4), st.integers(0, 2**40))
@example(  # every text over its column's width
    [AuditEntry(1, "a" * 161, "b" * 65, "c" * 201, "success", "d" * 65, "e" * 65, {"f": "g" * 300})], 0
)
def test_rows_are_what_they_were_byte_for_byte(batch: list[AuditEntry], seq: int) -> None:
    rows = _chained([_columns(e) for e in batch], seq, GENESIS)
    prev, expected = GENESIS, []
    for i, entry in enumerate(batch, start=seq + 1):
        expected.append(reference_row(i, entry, prev))
        prev = expected[-1][-1]
    assert rows == expected


def test_a_printable_ascii_detail_is_encoded_once_and_any_other_twice() -> None:
    """The detail's hashed text serves as its column text only where the two are the same."""
    for detail, column in [
        (
            {"events": 50, "route": "/iotf/devices/{deviceId}"},
            '{"events":50,"route":"/iotf/devices/{deviceId}"}',
        ),
        ({"name": "café"}, '{"name":"caf\\u00e9"}'),
        ({"del": "\x7f"}, '{"del":"\\u007f"}'),
        ({"nul": "a\x00b\n"}, '{"nul":"a\\u0000b\\n"}'),
    ]:
        _, stored, hashed = _columns(AuditEntry(1, "cli", "x", "", "success", detail=detail))
        assert stored == column
        assert hashed == json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def test_a_time_that_is_an_int_of_another_type_is_stored_and_hashed_as_the_int_it_reads_back_as() -> None:
    """``True`` or an ``IntEnum`` would be hashed as JSON writes it (``true``) but read back from
    the integer column as 1: the writer stores and hashes ``int(at_us)``, so the record verifies."""
    (row,) = _chained([_columns(AuditEntry(True, "cli", "x", "", "success"))], 0, GENESIS)  # type: ignore[arg-type]
    assert type(row[1]) is int
    assert row == reference_row(1, AuditEntry(1, "cli", "x", "", "success"), GENESIS)
