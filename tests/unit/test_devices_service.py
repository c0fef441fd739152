"""The device services with small fakes: what they ask of each resource, and the injected clock."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from iotvault.crypto.tokens import hash_secret
from iotvault.devices import check_device_credential, delete_device, register_device, rotate_device_credential
from iotvault.errors import BrokerError, DeviceNotFoundError
from iotvault.storage.repository import DeviceCredentials, DeviceRecord


@dataclass
class FakeRegistry:
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    credentials: dict[str, tuple[str, int | None]] = field(default_factory=dict)

    def add_device(self, device: DeviceRecord, *, wrapped_key: bytes, credential_hash: str | None) -> None:
        self.devices[device.device_id] = device

    def get_device(self, device_id: str) -> DeviceRecord | None:
        return self.devices.get(device_id)

    def delete_device(self, device_id: str) -> bool:
        return self.devices.pop(device_id, None) is not None

    def set_credential(
        self, device_id: str, credential_hash: str, *, previous_valid_until_us: int | None
    ) -> None:
        self.credentials[device_id] = (credential_hash, previous_valid_until_us)

    def revoke_credentials(self, device_id: str) -> None:
        self.credentials.pop(device_id, None)

    def type_command_delivery(self, type_id: str) -> str | None:
        return None


@dataclass
class FakeKeys:
    forgotten: list[str] = field(default_factory=list)

    def new_device_key(self, device_id: str, version: int = 1) -> bytes:
        return b"wrapped"

    def forget(self, device_id: str) -> None:
        self.forgotten.append(device_id)


@dataclass
class FakeGrants:
    forgotten: list[str] = field(default_factory=list)

    def forget_device(self, device_id: str) -> None:
        self.forgotten.append(device_id)


class RefusingBroker:
    def device_registered(self, device_id: str, type_id: str, credential: str) -> None:
        raise BrokerError("refused")

    def credential_rotated(self, device_id: str, type_id: str, credential: str) -> None: ...
    def credential_revoked(self, device_id: str) -> None: ...
    def device_deleted(self, device_id: str) -> None: ...


@dataclass
class Resources:
    store: FakeRegistry = field(default_factory=FakeRegistry)
    keyring: FakeKeys = field(default_factory=FakeKeys)
    accounts: FakeGrants = field(default_factory=FakeGrants)
    device_accounts: Any = None


def test_register_stamps_the_injected_clock_and_returns_the_credential_once() -> None:
    res = Resources()
    new = register_device(res, "thermo", "kitchen-1", {"room": "k"}, clock=lambda: 1234)
    assert res.store.devices["kitchen-1"].created_us == 1234
    assert len(new.credential) >= 32
    assert new.credential not in repr(res.store)  # only its hash is kept


def test_rotation_grace_is_measured_on_the_injected_clock() -> None:
    res = Resources()
    register_device(res, "thermo", "kitchen-1")
    rotate_device_credential(res, "kitchen-1", grace_s=5, clock=lambda: 1_000)
    assert res.store.credentials["kitchen-1"][1] == 5_001_000
    rotate_device_credential(res, "kitchen-1", clock=lambda: 1_000)
    assert res.store.credentials["kitchen-1"][1] is None


def test_a_device_the_broker_refuses_is_not_registered() -> None:
    res = Resources(device_accounts=RefusingBroker())
    with pytest.raises(BrokerError):
        register_device(res, "thermo", "kitchen-1")
    assert res.store.devices == {}
    assert res.keyring.forgotten == ["kitchen-1"]


def test_delete_forgets_keys_and_grants_and_refuses_an_unknown_device() -> None:
    res = Resources()
    register_device(res, "thermo", "kitchen-1")
    delete_device(res, "kitchen-1")
    assert (res.keyring.forgotten, res.accounts.forgotten) == (["kitchen-1"], ["kitchen-1"])
    with pytest.raises(DeviceNotFoundError):
        delete_device(res, "kitchen-1")
    with pytest.raises(DeviceNotFoundError):
        rotate_device_credential(res, "kitchen-1")


@dataclass
class CredentialRows:
    rows: dict[str, DeviceCredentials]

    def device_credentials(self, device_ids: Sequence[str]) -> dict[str, DeviceCredentials]:
        return {d: self.rows[d] for d in device_ids if d in self.rows}


def test_check_device_credential_says_which_credential_matched_and_until_when() -> None:
    """The one rule the broker and HTTP messaging share: the current credential, or the previous
    one until its grace ends; the session the broker keeps needs to know which."""
    current, previous = hash_secret("new-secret"), hash_secret("old-secret")
    store = CredentialRows({"d1": DeviceCredentials("d1", "thermo", current, previous, 2_000)})
    login = check_device_credential(store, "d1", "new-secret", at_us=1_000)
    assert login is not None
    assert (login.device_id, login.type_id, login.used_hash, login.valid_until_us) == (
        "d1", "thermo", current, None,
    )  # fmt: skip
    assert current not in repr(login)  # hashes stay out of logs
    login = check_device_credential(store, "d1", "old-secret", at_us=1_999)
    assert login is not None
    assert (login.used_hash, login.valid_until_us) == (previous, 2_000)
    assert check_device_credential(store, "d1", "old-secret", at_us=2_000) is None  # grace over
    assert check_device_credential(store, "d1", "wrong", at_us=1_000) is None
    assert check_device_credential(store, "d2", "new-secret", at_us=1_000) is None  # unknown
    assert check_device_credential(store, "d1/#", "new-secret", at_us=1_000) is None  # not an id
    revoked = CredentialRows({"d1": DeviceCredentials("d1", "thermo", None, None, None)})
    assert check_device_credential(revoked, "d1", "", at_us=1_000) is None
