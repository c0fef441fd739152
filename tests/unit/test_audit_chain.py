"""The audit chain's links and its verifier, on records made in memory (pure logic)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotvault.crypto.audit_signing import CheckpointSigner, checkpoint_valid
from iotvault.domain.audit import (
    GENESIS,
    Anchor,
    AuditEntry,
    AuditRecord,
    Fields,
    canonical,
    detail_text,
    entry_hash,
    link,
    verify,
)

texts = st.text(min_size=1, max_size=20)
entries = st.builds(
    AuditEntry,
    at_us=st.integers(0, 2**62),
    actor=texts,
    action=texts,
    target=st.text(max_size=20),
    outcome=st.sampled_from(["success", "failure", "denied", "error"]),
    client=st.text(max_size=10),
    request_id=st.text(max_size=10),
    detail=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
any_entries = st.builds(  # any text (control characters, DEL, line separators, emoji), nested details
    AuditEntry,
    at_us=st.integers(0, 2**62),
    actor=texts,
    action=texts,
    target=st.text(max_size=30),
    outcome=st.sampled_from(["success", "failure", "denied", "error"]),
    client=st.text(max_size=10),
    request_id=st.text(max_size=10),
    detail=st.dictionaries(st.text(max_size=6), json_values, max_size=4),
)

# A request's record as the audit trail makes it, and its hash as of format version 1
READ = AuditEntry(
    at_us=1_767_000_000_123_456, actor="api_key:k_reader", action="http.request", target="d1",
    outcome="success", client="192.0.2.7", request_id="0123456789abcdef0123456789abcdef",
    detail={"method": "GET", "route": "/iotf/devices/{deviceId}", "status": 200, "events": 50},
)  # fmt: skip
READ_HASH = "afd86d3abac1e403248d52dbb9be30eeac79afbc726eb2ff29882e58758becef"  # at seq 7, after "ab" * 32


def fields(e: AuditEntry) -> Fields:
    return (e.at_us, e.actor, e.action, e.target, e.outcome, e.client, e.request_id)


def test_a_records_hash_covers_the_documented_canonical_json() -> None:
    """Pinned: stored logs verify only while these bytes stay what format version 1 says."""
    documented = json.dumps(
        {
            "v": 1, "seq": 7, "at": READ.at_us, "actor": READ.actor, "action": READ.action,
            "target": READ.target, "outcome": READ.outcome, "client": READ.client,
            "request_id": READ.request_id, "detail": dict(READ.detail), "prev": "ab" * 32,
        },
        sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    ).encode()  # fmt: skip
    assert canonical(7, READ, "ab" * 32) == documented
    assert hashlib.sha256(documented).hexdigest() == READ_HASH
    assert link(7, READ, "ab" * 32).hash == READ_HASH
    assert entry_hash(7, fields(READ), detail_text(READ.detail), "ab" * 32) == READ_HASH


@given(any_entries, st.integers(1, 2**62), st.text(max_size=70))
def test_the_writers_hash_is_the_verifiers(entry: AuditEntry, seq: int, prev: str) -> None:
    """The writer hashes without the document (:func:`entry_hash`); the verifier with it."""
    assert entry_hash(seq, fields(entry), detail_text(entry.detail), prev) == link(seq, entry, prev).hash


def test_the_writers_hash_takes_integer_times_only() -> None:
    with pytest.raises(ValueError, match="format code"):
        entry_hash(1, (1.5, "cli", "x", "", "success", "", ""), "{}", GENESIS)  # type: ignore[arg-type]


def chain(items: list[AuditEntry]) -> list[AuditRecord]:
    out, prev = [], GENESIS
    for seq, entry in enumerate(items, start=1):
        record = link(seq, entry, prev)
        out.append(record)
        prev = record.hash
    return out


def entry(n: int) -> AuditEntry:
    return AuditEntry(at_us=n, actor="user:alice", action="login", target="alice", outcome="success")


@given(st.lists(entries, min_size=1, max_size=12))
def test_an_untouched_chain_verifies(items: list[AuditEntry]) -> None:
    records = chain(items)
    verdict = verify(records)
    assert verdict.ok, verdict.reason
    assert verdict.checked == len(records)
    assert verdict.head == Anchor(len(records), records[-1].hash)


@given(st.lists(entries, min_size=2, max_size=8), st.data())
def test_any_edit_of_any_field_is_found_at_that_record(items: list[AuditEntry], data: st.DataObject) -> None:
    records = chain(items)
    i = data.draw(st.integers(0, len(records) - 1))
    name = data.draw(st.sampled_from(["at_us", "actor", "action", "target", "outcome", "client", "detail"]))
    old = records[i].entry
    new_value = {
        "at_us": old.at_us + 1,
        "actor": old.actor + "x",
        "action": old.action + "x",
        "target": old.target + "x",
        "outcome": "denied" if old.outcome != "denied" else "success",
        "client": old.client + "x",
        "detail": {**old.detail, "edited": True},
    }[name]
    records[i] = dataclasses.replace(records[i], entry=dataclasses.replace(old, **{name: new_value}))
    verdict = verify(records)
    assert not verdict.ok
    assert verdict.bad_seq == i + 1
    assert "altered" in verdict.reason


def test_a_deleted_record_is_found_where_the_gap_is() -> None:
    records = chain([entry(n) for n in range(6)])
    del records[3]
    verdict = verify(records)
    assert (verdict.ok, verdict.bad_seq, verdict.checked) == (False, 4, 3)
    assert "missing" in verdict.reason


def test_reordered_records_are_found() -> None:
    records = chain([entry(n) for n in range(6)])
    records[2], records[3] = records[3], records[2]
    verdict = verify(records)
    assert (verdict.ok, verdict.bad_seq) == (False, 3)


def test_a_rewritten_and_rehashed_tail_fails_against_a_signed_checkpoint() -> None:
    records = chain([entry(n) for n in range(6)])
    signed = Anchor(5, records[4].hash)
    forged = chain(
        [entry(n) for n in range(4)] + [dataclasses.replace(entry(4), outcome="failure"), entry(5)]
    )
    assert verify(forged).ok  # the chain alone cannot tell...
    verdict = verify(forged, checkpoints=[signed])  # ...the checkpoint can
    assert (verdict.ok, verdict.bad_seq) == (False, 5)


def test_a_truncated_tail_fails_against_a_checkpoint_past_its_end() -> None:
    records = chain([entry(n) for n in range(6)])
    verdict = verify(records[:4], checkpoints=[Anchor(6, records[5].hash)])
    assert not verdict.ok
    assert "truncated" in verdict.reason


def test_a_chain_can_start_after_a_pruned_prefix() -> None:
    records = chain([entry(n) for n in range(6)])
    start = Anchor(3, records[2].hash)
    assert verify(records[3:], start=start).ok
    assert not verify(records[3:]).ok  # without the anchor the prefix is simply missing


def test_outcome_is_a_closed_set() -> None:
    with pytest.raises(ValueError, match="outcome"):
        AuditEntry(at_us=1, actor="cli", action="x", target="", outcome="maybe")


def test_checkpoints_verify_only_with_their_key_and_fields() -> None:
    signer = CheckpointSigner(b"\x01" * 32)
    other = CheckpointSigner(b"\x02" * 32)
    cp = signer.sign(Anchor(7, "ab" * 32), 1234)
    assert checkpoint_valid(signer.public_key_b64(), cp)
    assert not checkpoint_valid(other.public_key_b64(), cp)
    for changed in (
        dataclasses.replace(cp, seq=8),
        dataclasses.replace(cp, hash="cd" * 32),
        dataclasses.replace(cp, at_us=1235),
        dataclasses.replace(cp, signature="AAAA"),
        dataclasses.replace(cp, signature="not base64!"),
    ):
        assert not checkpoint_valid(signer.public_key_b64(), changed)
