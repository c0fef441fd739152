"""The event record format: round trips, and every way of tampering with or moving a record."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from iotvault.crypto import FORMAT_V1, HEADER_LEN, decrypt_event, encrypt_event, record_key_version
from iotvault.crypto.cipher import MAX_KEY_VERSION, MIN_RECORD_LEN
from iotvault.domain.ids import IDENTIFIER_PATTERN
from iotvault.errors import DataKeyNotFoundError, RecordDecryptionError

KEY = bytes(range(32))
AEAD = AESGCM(KEY)
OTHER_AEAD = AESGCM(bytes(range(1, 33)))

device_ids = st.from_regex(IDENTIFIER_PATTERN, fullmatch=True)
# Event ids are opaque to the cipher: any text without the NUL separator.
event_ids = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=64)
versions = st.integers(min_value=0, max_value=MAX_KEY_VERSION)
payloads = st.binary(max_size=512)


def any_version(_version: int) -> AESGCM:
    """A lookup that hands out the right key for every version.

    Tests use it so that a relabelled key version reaches the tag check: it proves the
    associated data pins the version, not merely that the other version's key differs.
    """
    return AEAD


def seal(device_id: str, event_id: str, version: int, payload: bytes) -> bytes:
    return encrypt_event(AEAD, device_id=device_id, event_id=event_id, key_version=version, plaintext=payload)


@given(device_ids, event_ids, versions, payloads)
def test_round_trip(device_id: str, event_id: str, version: int, payload: bytes) -> None:
    record = seal(device_id, event_id, version, payload)
    seen: list[int] = []

    def lookup(v: int) -> AESGCM:
        seen.append(v)
        return AEAD

    assert decrypt_event(lookup, device_id=device_id, event_id=event_id, record=record) == payload
    assert seen == [version]
    assert record_key_version(record) == version


@given(device_ids, event_ids, versions, payloads)
def test_record_layout_is_the_documented_one(
    device_id: str, event_id: str, version: int, payload: bytes
) -> None:
    record = seal(device_id, event_id, version, payload)
    assert len(record) == HEADER_LEN + len(payload) + 16
    assert record[0] == FORMAT_V1
    assert record[1:5] == version.to_bytes(4, "big")
    aad = (
        b"iotvault/event/v1\x00"
        + device_id.encode()
        + b"\x00"
        + event_id.encode()
        + b"\x00"
        + version.to_bytes(4, "big")
    )
    assert AEAD.decrypt(record[5:17], record[17:], aad) == payload


def test_same_payload_seals_differently_each_time() -> None:
    first = seal("d", "e", 1, b"same")
    second = seal("d", "e", 1, b"same")
    assert first[5:17] != second[5:17]
    assert first != second


@given(device_ids, event_ids, versions, payloads, st.data())
def test_any_single_bit_flip_is_detected(
    device_id: str, event_id: str, version: int, payload: bytes, data: st.DataObject
) -> None:
    record = bytearray(seal(device_id, event_id, version, payload))
    bit = data.draw(st.integers(min_value=0, max_value=len(record) * 8 - 1), label="bit")
    record[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(RecordDecryptionError) as info:
        decrypt_event(any_version, device_id=device_id, event_id=event_id, record=bytes(record))
    assert info.value.device_id == device_id
    assert info.value.event_id == event_id


@given(device_ids, device_ids, event_ids, payloads)
def test_record_moved_to_another_device_fails(
    device_id: str, other_device: str, event_id: str, payload: bytes
) -> None:
    record = seal(device_id, event_id, 1, payload)
    if other_device == device_id:
        other_device += "x"
    with pytest.raises(RecordDecryptionError):
        decrypt_event(any_version, device_id=other_device, event_id=event_id, record=record)


@given(device_ids, event_ids, event_ids, payloads)
def test_record_moved_to_another_event_fails(
    device_id: str, event_id: str, other_event: str, payload: bytes
) -> None:
    record = seal(device_id, event_id, 1, payload)
    if other_event == event_id:
        other_event += "x"
    with pytest.raises(RecordDecryptionError):
        decrypt_event(any_version, device_id=device_id, event_id=other_event, record=record)


def test_ids_cannot_trade_characters_across_the_separator() -> None:
    record = seal("ab", "c", 1, b"x")
    with pytest.raises(RecordDecryptionError):
        decrypt_event(any_version, device_id="a", event_id="bc", record=record)


@given(device_ids, event_ids, versions, versions, payloads)
def test_relabelled_key_version_fails(
    device_id: str, event_id: str, version: int, other_version: int, payload: bytes
) -> None:
    if other_version == version:
        other_version = (version + 1) % (MAX_KEY_VERSION + 1)
    record = seal(device_id, event_id, version, payload)
    relabelled = record[:1] + other_version.to_bytes(4, "big") + record[5:]
    assert record_key_version(relabelled) == other_version
    with pytest.raises(RecordDecryptionError):
        decrypt_event(any_version, device_id=device_id, event_id=event_id, record=relabelled)


def test_relabelled_version_with_a_real_key_ring_fails() -> None:
    ring = {1: AEAD, 2: OTHER_AEAD}
    record = encrypt_event(OTHER_AEAD, device_id="d", event_id="e", key_version=2, plaintext=b"p")
    relabelled = record[:1] + (1).to_bytes(4, "big") + record[5:]
    assert decrypt_event(ring.__getitem__, device_id="d", event_id="e", record=record) == b"p"
    with pytest.raises(RecordDecryptionError):
        decrypt_event(ring.__getitem__, device_id="d", event_id="e", record=relabelled)


def test_wrong_key_fails() -> None:
    record = seal("d", "e", 1, b"payload")
    with pytest.raises(RecordDecryptionError, match="authentication failed"):
        decrypt_event(lambda _v: OTHER_AEAD, device_id="d", event_id="e", record=record)


@given(device_ids, event_ids, payloads, st.data())
def test_truncated_record_fails(device_id: str, event_id: str, payload: bytes, data: st.DataObject) -> None:
    record = seal(device_id, event_id, 1, payload)
    cut = data.draw(st.integers(min_value=0, max_value=len(record) - 1), label="cut")
    with pytest.raises(RecordDecryptionError):
        decrypt_event(any_version, device_id=device_id, event_id=event_id, record=record[:cut])


@given(payloads, st.binary(min_size=1, max_size=32))
def test_extended_record_fails(payload: bytes, tail: bytes) -> None:
    record = seal("d", "e", 1, payload)
    with pytest.raises(RecordDecryptionError):
        decrypt_event(any_version, device_id="d", event_id="e", record=record + tail)


@given(st.binary(max_size=MIN_RECORD_LEN - 1))
def test_short_garbage_is_reported_as_truncated(record: bytes) -> None:
    with pytest.raises(RecordDecryptionError, match="truncated") as info:
        decrypt_event(any_version, device_id="d", event_id="e", record=record)
    assert info.value.reason.startswith("truncated")
    with pytest.raises(RecordDecryptionError, match="truncated"):
        record_key_version(record, device_id="d", event_id="e")


@pytest.mark.parametrize("fmt", [0x00, 0x02, 0xFF])
def test_unknown_format_is_refused_before_any_key_lookup(fmt: int) -> None:
    record = bytes([fmt]) + seal("d", "e", 1, b"payload")[1:]

    def lookup(_version: int) -> AESGCM:
        raise AssertionError("no key may be looked up for an unknown format")

    with pytest.raises(RecordDecryptionError, match=f"unknown record format 0x{fmt:02x}"):
        decrypt_event(lookup, device_id="d", event_id="e", record=record)
    with pytest.raises(RecordDecryptionError, match="unknown record format"):
        record_key_version(record, device_id="d", event_id="e")


def test_missing_data_key_propagates_unchanged() -> None:
    record = seal("d", "e", 7, b"payload")

    def lookup(version: int) -> AESGCM:
        raise DataKeyNotFoundError("d", version)

    with pytest.raises(DataKeyNotFoundError) as info:
        decrypt_event(lookup, device_id="d", event_id="e", record=record)
    assert info.value.version == 7


def test_id_without_utf8_form_is_a_decryption_error() -> None:
    record = seal("d", "e", 1, b"payload")
    with pytest.raises(RecordDecryptionError, match="UTF-8"):
        decrypt_event(any_version, device_id="d", event_id="\udcff", record=record)


@pytest.mark.parametrize("version", [-1, MAX_KEY_VERSION + 1])
def test_key_version_out_of_range_is_refused(version: int) -> None:
    with pytest.raises(ValueError, match="key_version"):
        seal("d", "e", version, b"payload")


@pytest.mark.parametrize(("device_id", "event_id"), [("a\x00b", "c"), ("a", "b\x00c")])
def test_nul_in_ids_is_refused(device_id: str, event_id: str) -> None:
    with pytest.raises(ValueError, match="NUL"):
        seal(device_id, event_id, 1, b"payload")
