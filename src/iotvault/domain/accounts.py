"""Users, groups, roles and API keys as the seed's ``user`` and ``userGroup`` documents have them.

Pure value objects and checks; storage and services live in :mod:`iotvault.storage.accounts`
and :mod:`iotvault.accounts`.

``userName`` and ``groupName`` are 1-64 characters of ``A-Z a-z 0-9 . _ @ -``: the device
alphabet plus ``@`` so that an e-mail address can be a user name. They appear in tokens, URLs
and log lines, so nothing that needs escaping (``/``, spaces, control characters, non-ASCII
look-alikes) gets in. Free text (display names, attribute values, descriptions) may be any
Unicode but no control characters: PostgreSQL refuses NUL in text, and a newline in a log line
is a forged log line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from iotvault.domain.ids import check_identifier
from iotvault.errors import ValidationError

NAME_PATTERN: Final = "[A-Za-z0-9._@-]{1,64}"
"""``userName`` and ``groupName``."""
_NAME_RE: Final = re.compile(NAME_PATTERN)
# ``k-`` and 20 URL-safe characters; or a Watson IoT application key, ``a-<org>-`` and 20 (the
# Watson SDK reads the organization from the key id: the part between the first two hyphens)
_API_KEY_ID_RE: Final = re.compile(r"(k|a-[a-z0-9]{1,32})-[A-Za-z0-9_-]{20}")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

MAX_DISPLAY_NAME: Final = 128
MAX_DESCRIPTION: Final = 256
MAX_ATTRIBUTES: Final = 32
MAX_ATTRIBUTE_KEY: Final = 64
MAX_ATTRIBUTE_VALUE: Final = 256
MIN_PASSWORD: Final = 12
# argon2 accepts any length; a bound keeps a login request from hashing megabytes.
MAX_PASSWORD: Final = 1024
API_KEY_PREFIX: Final = "k-"


def _check_encodable(field: str, value: str) -> None:
    """Lone surrogates (possible in a decoded JSON string) have no UTF-8 form to store or hash."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(field, "must be valid Unicode text") from None


def check_name(field: str, value: object) -> str:
    """Return ``value`` if it is a valid user or group name, else raise ValidationError."""
    if not isinstance(value, str) or _NAME_RE.fullmatch(value) is None:
        raise ValidationError(field, "must be 1-64 characters of A-Z a-z 0-9 . _ @ -")
    return value


def is_valid_name(value: object) -> bool:
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None


def check_text(field: str, value: object, *, max_len: int) -> str:
    """Free text of at most ``max_len`` characters without control characters."""
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    if len(value) > max_len:
        raise ValidationError(field, f"must be at most {max_len} characters")
    if _CONTROL_RE.search(value):
        raise ValidationError(field, "must not contain control characters")
    _check_encodable(field, value)
    return value


def check_display_name(value: object) -> str:
    return check_text("displayName", value, max_len=MAX_DISPLAY_NAME)


def check_attributes(value: object) -> dict[str, str]:
    """A JSON object of string keys to string values (``Language``, ``emailAddress``, ...)."""
    if not isinstance(value, Mapping):
        raise ValidationError("attributes", "must be an object of string values")
    if len(value) > MAX_ATTRIBUTES:
        raise ValidationError("attributes", f"must have at most {MAX_ATTRIBUTES} keys")
    result: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ValidationError("attributes", "keys must be non-empty strings")
        check_text("attributes", key, max_len=MAX_ATTRIBUTE_KEY)
        if not isinstance(item, str):
            raise ValidationError(f"attributes.{key}", "must be a string")
        result[key] = check_text(f"attributes.{key}", item, max_len=MAX_ATTRIBUTE_VALUE)
    return result


def check_password(value: object) -> str:
    """A password a person chose: 12 to 1024 characters (NIST SP 800-63B asks 8, or 15 without MFA)."""
    if not isinstance(value, str):
        raise ValidationError("password", "must be a string")
    if not MIN_PASSWORD <= len(value) <= MAX_PASSWORD:
        raise ValidationError("password", f"must be {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    _check_encodable("password", value)
    return value


def check_device_ids(value: Iterable[object]) -> tuple[str, ...]:
    """Device ids, validated, duplicates dropped, sorted."""
    if isinstance(value, str | bytes):
        raise ValidationError("devices", "must be a list of deviceIds")
    ids = set()
    for v in value:
        if not isinstance(v, str):
            raise ValidationError("devices", "must be a list of deviceIds")
        ids.add(check_identifier("devices", v))
    return tuple(sorted(ids))


def check_group_names(value: Iterable[object]) -> tuple[str, ...]:
    """Group names, validated, duplicates dropped, sorted."""
    if isinstance(value, str | bytes):
        raise ValidationError("groups", "must be a list of group names")
    return tuple(sorted({check_name("groups", v) for v in value}))


def is_api_key_id(value: object) -> bool:
    """Whether ``value`` has the form of an API key's public id (``k-`` or ``a-<org>-``, and 20
    URL-safe characters)."""
    return isinstance(value, str) and _API_KEY_ID_RE.fullmatch(value) is not None


def parse_flag(field: str, value: object) -> bool:
    """A boolean as the seed's documents spell it: ``true``/``false`` or ``"true"``/``"false"``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValidationError(field, "must be true or false")


@dataclass(frozen=True, slots=True)
class UserName:
    value: str

    def __post_init__(self) -> None:
        check_name("userName", self.value)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class GroupName:
    value: str

    def __post_init__(self) -> None:
        check_name("groupName", self.value)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Roles:
    """The seed's three roles. ``admin`` manages accounts and devices but grants no device data;
    ``reader`` and ``writer`` apply to the devices of the group (or API key) that holds them."""

    admin: bool = False
    reader: bool = False
    writer: bool = False

    def __post_init__(self) -> None:
        for name in ("admin", "reader", "writer"):
            if not isinstance(getattr(self, name), bool):
                raise ValidationError(f"role{name.capitalize()}", "must be true or false")

    def __or__(self, other: Roles) -> Roles:
        return Roles(self.admin or other.admin, self.reader or other.reader, self.writer or other.writer)

    def __and__(self, other: Roles) -> Roles:
        return Roles(self.admin and other.admin, self.reader and other.reader, self.writer and other.writer)

    def changed(
        self, *, admin: bool | None = None, reader: bool | None = None, writer: bool | None = None
    ) -> Roles:
        """These roles with the ones given changed; a role given as None stays as it is."""
        return Roles(
            self.admin if admin is None else admin,
            self.reader if reader is None else reader,
            self.writer if writer is None else writer,
        )

    def within(self, other: Roles) -> bool:
        """Whether every role of ``self`` is also held by ``other`` (no more than it may grant)."""
        return (self & other) == self

    def __bool__(self) -> bool:
        return self.admin or self.reader or self.writer

    def names(self) -> tuple[str, ...]:
        """The held roles' names in the seed's spelling, e.g. ``("roleReader",)``."""
        flags = (("roleAdmin", self.admin), ("roleReader", self.reader), ("roleWriter", self.writer))
        return tuple(name for name, held in flags if held)


NO_ROLES: Final = Roles()


@dataclass(frozen=True, slots=True)
class GroupGrant:
    """What one group gives its members: its roles, on its devices (``admin`` on none of them).

    A principal's rights on a device are the union over the grants that list the device; the
    authorization policy combines them, this object only answers for one group.
    """

    group_name: str
    roles: Roles = NO_ROLES
    devices: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        check_name("groupName", self.group_name)
        if not isinstance(self.roles, Roles):
            raise ValidationError("roles", "must be Roles")
        object.__setattr__(self, "devices", frozenset(check_device_ids(self.devices)))

    def covers(self, device_id: str) -> bool:
        return device_id in self.devices

    def device_roles(self, device_id: str) -> Roles:
        """The data roles this group gives on ``device_id`` (reader, writer; never admin)."""
        if device_id not in self.devices:
            return NO_ROLES
        return Roles(admin=False, reader=self.roles.reader, writer=self.roles.writer)
