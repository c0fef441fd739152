"""The one authorization policy: a pure function of (principal, permission, device).

Every HTTP route declares the permission it needs (``Requires(Permission.X)`` in
:mod:`iotvault.api.deps`), and this module alone decides. Rights come from groups, as in the
seed's ``userGroup`` documents: a group's ``roleReader`` lets its members see its devices and
their events, ``roleWriter`` lets them command its devices, and ``roleAdmin`` lets them manage
users, groups, devices, API keys and clients, and see the device registry — but grants no
device data (events, live stream, commands) by itself. A
principal's rights are the union over its groups.

Answers follow the contract: a device the caller may not read is *not found* (404), the same as
a device that does not exist, so ids cannot be probed; a device the caller may read but not
command is *forbidden* (403) to a command.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Literal

ANONYMOUS_GROUP = "anonymous"


class Permission(StrEnum):
    """Every permission a route can require; kept sorted by value."""

    ACCOUNTS_MANAGE = "accounts:manage"
    API_KEYS_MANAGE = "apikeys:manage"
    AUDIT_READ = "audit:read"
    CLIENTS_MANAGE = "clients:manage"
    DEVICE_COMMAND = "device:command"
    DEVICE_EVENTS_READ = "device:events:read"
    DEVICE_READ = "device:read"
    DEVICES_LIST = "devices:list"
    DEVICES_MANAGE = "devices:manage"
    METRICS_READ = "metrics:read"
    SECURITY_EVENTS_READ = "security:events:read"
    SELF_READ = "self:read"


ADMIN_PERMISSIONS = frozenset(
    {
        Permission.ACCOUNTS_MANAGE,
        Permission.API_KEYS_MANAGE,
        Permission.AUDIT_READ,
        Permission.CLIENTS_MANAGE,
        Permission.DEVICES_MANAGE,
        Permission.METRICS_READ,
        Permission.SECURITY_EVENTS_READ,
    }
)
DEVICE_PERMISSIONS = frozenset(
    {Permission.DEVICE_READ, Permission.DEVICE_EVENTS_READ, Permission.DEVICE_COMMAND}
)


class Decision(Enum):
    ALLOW = "allow"
    NOT_FOUND = "not_found"  # also for devices that exist: their existence is not disclosed
    FORBIDDEN = "forbidden"


@dataclass(frozen=True, slots=True)
class Grant:
    """What one group (or an API key) contributes: roles over a set of devices."""

    admin: bool
    reader: bool
    writer: bool
    devices: frozenset[str]


@dataclass(frozen=True, slots=True)
class Principal:
    kind: Literal["user", "api_key", "anonymous", "external"]
    id: str
    admin: bool
    readable: frozenset[str]
    writable: frozenset[str]
    groups: tuple[str, ...] = ()

    @classmethod
    def from_grants(
        cls,
        kind: Literal["user", "api_key", "anonymous", "external"],
        principal_id: str,
        grants: Iterable[Grant],
        groups: Iterable[str] = (),
    ) -> Principal:
        admin = False
        readable: set[str] = set()
        writable: set[str] = set()
        for g in grants:
            admin |= g.admin
            if g.reader:
                readable |= g.devices
            if g.writer:
                writable |= g.devices
        return cls(kind, principal_id, admin, frozenset(readable), frozenset(writable), tuple(sorted(groups)))

    def can_read(self, device_id: str) -> bool:
        return device_id in self.readable


def authorize(principal: Principal, permission: Permission, device_id: str | None = None) -> Decision:
    """Decide; device permissions need *device_id*, the others ignore it."""
    if permission in (Permission.DEVICES_LIST, Permission.SELF_READ):
        return Decision.ALLOW
    if permission in ADMIN_PERMISSIONS:
        return Decision.ALLOW if principal.admin else Decision.FORBIDDEN
    if permission in DEVICE_PERMISSIONS:
        if device_id is None:
            raise ValueError(f"{permission} needs a device id")
        if permission is Permission.DEVICE_COMMAND:
            if device_id in principal.writable:
                return Decision.ALLOW
            return Decision.FORBIDDEN if device_id in principal.readable else Decision.NOT_FOUND
        return Decision.ALLOW if device_id in principal.readable else Decision.NOT_FOUND
    raise ValueError(f"no rule for {permission}")  # a new permission must get a rule here


def may_list_device(principal: Principal, device_id: str) -> bool:
    """Whether ``GET /iotf/devices`` lists this device to the caller.

    Readers see the devices they may read. An admin sees the whole registry (ids, types,
    status, metadata): knowing which devices exist is what administering them needs, and the
    admin commands (``iotvault devices list``) show the same. It is still no device *data*:
    an admin who is not a reader of a device gets 404 for its events, stream and commands.
    """
    return principal.admin or device_id in principal.readable


def within(child: Principal, ceiling: Principal) -> bool:
    """True if *child* holds nothing *ceiling* does not: an API key never exceeds its maker."""
    return (
        (not child.admin or ceiling.admin)
        and child.readable <= ceiling.readable
        and child.writable <= ceiling.writable
    )


def may_grant(creator: Principal, grant: Grant) -> bool:
    """Whether *creator* may make an API key holding *grant* (its roles over its devices, the
    devices of the groups it names included): a key never holds more than its maker."""
    return within(Principal.from_grants("api_key", "new", [grant]), creator)


@dataclass(frozen=True, slots=True)
class Holder:
    """Someone who may hold rights: a user, an API key, the anonymous caller or a group as a
    whole (external users are mapped to groups), with each grant named by where it comes from
    (a group name, or ``"key"`` for an API key's own devices)."""

    kind: Literal["user", "api_key", "anonymous", "group"]
    id: str
    grants: tuple[tuple[str, Grant], ...]
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class Access:
    """What one holder may do with one device, and through which grants."""

    kind: str
    id: str
    read: bool
    command: bool
    read_via: tuple[str, ...]
    command_via: tuple[str, ...]
    disabled: bool


def access_to(device_id: str, holders: Iterable[Holder]) -> list[Access]:
    """Who may read or command ``device_id``: the answer :func:`authorize` gives each holder.

    Each holder's rights are decided by :func:`authorize` on the principal its grants make,
    exactly as a request would be; ``read_via``/``command_via`` name the grants that would
    allow it on their own. Holders with neither right are left out. A disabled user is listed
    (with ``disabled``) because its groups still name it, although it cannot log in.
    """
    found: list[Access] = []
    for h in holders:
        principal = Principal.from_grants("user", h.id, (g for _, g in h.grants))
        read = authorize(principal, Permission.DEVICE_READ, device_id) is Decision.ALLOW
        command = authorize(principal, Permission.DEVICE_COMMAND, device_id) is Decision.ALLOW
        if not (read or command):
            continue

        def via(permission: Permission, holder: Holder = h) -> tuple[str, ...]:
            return tuple(
                source
                for source, g in holder.grants
                if authorize(Principal.from_grants("user", holder.id, [g]), permission, device_id)
                is Decision.ALLOW
            )

        found.append(
            Access(
                h.kind,
                h.id,
                read,
                command,
                via(Permission.DEVICE_READ),
                via(Permission.DEVICE_COMMAND),
                h.disabled,
            )
        )
    return found


def reach(holder: Holder) -> tuple[frozenset[str], frozenset[str], bool]:
    """What ``holder`` may reach: (readable devices, commandable devices, admin)."""
    p = Principal.from_grants("user", holder.id, (g for _, g in holder.grants))
    return p.readable, p.writable, p.admin
