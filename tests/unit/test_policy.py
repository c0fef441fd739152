"""The authorization policy as a pure function: every permission, every kind of principal."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotvault.auth.policy import (
    ADMIN_PERMISSIONS,
    DEVICE_PERMISSIONS,
    Decision,
    Grant,
    Permission,
    Principal,
    authorize,
    may_grant,
    may_list_device,
    within,
)


def principal(*grants: Grant) -> Principal:
    return Principal.from_grants("user", "u", grants)


READER = principal(Grant(False, True, False, frozenset({"d1"})))
WRITER = principal(Grant(False, True, True, frozenset({"d1"})))
WRITE_ONLY = principal(Grant(False, False, True, frozenset({"d1"})))
ADMIN = principal(Grant(True, False, False, frozenset({"d1"})))
NOBODY = principal()


def test_permissions_are_sorted_and_every_one_has_a_rule() -> None:
    values = [p.value for p in Permission]
    assert values == sorted(values)
    for p in Permission:
        authorize(WRITER, p, "d1")  # raises for a permission without a rule


@pytest.mark.parametrize(
    ("who", "permission", "device", "expected"),
    [
        (READER, Permission.DEVICE_READ, "d1", Decision.ALLOW),
        (READER, Permission.DEVICE_EVENTS_READ, "d1", Decision.ALLOW),
        (READER, Permission.DEVICE_EVENTS_READ, "d2", Decision.NOT_FOUND),
        (READER, Permission.DEVICE_COMMAND, "d1", Decision.FORBIDDEN),  # may read, may not command
        (READER, Permission.DEVICE_COMMAND, "d2", Decision.NOT_FOUND),  # may not even see it
        (WRITER, Permission.DEVICE_COMMAND, "d1", Decision.ALLOW),
        (WRITE_ONLY, Permission.DEVICE_COMMAND, "d1", Decision.ALLOW),
        (WRITE_ONLY, Permission.DEVICE_READ, "d1", Decision.NOT_FOUND),
        (ADMIN, Permission.DEVICE_READ, "d1", Decision.NOT_FOUND),  # admin grants no device data
        (ADMIN, Permission.ACCOUNTS_MANAGE, None, Decision.ALLOW),
        (READER, Permission.ACCOUNTS_MANAGE, None, Decision.FORBIDDEN),
        (NOBODY, Permission.DEVICES_LIST, None, Decision.ALLOW),
        (NOBODY, Permission.SELF_READ, None, Decision.ALLOW),
    ],
)
def test_decisions(who: Principal, permission: Permission, device: str | None, expected: Decision) -> None:
    assert authorize(who, permission, device) is expected


def test_admin_permissions_need_admin_and_device_permissions_need_a_device() -> None:
    for p in ADMIN_PERMISSIONS:
        assert authorize(ADMIN, p) is Decision.ALLOW
        assert authorize(WRITER, p) is Decision.FORBIDDEN
    for p in DEVICE_PERMISSIONS:
        with pytest.raises(ValueError, match="device id"):
            authorize(WRITER, p)


ids = st.sets(st.sampled_from(["a", "b", "c", "d"]))


@given(ids, ids, ids, ids, st.booleans(), st.booleans())
def test_rights_are_the_union_over_groups(
    r1: set[str], r2: set[str], w1: set[str], w2: set[str], a1: bool, a2: bool
) -> None:
    p = principal(
        Grant(a1, True, False, frozenset(r1)),
        Grant(a2, False, True, frozenset(w1)),
        Grant(False, True, True, frozenset(r2 | w2)),
    )
    assert p.readable == frozenset(r1 | r2 | w2)
    assert p.writable == frozenset(w1 | r2 | w2)
    assert p.admin == (a1 or a2)


@given(ids, ids, st.booleans(), ids, ids, st.booleans())
def test_within_is_subset_of_rights(
    cr: set[str], cw: set[str], ca: bool, kr: set[str], kw: set[str], ka: bool
) -> None:
    ceiling = principal(Grant(ca, True, False, frozenset(cr)), Grant(False, False, True, frozenset(cw)))
    key = principal(Grant(ka, True, False, frozenset(kr)), Grant(False, False, True, frozenset(kw)))
    assert within(key, ceiling) == ((not ka or ca) and kr <= cr and kw <= cw)


def test_an_api_key_gets_no_more_than_its_creator_holds() -> None:
    def key(admin: bool, reader: bool, writer: bool, *devices: str) -> Grant:
        return Grant(admin, reader, writer, frozenset(devices))

    assert may_grant(READER, key(False, True, False, "d1"))
    assert not may_grant(READER, key(False, True, False, "d1", "d2"))  # a device it cannot read
    assert not may_grant(READER, key(False, True, True, "d1"))  # commanding what it only reads
    assert may_grant(WRITER, key(False, False, True, "d1"))
    assert not may_grant(WRITER, key(True, False, False))  # roleAdmin needs an admin creator
    assert may_grant(ADMIN, key(True, False, False))
    assert not may_grant(ADMIN, key(True, True, False, "d1"))  # admin grants no device data
    assert may_grant(NOBODY, key(False, True, True))  # roles over no device hold nothing


@given(ids, ids, st.booleans(), ids, st.booleans(), st.booleans(), st.booleans())
def test_may_grant_is_within_the_creators_rights(
    cr: set[str], cw: set[str], ca: bool, devices: set[str], admin: bool, reader: bool, writer: bool
) -> None:
    creator = principal(Grant(ca, True, False, frozenset(cr)), Grant(False, False, True, frozenset(cw)))
    expected = (not admin or ca) and (not reader or devices <= cr) and (not writer or devices <= cw)
    assert may_grant(creator, Grant(admin, reader, writer, frozenset(devices))) == expected


def test_registry_listing_is_administration_not_device_data() -> None:
    assert may_list_device(ADMIN, "d9")  # an admin lists every registered device
    assert authorize(ADMIN, Permission.DEVICE_EVENTS_READ, "d9") is Decision.NOT_FOUND
    reader = Principal.from_grants("user", "r", [Grant(False, True, False, frozenset({"d1"}))])
    assert may_list_device(reader, "d1")
    assert not may_list_device(reader, "d9")
