"""Account value objects: names, free text, attributes, roles, group grants, seed flags."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotvault.domain.accounts import (
    NAME_PATTERN,
    NO_ROLES,
    GroupGrant,
    GroupName,
    Roles,
    UserName,
    check_attributes,
    check_device_ids,
    check_display_name,
    check_group_names,
    check_name,
    check_password,
    is_api_key_id,
    is_valid_name,
    parse_flag,
)
from iotvault.errors import ValidationError

NAME_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._@-")


def oracle(value: str) -> bool:
    return 1 <= len(value) <= 64 and all(c in NAME_ALPHABET for c in value)


@given(st.from_regex(NAME_PATTERN, fullmatch=True))
def test_valid_names_are_accepted_unchanged(value: str) -> None:
    assert check_name("userName", value) == value
    assert str(UserName(value)) == value
    assert str(GroupName(value)) == value
    assert is_valid_name(value)


@given(st.text(max_size=80))
def test_names_match_the_contract_exactly(value: str) -> None:
    assert is_valid_name(value) == oracle(value)
    if not oracle(value):
        with pytest.raises(ValidationError) as info:
            UserName(value)
        assert info.value.field == "userName"


@pytest.mark.parametrize(
    "bad", ["", "a" * 65, "a b", "a/b", "a\x00", "ä", "a+b", "#", "a\n", "\uff41", 7, None, b"bytes"]
)
def test_bad_names_are_refused(bad: object) -> None:
    with pytest.raises(ValidationError):
        check_name("groupName", bad)
    assert not is_valid_name(bad)


def test_emails_are_names() -> None:
    assert check_name("userName", "alice.smith@example.com") == "alice.smith@example.com"


def test_display_names_allow_unicode_but_no_control_characters() -> None:
    assert check_display_name("Zoë Ñoño 李") == "Zoë Ñoño 李"
    assert check_display_name("") == ""
    for bad in ("a\nb", "a\x00", "a\x1b[31m", "a\u2028b", "a\x85", "x" * 129):
        with pytest.raises(ValidationError):
            check_display_name(bad)
    with pytest.raises(ValidationError):
        check_display_name(42)


def test_attributes_are_a_small_object_of_strings() -> None:
    attrs = {"Language": "en", "Country": "NZ", "emailAddress": "a@example.com"}
    assert check_attributes(attrs) == attrs
    assert check_attributes({}) == {}
    with pytest.raises(ValidationError, match="at most 32"):
        check_attributes({f"k{i}": "v" for i in range(33)})
    assert len(check_attributes({f"k{i}": "v" for i in range(32)})) == 32
    with pytest.raises(ValidationError, match="at most 256"):
        check_attributes({"k": "v" * 257})
    assert check_attributes({"k": "v" * 256}) == {"k": "v" * 256}
    for bad in (
        [("a", "b")],
        "text",
        None,
        {"k": 1},
        {"k": None},
        {"k": ["x"]},
        {"k": {"nested": "x"}},
        {"": "empty key"},
        {1: "int key"},
        {"k": "line\nbreak"},
        {"k\x00": "v"},
        {"k" * 65: "v"},
    ):
        with pytest.raises(ValidationError):
            check_attributes(bad)


def test_passwords_have_bounds() -> None:
    assert check_password("x" * 12) == "x" * 12
    with pytest.raises(ValidationError):
        check_password("x" * 11)
    with pytest.raises(ValidationError):
        check_password("x" * 1025)
    with pytest.raises(ValidationError):
        check_password(None)
    with pytest.raises(ValidationError, match="Unicode"):
        check_password("long enough \ud800 password")
    with pytest.raises(ValidationError, match="Unicode"):
        check_display_name("lone \udfff")


def test_device_and_group_lists_are_validated_deduplicated_sorted() -> None:
    assert check_device_ids(["b", "a", "b"]) == ("a", "b")
    assert check_group_names(["x@y", "a"]) == ("a", "x@y")
    for bad in ("dev-1", ["dev/1"], ["+"], [1], [None]):
        with pytest.raises(ValidationError):
            check_device_ids(bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        check_group_names("admins")


def test_roles() -> None:
    assert not NO_ROLES
    assert Roles(reader=True)
    assert Roles(admin=True) | Roles(writer=True) == Roles(admin=True, writer=True)
    assert Roles(reader=True).within(Roles(reader=True, writer=True))
    assert not Roles(admin=True).within(Roles(reader=True, writer=True))
    assert Roles(True, True, True).names() == ("roleAdmin", "roleReader", "roleWriter")
    # a change names only what changes; None leaves a role as it is
    assert Roles(reader=True).changed(writer=True) == Roles(reader=True, writer=True)
    assert Roles(True, True, True).changed(admin=False, writer=None) == Roles(reader=True, writer=True)
    assert Roles(admin=True).changed() == Roles(admin=True)
    with pytest.raises(ValidationError):
        Roles(admin="true")  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        Roles().admin = True  # type: ignore[misc]


def test_group_grant_gives_data_roles_on_its_devices_only() -> None:
    grant = GroupGrant("ops", Roles(admin=True, reader=True), frozenset({"d1", "d2"}))
    assert grant.covers("d1")
    assert not grant.covers("d3")
    assert grant.device_roles("d1") == Roles(reader=True)  # admin grants no device data
    assert grant.device_roles("d3") == NO_ROLES
    with pytest.raises(ValidationError):
        GroupGrant("bad name", NO_ROLES)
    with pytest.raises(ValidationError):
        GroupGrant("ok", NO_ROLES, frozenset({"bad/device"}))


def test_seed_flags() -> None:
    assert parse_flag("roleAdmin", True) is True
    assert parse_flag("roleAdmin", "true") is True
    assert parse_flag("roleAdmin", "False") is False
    assert parse_flag("roleAdmin", " false ") is False
    for bad in ("yes", 1, 0, None, "", "1"):
        with pytest.raises(ValidationError):
            parse_flag("roleAdmin", bad)


def test_api_key_ids() -> None:
    assert is_api_key_id("k-" + "A" * 20)
    assert is_api_key_id("k-abc_DEF-0123456789xy")
    for bad in ("k-" + "A" * 19, "k-" + "A" * 21, "x-" + "A" * 20, "k-" + "A" * 19 + "\x00", None, ""):
        assert not is_api_key_id(bad)
