"""Device status payloads: ours and Watson's words map to online/offline, anything else to None."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotvault.ingest.pipeline import parse_status


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"status": "connected"}', "online"),
        (b'{"status": "online"}', "online"),
        (b'{"status": "connect"}', "online"),
        (b'{"status": "disconnected"}', "offline"),
        (b'{"status": "offline"}', "offline"),
        (b'{"status": "disconnect"}', "offline"),
        (b'{"Action": "Connect"}', "online"),
        (b'{"Action": "Disconnect"}', "offline"),
        (
            b'{"Action": "Disconnect", "ClientAddr": "10.0.0.1", "Reason": "The connection has completed"}',
            "offline",
        ),
        (b'{"status": "connected", "extra": [1, 2, 3]}', "online"),
        (b' {"status" : "connected"}\n', "online"),
    ],
)
def test_known_words_map_to_a_status(payload: bytes, expected: str) -> None:
    assert parse_status(payload) == expected


@pytest.mark.parametrize("key", ["status", "Action"])
@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("CONNECTED", "online"),
        ("Connected", "online"),
        ("cOnNeCt", "online"),
        ("ONLINE", "online"),
        ("DISCONNECT", "offline"),
        ("Disconnected", "offline"),
        ("OffLine", "offline"),
    ],
)
def test_words_are_case_insensitive(key: str, word: str, expected: str) -> None:
    assert parse_status(json.dumps({key: word}).encode()) == expected


def test_status_takes_precedence_over_action() -> None:
    assert parse_status(b'{"status": "connected", "Action": "Disconnect"}') == "online"
    assert parse_status(b'{"Action": "Disconnect", "status": "connected"}') == "online"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"connected",
        b'"connected"',
        b"not json",
        b"{status: connected}",
        b'{"status": "connected"',
        b'["connected"]',
        b'[{"status": "connected"}]',
        b"1",
        b"3.14",
        b"true",
        b"null",
        b"{}",
        b'{"state": "connected"}',
        b'{"STATUS": "connected"}',  # the keys are exact; only the words are case-insensitive
        b'{"action": "Connect"}',
        b'{"status": "sleeping"}',
        b'{"status": ""}',
        b'{"status": " connected"}',
        b'{"status": "connected "}',
        b'{"status": 1}',
        b'{"status": true}',
        b'{"status": null}',
        b'{"status": ["connected"]}',
        b'{"status": {"state": "connected"}}',
        b'{"Action": 0}',
        b'{"Action": null}',
        b'{"status": "\xff\xfe"}',  # invalid UTF-8
        b"\xff\xfe\x00",
        b"\xc3\x28",
        b"\x00",
    ],
)
def test_garbage_is_none(payload: bytes) -> None:
    assert parse_status(payload) is None


def test_a_non_string_status_is_not_rescued_by_action() -> None:
    # the status key is present, so its (unusable) value decides
    assert parse_status(b'{"status": 1, "Action": "Connect"}') is None


@given(st.binary(max_size=64))
def test_arbitrary_bytes_give_a_status_or_none(payload: bytes) -> None:
    assert parse_status(payload) in (None, "online", "offline")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


WORDS = {
    "connected": "online",
    "online": "online",
    "connect": "online",
    "disconnected": "offline",
    "offline": "offline",
    "disconnect": "offline",
}


@given(json_values)
def test_json_documents_give_the_status_of_their_word_or_none(doc: object) -> None:
    expected = None
    if isinstance(doc, dict):
        word = doc.get("status", doc.get("Action"))
        if isinstance(word, str):
            expected = WORDS.get(word.lower())
    assert parse_status(json.dumps(doc).encode()) == expected


@given(st.sampled_from(sorted(WORDS)), st.sampled_from(["status", "Action"]))
def test_every_documented_word_is_understood(word: str, key: str) -> None:
    assert parse_status(json.dumps({key: word.upper()}).encode()) == WORDS[word]
