"""The device registry's services: register, rotate a credential, revoke, delete, command delivery.

Shared by the HTTP API and the command line, as :mod:`iotvault.accounts` is for people. Each
function takes the narrow set of resources it uses (:class:`DeviceServices`): the device
store, the key ring, the account store (API keys that name a device) and, with Mosquitto, the
broker's own accounts (:class:`DeviceAccounts`). A credential exists in plaintext only in the
value a function returns: it is stored as a hash and shown once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from iotvault.audit.changes import changed
from iotvault.clock import US_PER_S, Clock, now_us
from iotvault.crypto.tokens import hash_secret, new_secret, verify_secret
from iotvault.domain.commands import Delivery
from iotvault.domain.device_import import ImportFileError, ImportRow
from iotvault.domain.ids import IDENTIFIER_PATTERN, DeviceId, TypeId
from iotvault.errors import BrokerError, DeviceExistsError, DeviceNotFoundError
from iotvault.storage.repository import DeviceCredentials, DeviceRecord

_DUMMY_HASH: Final = hash_secret("iotvault: no such credential")


class DeviceAccounts(Protocol):
    """Broker-side accounts that follow the registry (Mosquitto: :mod:`iotvault.broker.dynsec`).

    Called with the plaintext credential, the only moment it exists; raising
    :class:`~iotvault.errors.BrokerError` undoes the registry change where that is possible.
    """

    def device_registered(self, device_id: str, type_id: str, credential: str) -> None: ...
    def credential_rotated(self, device_id: str, type_id: str, credential: str) -> None: ...
    def credential_revoked(self, device_id: str) -> None: ...
    def device_deleted(self, device_id: str) -> None: ...


class _Registry(Protocol):
    def add_device(
        self, device: DeviceRecord, *, wrapped_key: bytes, credential_hash: str | None
    ) -> None: ...
    def get_device(self, device_id: str) -> DeviceRecord | None: ...
    def delete_device(self, device_id: str) -> bool: ...
    def set_credential(
        self, device_id: str, credential_hash: str, *, previous_valid_until_us: int | None
    ) -> None: ...
    def revoke_credentials(self, device_id: str) -> None: ...
    def set_command_delivery(self, device_id: str, delivery: str) -> str: ...
    def type_command_delivery(self, type_id: str) -> str | None: ...
    def set_type_command_delivery(self, type_id: str, delivery: str) -> list[str]: ...


class _Keys(Protocol):
    def new_device_key(self, device_id: str, version: int = 1) -> bytes: ...
    def forget(self, device_id: str) -> None: ...


class _Grants(Protocol):
    def forget_device(self, device_id: str) -> None: ...


class DeviceServices(Protocol):
    """What the device services use; :class:`iotvault.context.Context` is one."""

    @property
    def store(self) -> _Registry: ...
    @property
    def keyring(self) -> _Keys: ...
    @property
    def accounts(self) -> _Grants: ...
    @property
    def device_accounts(self) -> DeviceAccounts | None: ...


@dataclass(frozen=True)
class NewDevice:
    device_id: str
    type_id: str
    credential: str  # shown once, never stored


def register_device(
    ctx: DeviceServices,
    type_id: str,
    device_id: str,
    metadata: Mapping[str, Any] | None = None,
    *,
    clock: Clock = now_us,
) -> NewDevice:
    """Create a device with a fresh data key and a fresh credential (returned once)."""
    did, tid = DeviceId(device_id).value, TypeId(type_id).value
    credential = new_secret()
    # the type's command delivery, if an admin chose one for it (set_type_command_delivery)
    delivery = ctx.store.type_command_delivery(tid) or Delivery.SIGNED.value
    record = DeviceRecord(did, tid, "offline", None, dict(metadata or {}), clock(), delivery)
    ctx.store.add_device(
        record, wrapped_key=ctx.keyring.new_device_key(did), credential_hash=hash_secret(credential)
    )
    if ctx.device_accounts is not None:
        try:
            ctx.device_accounts.device_registered(did, tid, credential)
        except BrokerError:
            ctx.store.delete_device(did)  # a device the broker would refuse is not registered
            ctx.keyring.forget(did)
            raise
    changed("device.register", did, after=record, credential="issued")
    return NewDevice(did, tid, credential)


def rotate_device_credential(
    ctx: DeviceServices, device_id: str, *, grace_s: int = 0, clock: Clock = now_us
) -> str:
    """A new credential (returned once); the old one stays valid ``grace_s`` seconds.

    With Mosquitto the broker learns the new credential first and drops the old one at once
    (its dynamic-security plugin keeps one password per client): no grace there.
    """
    device = ctx.store.get_device(device_id)
    if device is None:
        raise DeviceNotFoundError(device_id)
    credential = new_secret()
    if ctx.device_accounts is not None:
        ctx.device_accounts.credential_rotated(device.device_id, device.type_id, credential)
    until = clock() + grace_s * US_PER_S if grace_s > 0 else None
    ctx.store.set_credential(device_id, hash_secret(credential), previous_valid_until_us=until)
    changed("device.credential.rotate", device.device_id, credential="issued", graceSeconds=grace_s)
    return credential


def revoke_device_credential(ctx: DeviceServices, device_id: str) -> None:
    """Refuse every credential of a device (current and in grace) until it gets a new one."""
    ctx.store.revoke_credentials(device_id)
    if ctx.device_accounts is not None:
        ctx.device_accounts.credential_revoked(device_id)
    changed("device.credential.revoke", device_id)


def delete_device(ctx: DeviceServices, device_id: str) -> None:
    """Remove a device, its keys and events, and every API key's or group's mention of it.

    Its data keys go with it (crypto-shredding): any copy of its events left in a backup or a
    replica no longer decrypts, which the audit record says.
    """
    before = ctx.store.get_device(device_id)
    if before is None or not ctx.store.delete_device(device_id):
        raise DeviceNotFoundError(device_id)
    ctx.keyring.forget(device_id)
    ctx.accounts.forget_device(device_id)  # API keys that named it; its group grants are gone
    if ctx.device_accounts is not None:
        # a failure here is repaired at the next start (DynsecAccounts.reconcile)
        ctx.device_accounts.device_deleted(device_id)
    changed("device.delete", device_id, before=before, dataKeysDestroyed=True, eventsDeleted=True)


def set_command_delivery(ctx: DeviceServices, device_id: str, delivery: Delivery) -> DeviceRecord:
    """Choose how commands reach a device: ``signed`` (default) or ``unsigned`` (Watson's way).

    Audited with the setting before and after; an unchanged setting is recorded too (an admin
    confirmed it). Takes effect for the next command sent, on every node.
    """
    before = ctx.store.get_device(device_id)
    if before is None:
        raise DeviceNotFoundError(device_id)
    ctx.store.set_command_delivery(device_id, Delivery(delivery).value)
    after = ctx.store.get_device(device_id)
    if after is None:  # deleted in between
        raise DeviceNotFoundError(device_id)
    changed(
        "device.command_delivery",
        device_id,
        before=before,
        after=after,
        commandDelivery=after.command_delivery,
    )
    return after


def set_type_command_delivery(ctx: DeviceServices, type_id: str, delivery: Delivery) -> list[str]:
    """Choose how commands reach the devices of a type: those registered from now on, and those
    registered already (each can still be changed on its own). Returns the devices changed.

    Audited: one record for the type, and one per device whose setting changed.
    """
    tid = TypeId(type_id).value
    value = Delivery(delivery).value
    changed_ids = ctx.store.set_type_command_delivery(tid, value)
    changed("device_type.command_delivery", tid, commandDelivery=value, devicesChanged=len(changed_ids))
    for device_id in changed_ids:
        changed("device.command_delivery", device_id, commandDelivery=value, viaType=tid)
    return changed_ids


class _CredentialReader(Protocol):
    def device_credentials(self, device_ids: Sequence[str]) -> dict[str, DeviceCredentials]: ...


@dataclass(frozen=True, slots=True)
class DeviceLogin:
    """A device that proved its credential (an MQTT CONNECT, an HTTP device message).

    ``used_hash`` and ``valid_until_us`` say which credential it was — the broker re-checks a
    session against them (:meth:`iotvault.broker.authority.DeviceAuthority.revalidate`):
    ``valid_until_us`` is None for the current credential, the end of its grace for the previous.
    """

    device_id: str
    type_id: str
    used_hash: str = field(default="", repr=False)
    valid_until_us: int | None = None

    @property
    def kind(self) -> str:  # the audit record's actor: device:<deviceId>
        return "device"

    @property
    def id(self) -> str:
        return self.device_id


def check_device_credential(
    store: _CredentialReader, device_id: str, secret: str, *, at_us: int
) -> DeviceLogin | None:
    """The device if ``secret`` is its current credential, or its previous one within its grace.

    The one rule for every door a device knocks on — the embedded broker
    (:class:`iotvault.broker.authority.DeviceAuthority`) and HTTP device messaging: both hashes
    are always checked, each against a dummy when missing, in constant time, so a wrong secret,
    an unknown device and one without a previous credential cost the same. Blocking (a database
    read and two password hashes): call it in a thread from async code.
    """
    valid = re.fullmatch(IDENTIFIER_PATTERN, device_id) is not None
    found = store.device_credentials([device_id]).get(device_id) if valid else None
    current = found.credential_hash if found is not None and found.credential_hash else None
    previous = found.previous_credential_hash if found is not None else None
    current_ok = verify_secret(secret, current or _DUMMY_HASH) and current is not None
    previous_ok = verify_secret(secret, previous or _DUMMY_HASH) and previous is not None
    grace_until = found.previous_expires_us if found is not None else None
    previous_ok = previous_ok and grace_until is not None and grace_until > at_us
    if found is None or not (current_ok or previous_ok):
        return None
    used = current if current_ok else previous
    assert used is not None  # noqa: S101 - one of the two matched
    return DeviceLogin(found.device_id, found.type_id, used, None if current_ok else grace_until)


def import_devices(
    ctx: DeviceServices, rows: Sequence[ImportRow], *, unit: str = "line"
) -> Iterator[tuple[ImportRow, NewDevice | None]]:
    """Register the devices of an import file, one by one: each with its new credential, or
    None for a device already registered with that type (so a second run changes nothing).

    Checked before anything is registered: a device registered with another type stops the
    import (:class:`ImportFileError` naming its line). A generator, so that the caller writes
    each credential as it is issued: if the import stops half-way (the database gone), the
    credentials already issued are not lost, and running it again completes it.
    """
    clashes = []
    for row in rows:
        found = ctx.store.get_device(row.device_id)
        if found is not None and found.type_id != row.type_id:
            clashes.append(
                (row.line, f"{row.device_id} is registered with type {found.type_id}, not {row.type_id}")
            )
    if clashes:
        raise ImportFileError(clashes, unit=unit)
    for row in rows:
        if ctx.store.get_device(row.device_id) is not None:
            yield row, None
            continue
        try:
            yield row, register_device(ctx, row.type_id, row.device_id, row.metadata)
        except DeviceExistsError:  # registered meanwhile by someone else
            yield row, None
