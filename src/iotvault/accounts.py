"""Users, groups and API keys: the services the command line and the HTTP API share.

Every write validates its input with :mod:`iotvault.domain.accounts` before it reaches
:class:`~iotvault.storage.accounts.AccountStore`, and raises the store's ``...NotFoundError``
and ``...ExistsError`` for a missing or duplicate name. Secrets leave this module exactly once,
as the return value of the call that made them: generated user passwords, API key passwords.

The two checks that face the outside, :func:`authenticate` and :func:`verify_api_key`, cost
the same for an unknown name as for a wrong secret: the unknown case is checked against a
dummy hash. Both block for the duration of a hash (argon2id for people, a fraction of a
second; SHA-256 for API keys): call them from a worker thread on an event loop.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, NamedTuple, Protocol

from iotvault.audit.changes import changed
from iotvault.auth.policy import Grant
from iotvault.clock import now_us
from iotvault.crypto.passwords import generate_password, hash_password, needs_rehash, verify_password
from iotvault.crypto.tokens import hash_secret, new_secret, verify_secret
from iotvault.domain.accounts import (
    API_KEY_PREFIX,
    MAX_DESCRIPTION,
    NO_ROLES,
    Roles,
    check_attributes,
    check_device_ids,
    check_display_name,
    check_group_names,
    check_name,
    check_password,
    check_text,
    is_api_key_id,
    is_valid_name,
    parse_flag,
)
from iotvault.errors import ValidationError
from iotvault.storage.accounts import (
    AccountStore,
    ApiKeyNotFoundError,
    ApiKeyRecord,
    GroupNotFoundError,
    GroupRecord,
    UserNotFoundError,
    UserRecord,
)


class AccountServices(Protocol):
    """What these services use: the account store (:class:`iotvault.context.Context` is one)."""

    @property
    def accounts(self) -> AccountStore: ...


# Checked when an API key id is unknown, so that it costs a hash like a wrong password does.
_DUMMY_SECRET_HASH: Final = hash_secret(secrets.token_urlsafe(32))


# ---- users ---------------------------------------------------------------------------
def create_user(
    ctx: AccountServices,
    user_name: str,
    display_name: str | None,
    *,
    password: str | None = None,
    attributes: Mapping[str, str] | None = None,
    groups: Iterable[str] = (),
) -> str:
    """Create a user in ``groups`` (which must exist); returns its password.

    With ``password=None`` a password is generated: the return value is the only copy.
    """
    name = check_name("userName", user_name)
    shown = check_display_name(display_name if display_name else name)
    attrs = check_attributes(attributes or {})
    group_names = check_group_names(groups)
    secret = generate_password() if password is None else check_password(password)
    ctx.accounts.add_user(name, shown, hash_password(secret), attrs, group_names)
    changed("user.create", name, after=ctx.accounts.get_user(name))
    return secret


def _existing_user(ctx: AccountServices, user_name: str) -> UserRecord:
    user = ctx.accounts.get_user(user_name) if is_valid_name(user_name) else None
    if user is None:
        raise UserNotFoundError(user_name)
    return user


def update_user(
    ctx: AccountServices,
    user_name: str,
    *,
    display_name: str | None = None,
    attributes: Mapping[str, str] | None = None,
    disabled: bool | None = None,
) -> UserRecord:
    """Change the given fields (``attributes`` replaces them all); returns the user as now stored."""
    before = _existing_user(ctx, user_name)
    ctx.accounts.update_user(
        user_name,
        display_name=check_display_name(display_name) if display_name is not None else None,
        attributes=check_attributes(attributes) if attributes is not None else None,
        disabled=parse_flag("disabled", disabled) if disabled is not None else None,
    )
    after = _existing_user(ctx, user_name)
    changed("user.update", user_name, before=before, after=after)
    return after


def set_password(ctx: AccountServices, user_name: str, password: str) -> None:
    _existing_user(ctx, user_name)
    ctx.accounts.set_password_hash(user_name, hash_password(check_password(password)))
    changed("user.password.set", user_name)


def reset_password(ctx: AccountServices, user_name: str) -> str:
    """Give the user a generated password and return it (the only copy)."""
    _existing_user(ctx, user_name)
    password = generate_password()
    ctx.accounts.set_password_hash(user_name, hash_password(password))
    changed("user.password.reset", user_name, generated=True)
    return password


def delete_user(ctx: AccountServices, user_name: str) -> None:
    before = ctx.accounts.get_user(user_name) if is_valid_name(user_name) else None
    if before is None or not ctx.accounts.delete_user(user_name):
        raise UserNotFoundError(user_name)
    changed("user.delete", user_name, before=before)


def authenticate(ctx: AccountServices, user_name: str, password: str) -> UserRecord | None:
    """The user if ``password`` is its password and it is not disabled, else None.

    Unknown and malformed names cost a dummy argon2 check, like a wrong password. A hash made
    with older parameters is replaced after a successful check.
    """
    stored = ctx.accounts.password_hash(user_name) if is_valid_name(user_name) else None
    if not verify_password(stored, password) or stored is None:
        return None
    user = ctx.accounts.get_user(user_name)
    if user is None or user.disabled:
        return None
    if needs_rehash(stored):
        ctx.accounts.set_password_hash(user_name, hash_password(password))
    return user


# ---- groups --------------------------------------------------------------------------
def _existing_group(ctx: AccountServices, group_name: str) -> GroupRecord:
    group = ctx.accounts.get_group(group_name) if is_valid_name(group_name) else None
    if group is None:
        raise GroupNotFoundError(group_name)
    return group


def create_group(
    ctx: AccountServices,
    group_name: str,
    display_name: str | None = None,
    *,
    roles: Roles = NO_ROLES,
    devices: Iterable[str] = (),
) -> GroupRecord:
    """Create a group giving ``roles`` on ``devices`` (which need not be registered yet)."""
    name = check_name("groupName", group_name)
    if not isinstance(roles, Roles):
        raise ValidationError("roles", "must be Roles")
    ctx.accounts.add_group(
        name, check_display_name(display_name if display_name else name), roles, check_device_ids(devices)
    )
    after = _existing_group(ctx, name)
    changed("group.create", name, after=after)
    return after


def update_group(
    ctx: AccountServices,
    group_name: str,
    *,
    display_name: str | None = None,
    roles: Roles | None = None,
    devices: Iterable[str] | None = None,
) -> GroupRecord:
    """Change the given fields (``devices`` replaces the list); returns the group as now stored."""
    before = _existing_group(ctx, group_name)
    if roles is not None and not isinstance(roles, Roles):
        raise ValidationError("roles", "must be Roles")
    ctx.accounts.update_group(
        group_name,
        display_name=check_display_name(display_name) if display_name is not None else None,
        roles=roles,
        devices=check_device_ids(devices) if devices is not None else None,
    )
    after = _existing_group(ctx, group_name)
    changed("group.update", group_name, before=before, after=after)
    return after


def delete_group(ctx: AccountServices, group_name: str) -> None:
    before = ctx.accounts.get_group(group_name) if is_valid_name(group_name) else None
    if before is None or not ctx.accounts.delete_group(group_name):
        raise GroupNotFoundError(group_name)
    changed("group.delete", group_name, before=before)


def _group_change(ctx: AccountServices, action: str, group_name: str, change: Callable[[], bool]) -> bool:
    """Run ``change`` (membership or device list) and record the group before and after it."""
    before = ctx.accounts.get_group(group_name)
    done = change()
    if done:
        changed(action, group_name, before=before, after=ctx.accounts.get_group(group_name))
    return done


def add_member(ctx: AccountServices, group_name: str, user_name: str) -> bool:
    """Add ``user_name`` to ``group_name``; False if it already was a member."""
    group, user = check_name("groupName", group_name), check_name("userName", user_name)
    return _group_change(ctx, "group.member.add", group, lambda: ctx.accounts.add_member(group, user))


def remove_member(ctx: AccountServices, group_name: str, user_name: str) -> bool:
    """Remove ``user_name`` from ``group_name``; False if it was not a member."""
    group, user = check_name("groupName", group_name), check_name("userName", user_name)
    return _group_change(ctx, "group.member.remove", group, lambda: ctx.accounts.remove_member(group, user))


def add_group_device(ctx: AccountServices, group_name: str, device_id: str) -> bool:
    (did,) = check_device_ids([device_id])
    group = check_name("groupName", group_name)
    return _group_change(ctx, "group.device.add", group, lambda: ctx.accounts.add_group_device(group, did))


def remove_group_device(ctx: AccountServices, group_name: str, device_id: str) -> bool:
    (did,) = check_device_ids([device_id])
    group = check_name("groupName", group_name)
    return _group_change(
        ctx, "group.device.remove", group, lambda: ctx.accounts.remove_group_device(group, did)
    )


# ---- API keys ------------------------------------------------------------------------
class NewApiKey(NamedTuple):
    key: str  # public id
    password: str  # shown once, stored only as a hash


def new_api_key_id(watson_org: str | None = None) -> str:
    """``k-`` and 20 URL-safe characters (120 random bits): public, but unguessable anyway.

    With ``watson_org``: ``a-<org>-`` and 20, the form of a Watson IoT application's key, from
    which Watson's application SDK takes the organization it connects to.
    """
    prefix = API_KEY_PREFIX if watson_org is None else f"a-{watson_org}-"
    return prefix + secrets.token_urlsafe(15)


def create_api_key(
    ctx: AccountServices,
    *,
    roles: Roles,
    devices: Iterable[str] = (),
    groups: Iterable[str] = (),
    expires_us: int | None = None,
    description: str = "",
    created_by: str,
    watson_org: str | None = None,
) -> NewApiKey:
    """Make an API key with ``roles`` on ``devices`` and on the devices of ``groups``.

    Whether the caller may grant that much is the authorization policy's question, asked
    before this is called. ``watson_org``: a key id a Watson IoT application can use
    (:func:`new_api_key_id`).
    """
    if not isinstance(roles, Roles) or not roles:
        raise ValidationError("roles", "an API key needs at least one of roleAdmin, roleReader, roleWriter")
    device_ids = check_device_ids(devices)
    group_names = check_group_names(groups)
    for name in group_names:
        _existing_group(ctx, name)
    at = now_us()
    if expires_us is not None and (not isinstance(expires_us, int) or expires_us <= at):
        raise ValidationError("expires", "must be in the future")
    new = NewApiKey(new_api_key_id(watson_org), new_secret())
    if not is_api_key_id(new.key):
        raise ValidationError("orgId", "a Watson organization id is 1-32 of a-z 0-9")
    record = ApiKeyRecord(
        key=new.key,
        description=check_text("description", description, max_len=MAX_DESCRIPTION),
        roles=roles,
        devices=device_ids,
        groups=group_names,
        expires_us=expires_us,
        last_used_us=None,
        revoked_us=None,
        created_by=check_text("createdBy", created_by, max_len=64),
        created_us=at,
    )
    ctx.accounts.add_api_key(record, hash_secret(new.password))
    changed("apikey.create", new.key, after=record)
    return new


def api_key_grant(
    ctx: AccountServices, roles: Roles, devices: Iterable[str], groups: Iterable[str], *, strict: bool = False
) -> Grant:
    """What an API key holds: its roles on its own devices and on its groups' devices.

    Groups are read now, so a device added to a group is granted to its keys at once. A group
    deleted since grants nothing; ``strict`` (creating a key) refuses it instead.
    """
    granted = set(devices)
    for name in groups:
        group = ctx.accounts.get_group(name)
        if group is not None:
            granted |= set(group.devices)
        elif strict:
            raise GroupNotFoundError(name)
    return Grant(roles.admin, roles.reader, roles.writer, frozenset(granted))


def verify_api_key(ctx: AccountServices, key: str, password: str, now_us: int) -> ApiKeyRecord | None:
    """The key's record if ``password`` is its password and it is neither revoked nor expired.

    Unknown keys cost a hash like a wrong password. A successful check records ``lastUsed``
    (at most once a minute).
    """
    return check_api_key(ctx, key, password, now_us).record


class ApiKeyCheck(NamedTuple):
    record: ApiKeyRecord | None  # set only when the key is accepted
    revoked: bool = False  # the right password of a revoked key: someone still holds it


def check_api_key(ctx: AccountServices, key: str, password: str, now_us: int) -> ApiKeyCheck:
    """:func:`verify_api_key`, and whether a refusal was the right password of a revoked key.

    That case is worth an alert (a leaked or forgotten key still in use); a wrong password for
    a revoked key is not told apart from any other wrong password.
    """
    found = ctx.accounts.get_api_key(key) if is_api_key_id(key) else None
    if found is None:
        verify_secret(password, _DUMMY_SECRET_HASH)
        return ApiKeyCheck(None)
    record, stored = found
    if not verify_secret(password, stored):
        return ApiKeyCheck(None)
    if record.revoked_us is not None:
        return ApiKeyCheck(None, revoked=True)
    if record.expires_us is not None and record.expires_us <= now_us:
        return ApiKeyCheck(None)
    if ctx.accounts.touch_api_key(record.key, now_us):
        record = replace(record, last_used_us=now_us)
    return ApiKeyCheck(record)


def revoke_api_key(ctx: AccountServices, key: str, at_us: int | None = None) -> None:
    found = ctx.accounts.get_api_key(key) if is_api_key_id(key) else None
    if found is None or not ctx.accounts.revoke_api_key(key, now_us() if at_us is None else at_us):
        raise ApiKeyNotFoundError(key)
    after = ctx.accounts.get_api_key(key)
    changed("apikey.revoke", key, before=found[0], after=after[0] if after is not None else None)


# ---- seed import ---------------------------------------------------------------------
_IGNORED_KEYS: Final = frozenset({"_id", "_rev", "type"})
_USER_KEYS: Final = frozenset({"userName", "displayName", "attributes", "groups", "password", "disabled"})
_GROUP_KEYS: Final = frozenset(
    {"groupName", "displayName", "roleAdmin", "roleReader", "roleWriter", "devices"}
)


@dataclass(frozen=True)
class SeedReport:
    groups_created: tuple[str, ...] = ()
    groups_skipped: tuple[str, ...] = ()  # already existed: left unchanged
    users_created: tuple[str, ...] = ()
    users_skipped: tuple[str, ...] = ()  # already existed: left unchanged
    passwords: Mapping[str, str] = field(default_factory=dict)  # generated ones, shown once


@dataclass(frozen=True)
class _SeedUser:
    user_name: str
    display_name: str
    attributes: dict[str, str]
    groups: tuple[str, ...]
    password: str | None
    disabled: bool


@dataclass(frozen=True)
class _SeedGroup:
    group_name: str
    display_name: str
    roles: Roles
    devices: tuple[str, ...]


def _documents(kind: str, value: Any) -> list[Mapping[str, Any]]:
    """The documents of a seed file: a list, Cloudant's ``{"docs": [...]}`` or
    ``{"rows": [{"doc": ...}]}``, or one document. Design documents are skipped."""
    if value is None:
        return []
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValidationError(kind, "is not valid JSON") from None
    if isinstance(value, Mapping) and isinstance(value.get("docs"), list):
        value = value["docs"]
    elif isinstance(value, Mapping) and isinstance(value.get("rows"), list):
        value = [r.get("doc") if isinstance(r, Mapping) else r for r in value["rows"]]
    elif isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise ValidationError(kind, "must be a list of documents")
    docs = []
    for i, doc in enumerate(value):
        if not isinstance(doc, Mapping):
            raise ValidationError(f"{kind}[{i}]", "must be an object")
        if str(doc.get("_id", "")).startswith("_design/"):
            continue
        docs.append(doc)
    return docs


def _check_keys(where: str, doc: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(doc) - allowed - _IGNORED_KEYS)
    if unknown:
        raise ValidationError(where, f"unknown field(s) {', '.join(unknown)}")


def _seed_group(i: int, doc: Mapping[str, Any]) -> _SeedGroup:
    name = check_name(f"groups[{i}].groupName", doc.get("groupName"))
    where = f"group {name}"
    _check_keys(where, doc, _GROUP_KEYS)
    try:
        roles = Roles(
            admin=parse_flag("roleAdmin", doc.get("roleAdmin", False)),
            reader=parse_flag("roleReader", doc.get("roleReader", False)),
            writer=parse_flag("roleWriter", doc.get("roleWriter", False)),
        )
        devices = doc.get("devices", [])
        if not isinstance(devices, list):
            raise ValidationError("devices", "must be a list of deviceIds")  # noqa: TRY301
        display_name = check_display_name(doc.get("displayName") or name)
        return _SeedGroup(name, display_name, roles, check_device_ids(devices))
    except ValidationError as exc:
        raise ValidationError(f"{where}: {exc.field}", exc.reason) from None


def _seed_user(i: int, doc: Mapping[str, Any]) -> _SeedUser:
    name = check_name(f"users[{i}].userName", doc.get("userName"))
    where = f"user {name}"
    _check_keys(where, doc, _USER_KEYS)
    try:
        groups = doc.get("groups", [])
        if not isinstance(groups, list):
            raise ValidationError("groups", "must be a list of group names")  # noqa: TRY301
        password = doc.get("password")
        return _SeedUser(
            user_name=name,
            display_name=check_display_name(doc.get("displayName") or name),
            attributes=check_attributes(doc.get("attributes") or {}),
            groups=check_group_names(groups),
            password=check_password(password) if password is not None else None,
            disabled=parse_flag("disabled", doc.get("disabled", False)),
        )
    except ValidationError as exc:
        raise ValidationError(f"{where}: {exc.field}", exc.reason) from None


def _unique(kind: str, names: list[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValidationError(kind, f"{n!r} appears twice")
        seen.add(n)


def import_seed(ctx: AccountServices, users_json: Any, groups_json: Any) -> SeedReport:
    """Create the users and groups of the seed's ``user`` and ``userGroup`` documents.

    Every document is checked before anything is written, so a mistake in the files changes
    nothing. Users and groups that already exist are left as they are and reported as skipped:
    importing twice is harmless. A user document may carry a ``password``; a user without one
    gets a generated password, returned once in the report.
    """
    seed_groups = [_seed_group(i, d) for i, d in enumerate(_documents("groups", groups_json))]
    seed_users = [_seed_user(i, d) for i, d in enumerate(_documents("users", users_json))]
    _unique("groups", [g.group_name for g in seed_groups])
    _unique("users", [u.user_name for u in seed_users])
    known = {g.group_name for g in ctx.accounts.list_groups()} | {g.group_name for g in seed_groups}
    for u in seed_users:
        for name in u.groups:
            if name not in known:
                raise GroupNotFoundError(name)

    groups_created, groups_skipped = [], []
    for g in seed_groups:
        if ctx.accounts.get_group(g.group_name) is not None:
            groups_skipped.append(g.group_name)
            continue
        ctx.accounts.add_group(g.group_name, g.display_name, g.roles, g.devices)
        groups_created.append(g.group_name)

    users_created, users_skipped, passwords = [], [], {}
    for u in seed_users:
        if ctx.accounts.get_user(u.user_name) is not None:
            users_skipped.append(u.user_name)
            continue
        password = u.password if u.password is not None else generate_password()
        ctx.accounts.add_user(u.user_name, u.display_name, hash_password(password), u.attributes, u.groups)
        if u.disabled:
            ctx.accounts.update_user(u.user_name, disabled=True)
        if u.password is None:
            passwords[u.user_name] = password
        users_created.append(u.user_name)
    return SeedReport(
        tuple(groups_created), tuple(groups_skipped), tuple(users_created), tuple(users_skipped), passwords
    )
