"""The JSON documents the admin API returns and ``iotvault … --json`` prints, and the engine set-up
the stores share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import create_engine

from iotvault.documents import NOT_JSON, UNDECRYPTABLE, api_key_doc, event_doc, group_doc, iso, to_json
from iotvault.domain.accounts import Roles
from iotvault.errors import DatabaseUnavailableError
from iotvault.storage.accounts import ApiKeyRecord, GroupRecord
from iotvault.storage.db import EngineStore
from iotvault.storage.repository import StoredEvent

# 2026-11-22T10:00:00.123456Z
AT_US = 1_795_341_600_123_456


def test_times_are_utc_with_milliseconds() -> None:
    assert iso(AT_US) == "2026-11-22T10:00:00.123Z"
    assert iso(0) == "1970-01-01T00:00:00.000Z"
    assert iso(999_999) == "1970-01-01T00:00:00.999Z"  # truncated, never rounded up a second
    assert iso(None) is None


@given(st.integers(min_value=0, max_value=4_102_444_800_000_000))  # up to the year 2100
def test_times_sort_as_the_instants_do(us: int) -> None:
    assert iso(us) <= iso(us + 1_000) <= iso(us + 1_000_000)  # type: ignore[operator]


def test_groups_and_api_keys_name_their_roles_alike() -> None:
    roles = Roles(admin=False, reader=True, writer=True)
    group = group_doc(GroupRecord("ops", "Operators", roles, ("d1",), ("alice",)))
    key = api_key_doc(ApiKeyRecord("k-1", "export", roles, ("d1",), ("ops",), None, None, None, "cli", AT_US))
    wanted = {"roleAdmin": False, "roleReader": True, "roleWriter": True}
    assert {k: group[k] for k in wanted} == wanted == {k: key[k] for k in wanted}
    assert list(group)[2:5] == list(wanted)  # in the seed's order, after the names
    assert key["created"] == "2026-11-22T10:00:00.123Z"
    assert key["expires"] is key["lastUsed"] is key["revoked"] is None
    assert "password" not in key


def test_a_store_names_an_unreachable_database_without_its_password(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/no/such/dir/x.db")  # sqlite cannot open it
    store = EngineStore(engine, "postgresql://iotvault:s3cret@db.example/iotvault")
    for connection in (store.connect, store.begin):
        with pytest.raises(DatabaseUnavailableError) as caught, connection() as conn:
            conn.exec_driver_sql("SELECT 1")
        assert caught.value.url == "postgresql://iotvault:***@db.example/iotvault"
    engine.dispose()


class _Ring:
    """A key ring stand-in: 'decrypts' by returning what it was given, or refuses."""

    def __init__(self, plain: dict[str, bytes]) -> None:
        self.plain = plain

    def decrypt(self, device_id: str, event_id: str, record: bytes) -> bytes:
        from iotvault.errors import RecordDecryptionError  # noqa: PLC0415

        if event_id not in self.plain:
            raise RecordDecryptionError(device_id, event_id, "tampered")
        return self.plain[event_id]


def _event(event_id: str) -> StoredEvent:
    return StoredEvent("kitchen-1", event_id, "thermo", "reading", "json", AT_US, b"sealed")


def test_one_event_document_for_the_api_and_the_command_line() -> None:
    ring = _Ring({"e1": b'{"t": 21.5}', "e2": b"not json"})
    good, not_json, sealed = (event_doc(ring, _event(i)) for i in ("e1", "e2", "e3"))
    assert json.loads(to_json(good)) == {
        "eventId": "e1",
        "deviceId": "kitchen-1",
        "typeId": "thermo",
        "eventType": "reading",
        "format": "json",
        "timestamp": "2026-11-22T10:00:00.123Z",
        "payload": {"t": 21.5},
        "error": None,
    }
    # what cannot be shown is null with a reason beside it, never inside the payload
    assert (not_json["payload"], not_json["error"]) == (None, NOT_JSON)
    assert (sealed["payload"], sealed["error"]) == (None, UNDECRYPTABLE)
    assert b"sealed" not in to_json([good, not_json, sealed])


def test_events_in_other_formats_are_text_or_base64_and_json_ones_are_unchanged() -> None:
    ring = _Ring({"t": "21,5 °C".encode(), "x": b"<a/>", "b": b"\x00\xff", "u": b"\xff", "j": b"[1]"})

    def doc(event_id: str, fmt: str) -> dict[str, object]:
        return event_doc(ring, StoredEvent("k-1", event_id, "thermo", "r", fmt, AT_US, b"sealed"))

    assert (doc("t", "text")["payload"], doc("t", "text")["payloadEncoding"]) == ("21,5 °C", "text")
    assert (doc("x", "xml")["payload"], doc("x", "xml")["payloadEncoding"]) == ("<a/>", "text")
    # bytes are base64 in a binary format even when they happen to be UTF-8, and in a text
    # format when they are not UTF-8
    assert (doc("x", "bin")["payload"], doc("x", "bin")["payloadEncoding"]) == ("PGEvPg==", "base64")
    assert (doc("b", "bin")["payload"], doc("b", "bin")["payloadEncoding"]) == ("AP8=", "base64")
    assert (doc("u", "text")["payload"], doc("u", "text")["payloadEncoding"]) == ("/w==", "base64")
    assert json.loads(to_json(doc("j", "json")))["payload"] == [1]
    assert "payloadEncoding" not in doc("j", "json")  # a json event's document as it was
    sealed = doc("gone", "text")
    assert (sealed["payload"], sealed["payloadEncoding"], sealed["error"]) == (None, None, UNDECRYPTABLE)
    assert json.loads(to_json(doc("t", "text")))["payload"] == "21,5 °C"


def test_a_page_shows_a_non_json_payload_as_one_bounded_field() -> None:
    from iotvault.web.flatten import ELLIPSIS, MAX_TEXT, opaque_fields  # noqa: PLC0415

    assert opaque_fields("text", "hello", "text") == {"text": "hello"}
    assert opaque_fields("bin", "AP8=", "base64") == {"bin (base64)": "AP8="}
    long = opaque_fields("bin", "A" * (MAX_TEXT * 10), "base64")["bin (base64)"]
    assert len(long) == MAX_TEXT + 1
    assert long.endswith(ELLIPSIS)
