"""The master key file, its fingerprint, and wrapping of data keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotvault.crypto import MasterKey, generate_data_key
from iotvault.domain.ids import IDENTIFIER_PATTERN
from iotvault.errors import KeyUnwrapError, MasterKeyError

RAW = bytes(range(32))
MASTER = MasterKey.from_bytes(RAW)


def write_key_file(path: Path, content: bytes, mode: int = 0o600) -> None:
    path.write_bytes(content)
    path.chmod(mode)


def valid_line(key: bytes = RAW) -> bytes:
    return b"iotvault-master-key-v1:" + base64.urlsafe_b64encode(key) + b"\n"


# ---- the file ------------------------------------------------------------------------------


def test_created_file_is_private_and_well_formed(tmp_path: Path) -> None:
    path = tmp_path / "new" / "deeper" / "master.key"
    key = MasterKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert text.startswith("iotvault-master-key-v1:")
    assert text.endswith("\n")
    assert text.count("\n") == 1
    raw = base64.urlsafe_b64decode(text.removeprefix("iotvault-master-key-v1:").strip())
    assert MasterKey.from_bytes(raw).fingerprint == key.fingerprint
    assert sorted(p.name for p in path.parent.iterdir()) == ["master.key"]


def test_reload_gives_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    created = MasterKey.load_or_create(path)
    before = path.read_bytes()
    reloaded = MasterKey.load_or_create(path)
    assert reloaded.fingerprint == created.fingerprint
    assert MasterKey.load_or_create(path, create=False).fingerprint == created.fingerprint
    assert path.read_bytes() == before
    wrapped = created.wrap_data_key("d", 1, RAW)
    assert reloaded.unwrap_data_key("d", 1, wrapped) == RAW


def test_two_new_installations_get_different_keys(tmp_path: Path) -> None:
    first = MasterKey.load_or_create(tmp_path / "a.key")
    second = MasterKey.load_or_create(tmp_path / "b.key")
    assert first.fingerprint != second.fingerprint


def test_existing_file_is_loaded_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    write_key_file(path, valid_line())
    assert MasterKey.load_or_create(path).fingerprint == MASTER.fingerprint
    assert path.read_bytes() == valid_line()


def test_losing_the_creation_race_loads_the_winners_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "master.key"
    real_link = os.link

    def link_after_another_process(src: Path, dst: Path) -> None:
        # Another process finishes creating the key between our read and our link.
        write_key_file(Path(dst), valid_line())
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_another_process)
    key = MasterKey.load_or_create(path)
    assert key.fingerprint == MASTER.fingerprint
    assert path.read_bytes() == valid_line()
    assert [p.name for p in tmp_path.iterdir()] == ["master.key"]


def test_missing_file_without_create_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    with pytest.raises(MasterKeyError, match="does not exist") as info:
        MasterKey.load_or_create(path, create=False)
    assert info.value.path == str(path)
    assert not path.exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o660, 0o644, 0o700 | 0o077])
def test_file_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "master.key"
    write_key_file(path, valid_line(), mode)
    with pytest.raises(MasterKeyError, match=f"chmod 600 {path}") as info:
        MasterKey.load_or_create(path)
    assert f"{mode:04o}" in info.value.reason
    assert stat.S_IMODE(path.stat().st_mode) == mode, "the file must not be silently repaired"


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "master.key"
    write_key_file(path, valid_line(), mode)
    assert MasterKey.load_or_create(path).fingerprint == MASTER.fingerprint


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\n", id="blank"),
        pytest.param(b"iotvault-master-key-v2:" + base64.urlsafe_b64encode(RAW) + b"\n", id="other-version"),
        pytest.param(base64.urlsafe_b64encode(RAW) + b"\n", id="no-prefix"),
        pytest.param(b"iotvault-master-key-v1:not base64!\n", id="not-base64"),
        pytest.param(
            b"iotvault-master-key-v1:" + base64.urlsafe_b64encode(RAW).replace(b"A", b"*") + b"\n",
            id="stray-characters",
        ),
        pytest.param(
            b"iotvault-master-key-v1:" + base64.urlsafe_b64encode(RAW).rstrip(b"=") + b"\n", id="no-padding"
        ),
        pytest.param(valid_line() + valid_line(), id="two-lines"),
        pytest.param(b"\xff\xfe" + valid_line(), id="not-ascii"),
        pytest.param(valid_line() + b"#" * 2000, id="too-large"),
    ],
)
def test_malformed_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "master.key"
    write_key_file(path, content)
    with pytest.raises(MasterKeyError, match="is not an iotvault master key file"):
        MasterKey.load_or_create(path)
    assert path.read_bytes() == content, "a malformed key file must never be overwritten"


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_wrong_key_length_is_refused(tmp_path: Path, length: int) -> None:
    path = tmp_path / "master.key"
    write_key_file(path, valid_line(bytes(length)))
    with pytest.raises(MasterKeyError, match=f"holds a {length}-byte key"):
        MasterKey.load_or_create(path)


def test_surrounding_whitespace_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    write_key_file(path, b"  " + valid_line().rstrip(b"\n") + b"\r\n")
    assert MasterKey.load_or_create(path).fingerprint == MASTER.fingerprint


def test_directory_in_place_of_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.mkdir(mode=0o700)
    with pytest.raises(MasterKeyError):
        MasterKey.load_or_create(path)


def test_fifo_in_place_of_the_file_is_refused_without_hanging(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    os.mkfifo(path, 0o600)
    with pytest.raises(MasterKeyError, match="not a regular file"):
        MasterKey.load_or_create(path)


def test_parent_that_is_a_file_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(MasterKeyError, match="cannot be"):
        MasterKey.load_or_create(blocker / "master.key")


# ---- the key object ------------------------------------------------------------------------


def test_fingerprint_is_the_documented_hmac() -> None:
    expected = hmac.new(RAW, b"iotvault/master-key-fingerprint/v1", hashlib.sha256).hexdigest()[:32]
    assert MASTER.fingerprint == expected
    assert len(MASTER.fingerprint) == 32
    assert RAW.hex() not in MASTER.fingerprint


def test_repr_hides_the_key_material() -> None:
    key = MasterKey.from_bytes(RAW)
    for text in (repr(key), str(key), f"{key!r}"):
        assert RAW.hex() not in text
        assert base64.urlsafe_b64encode(RAW).decode() not in text
        assert repr(RAW) not in text
        assert key.fingerprint in text
    assert not hasattr(key, "__dict__")


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_from_bytes_requires_32_bytes(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        MasterKey.from_bytes(bytes(length))


def test_generate_data_key_is_random_32_bytes() -> None:
    keys = {generate_data_key() for _ in range(8)}
    assert len(keys) == 8
    assert all(len(k) == 32 for k in keys)


# ---- wrapping ------------------------------------------------------------------------------

device_ids = st.from_regex(IDENTIFIER_PATTERN, fullmatch=True)
versions = st.integers(min_value=0, max_value=2**32 - 1)
data_keys = st.binary(min_size=32, max_size=32)


@given(device_ids, versions, data_keys)
def test_wrap_round_trip(device_id: str, version: int, data_key: bytes) -> None:
    wrapped = MASTER.wrap_data_key(device_id, version, data_key)
    assert len(wrapped) == 1 + 12 + 32 + 16
    assert wrapped[0] == 0x01
    assert data_key not in wrapped
    assert MASTER.unwrap_data_key(device_id, version, wrapped) == data_key


def test_wrapping_twice_uses_fresh_nonces() -> None:
    assert MASTER.wrap_data_key("d", 1, RAW) != MASTER.wrap_data_key("d", 1, RAW)


def test_wrong_master_key_fails() -> None:
    wrapped = MASTER.wrap_data_key("d", 1, RAW)
    other = MasterKey.from_bytes(generate_data_key())
    with pytest.raises(KeyUnwrapError) as info:
        other.unwrap_data_key("d", 1, wrapped)
    assert (info.value.device_id, info.value.version) == ("d", 1)


@given(device_ids, device_ids)
def test_wrapped_key_moved_to_another_device_fails(device_id: str, other_device: str) -> None:
    if other_device == device_id:
        other_device += "x"
    wrapped = MASTER.wrap_data_key(device_id, 1, RAW)
    with pytest.raises(KeyUnwrapError):
        MASTER.unwrap_data_key(other_device, 1, wrapped)


@given(versions, versions)
def test_wrapped_key_moved_to_another_version_fails(version: int, other_version: int) -> None:
    if other_version == version:
        other_version = (version + 1) % 2**32
    wrapped = MASTER.wrap_data_key("d", version, RAW)
    with pytest.raises(KeyUnwrapError):
        MASTER.unwrap_data_key("d", other_version, wrapped)


@given(st.data())
def test_any_bit_flip_in_a_wrapped_key_fails(data: st.DataObject) -> None:
    wrapped = bytearray(MASTER.wrap_data_key("d", 3, RAW))
    bit = data.draw(st.integers(min_value=0, max_value=len(wrapped) * 8 - 1), label="bit")
    wrapped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(KeyUnwrapError):
        MASTER.unwrap_data_key("d", 3, bytes(wrapped))


@given(st.data())
def test_truncated_or_extended_wrapped_key_fails(data: st.DataObject) -> None:
    wrapped = MASTER.wrap_data_key("d", 3, RAW)
    cut = data.draw(st.integers(min_value=0, max_value=len(wrapped) - 1), label="cut")
    with pytest.raises(KeyUnwrapError):
        MASTER.unwrap_data_key("d", 3, wrapped[:cut])
    with pytest.raises(KeyUnwrapError):
        MASTER.unwrap_data_key("d", 3, wrapped + b"\x00")


@pytest.mark.parametrize("version", [-1, 2**32])
def test_unwrap_with_impossible_version_is_an_unwrap_error(version: int) -> None:
    wrapped = MASTER.wrap_data_key("d", 1, RAW)
    with pytest.raises(KeyUnwrapError):
        MASTER.unwrap_data_key("d", version, wrapped)


@pytest.mark.parametrize("length", [16, 31, 33])
def test_only_32_byte_data_keys_are_wrapped(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        MASTER.wrap_data_key("d", 1, bytes(length))
