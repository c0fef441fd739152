"""Storage of users, groups (roles, members, devices) and API keys, for SQLite and PostgreSQL.

Records out never carry a secret: password and API-key hashes are read only by the two methods
that exist to check them (:meth:`AccountStore.password_hash`, :meth:`AccountStore.get_api_key`).
The store trusts its input; validation happens in :mod:`iotvault.accounts` with the value
objects of :mod:`iotvault.domain.accounts`.

Memberships and a group's devices are removed in the same transaction as their user or group
rather than left to ``ON DELETE CASCADE``: SQLite enforces foreign keys only when asked to per
connection, and the behaviour must not depend on the database.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, or_, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from iotvault.clock import now_us
from iotvault.domain.accounts import Roles
from iotvault.errors import NotFoundError, StorageError
from iotvault.storage.db import EngineStore
from iotvault.storage.schema import api_keys, group_devices, group_members, user_groups, users

# An API key's last use is recorded at most once a minute: a busy key must not turn every
# read into a write.
TOUCH_INTERVAL_US = 60_000_000


# ---- errors ----------------------------------------------------------------------------
class UserExistsError(StorageError):
    def __init__(self, user_name: str) -> None:
        self.user_name = user_name
        super().__init__(f"user {user_name!r} already exists")


class UserNotFoundError(StorageError, NotFoundError):
    def __init__(self, user_name: str) -> None:
        self.user_name = user_name
        super().__init__(f"user {user_name!r} does not exist")


class GroupExistsError(StorageError):
    def __init__(self, group_name: str) -> None:
        self.group_name = group_name
        super().__init__(f"group {group_name!r} already exists")


class GroupNotFoundError(StorageError, NotFoundError):
    def __init__(self, group_name: str) -> None:
        self.group_name = group_name
        super().__init__(f"group {group_name!r} does not exist")


class ApiKeyExistsError(StorageError):
    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"API key {key!r} already exists")


class ApiKeyNotFoundError(StorageError, NotFoundError):
    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"API key {key!r} does not exist")


# ---- records ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UserRecord:
    user_name: str
    display_name: str
    attributes: Mapping[str, str]
    disabled: bool
    groups: tuple[str, ...]  # sorted
    created_us: int


@dataclass(frozen=True, slots=True)
class GroupRecord:
    group_name: str
    display_name: str
    roles: Roles
    devices: tuple[str, ...]  # sorted
    members: tuple[str, ...]  # sorted


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    key: str  # the public id; the password is kept only as a hash
    description: str
    roles: Roles
    devices: tuple[str, ...]
    groups: tuple[str, ...]
    expires_us: int | None
    last_used_us: int | None
    revoked_us: int | None
    created_by: str
    created_us: int


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _roles(row: Row[Any]) -> Roles:
    return Roles(admin=bool(row.role_admin), reader=bool(row.role_reader), writer=bool(row.role_writer))


def _role_values(roles: Roles) -> dict[str, bool]:
    return {"role_admin": roles.admin, "role_reader": roles.reader, "role_writer": roles.writer}


def _api_key(row: Row[Any]) -> ApiKeyRecord:
    return ApiKeyRecord(
        key=row.key,
        description=row.description,
        roles=_roles(row),
        devices=tuple(json.loads(row.devices or "[]")),
        groups=tuple(json.loads(row.groups or "[]")),
        expires_us=row.expires_us,
        last_used_us=row.last_used_us,
        revoked_us=row.revoked_us,
        created_by=row.created_by,
        created_us=row.created_us,
    )


_API_KEY_COLUMNS = [c for c in api_keys.c if c.name != "password_hash"]


class AccountStore(EngineStore):
    """Users, groups and API keys on one SQLAlchemy engine (the one :class:`SqlStore` uses).

    Every committed transaction here changes who may do what, except :meth:`touch_api_key`:
    each calls :meth:`~iotvault.storage.db.EngineStore.access_changed`.
    """

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        with super().begin() as conn:
            yield conn
        self.access_changed()

    # ---- helpers -----------------------------------------------------------------------
    @staticmethod
    def _user_exists(conn: Connection, user_name: str) -> bool:
        q = select(users.c.user_name).where(users.c.user_name == user_name)
        return conn.execute(q).first() is not None

    @staticmethod
    def _group_exists(conn: Connection, group_name: str) -> bool:
        q = select(user_groups.c.group_name).where(user_groups.c.group_name == group_name)
        return conn.execute(q).first() is not None

    @staticmethod
    def _require_groups(conn: Connection, names: Iterable[str]) -> None:
        wanted = set(names)
        if not wanted:
            return
        found = set(
            conn.execute(
                select(user_groups.c.group_name).where(user_groups.c.group_name.in_(wanted))
            ).scalars()
        )
        for missing in sorted(wanted - found):
            raise GroupNotFoundError(missing)

    @staticmethod
    def _groups(conn: Connection, group_rows: Sequence[Row[Any]]) -> list[GroupRecord]:
        names = [r.group_name for r in group_rows]
        if not names:
            return []
        devices: dict[str, list[str]] = defaultdict(list)
        for name, device_id in conn.execute(
            select(group_devices.c.group_name, group_devices.c.device_id)
            .where(group_devices.c.group_name.in_(names))
            .order_by(group_devices.c.device_id)
        ):
            devices[name].append(device_id)
        members: dict[str, list[str]] = defaultdict(list)
        for name, user_name in conn.execute(
            select(group_members.c.group_name, group_members.c.user_name)
            .where(group_members.c.group_name.in_(names))
            .order_by(group_members.c.user_name)
        ):
            members[name].append(user_name)
        return [
            GroupRecord(
                group_name=r.group_name,
                display_name=r.display_name,
                roles=_roles(r),
                devices=tuple(devices[r.group_name]),
                members=tuple(members[r.group_name]),
            )
            for r in group_rows
        ]

    @staticmethod
    def _strip_from_api_keys(conn: Connection, column: str, name: str) -> int:
        """Remove ``name`` from the JSON list ``column`` of every API key that holds it."""
        col = api_keys.c[column]
        rows = conn.execute(
            select(api_keys.c.key, col).where(col.contains(json.dumps(name), autoescape=True))
        ).all()
        changed = 0
        for key, raw in rows:
            values = json.loads(raw or "[]")
            if name in values:
                values = [v for v in values if v != name]
                conn.execute(update(api_keys).where(api_keys.c.key == key).values({column: _dumps(values)}))
                changed += 1
        return changed

    # ---- users -------------------------------------------------------------------------
    def add_user(
        self,
        user_name: str,
        display_name: str,
        password_hash: str,
        attributes: Mapping[str, str],
        groups: Iterable[str] = (),
        *,
        at_us: int | None = None,
    ) -> None:
        """Create a user, member of ``groups`` (all of which must exist), in one transaction."""
        at = now_us() if at_us is None else at_us
        group_names = sorted(set(groups))
        try:
            with self.begin() as conn:
                conn.execute(
                    insert(users).values(
                        user_name=user_name,
                        display_name=display_name,
                        password_hash=password_hash,
                        attributes=_dumps(dict(attributes)),
                        disabled=False,
                        created_us=at,
                        updated_us=at,
                    )
                )
                self._require_groups(conn, group_names)
                if group_names:
                    conn.execute(
                        insert(group_members),
                        [{"group_name": g, "user_name": user_name} for g in group_names],
                    )
        except IntegrityError:
            raise UserExistsError(user_name) from None

    def get_user(self, user_name: str) -> UserRecord | None:
        with self.connect() as conn:
            row = conn.execute(select(users).where(users.c.user_name == user_name)).first()
            if row is None:
                return None
            groups = conn.execute(
                select(group_members.c.group_name)
                .where(group_members.c.user_name == user_name)
                .order_by(group_members.c.group_name)
            ).scalars()
            return self._user(row, tuple(groups))

    @staticmethod
    def _user(row: Row[Any], groups: tuple[str, ...]) -> UserRecord:
        return UserRecord(
            user_name=row.user_name,
            display_name=row.display_name,
            attributes=json.loads(row.attributes or "{}"),
            disabled=bool(row.disabled),
            groups=groups,
            created_us=row.created_us,
        )

    def password_hash(self, user_name: str) -> str | None:
        """The stored password hash, or None for an unknown user (to be checked, not shown)."""
        with self.connect() as conn:
            return conn.execute(
                select(users.c.password_hash).where(users.c.user_name == user_name)
            ).scalar_one_or_none()

    def list_users(self) -> list[UserRecord]:
        with self.connect() as conn:
            rows = conn.execute(select(users).order_by(users.c.user_name)).all()
            memberships: dict[str, list[str]] = defaultdict(list)
            for group_name, user_name in conn.execute(
                select(group_members.c.group_name, group_members.c.user_name).order_by(
                    group_members.c.group_name
                )
            ):
                memberships[user_name].append(group_name)
        return [self._user(r, tuple(memberships[r.user_name])) for r in rows]

    def update_user(
        self,
        user_name: str,
        *,
        display_name: str | None = None,
        attributes: Mapping[str, str] | None = None,
        disabled: bool | None = None,
    ) -> None:
        """Change the given fields (``attributes`` replaces them all); UserNotFoundError if none."""
        values: dict[str, Any] = {"updated_us": now_us()}
        if display_name is not None:
            values["display_name"] = display_name
        if attributes is not None:
            values["attributes"] = _dumps(dict(attributes))
        if disabled is not None:
            values["disabled"] = disabled
        with self.begin() as conn:
            if not conn.execute(update(users).where(users.c.user_name == user_name).values(values)).rowcount:
                raise UserNotFoundError(user_name)

    def set_password_hash(self, user_name: str, password_hash: str) -> None:
        with self.begin() as conn:
            updated = conn.execute(
                update(users)
                .where(users.c.user_name == user_name)
                .values(password_hash=password_hash, updated_us=now_us())
            ).rowcount
            if not updated:
                raise UserNotFoundError(user_name)

    def delete_user(self, user_name: str) -> bool:
        """Delete a user and its memberships; False if there was no such user."""
        with self.begin() as conn:
            conn.execute(delete(group_members).where(group_members.c.user_name == user_name))
            return bool(conn.execute(delete(users).where(users.c.user_name == user_name)).rowcount)

    # ---- groups ------------------------------------------------------------------------
    def add_group(
        self,
        group_name: str,
        display_name: str,
        roles: Roles,
        devices: Iterable[str] = (),
        *,
        at_us: int | None = None,
    ) -> None:
        device_ids = sorted(set(devices))
        try:
            with self.begin() as conn:
                conn.execute(
                    insert(user_groups).values(
                        group_name=group_name,
                        display_name=display_name,
                        created_us=now_us() if at_us is None else at_us,
                        **_role_values(roles),
                    )
                )
                if device_ids:
                    conn.execute(
                        insert(group_devices),
                        [{"group_name": group_name, "device_id": d} for d in device_ids],
                    )
        except IntegrityError:
            raise GroupExistsError(group_name) from None

    def get_group(self, group_name: str) -> GroupRecord | None:
        with self.connect() as conn:
            row = conn.execute(select(user_groups).where(user_groups.c.group_name == group_name)).first()
            return self._groups(conn, [row])[0] if row is not None else None

    def list_groups(self) -> list[GroupRecord]:
        with self.connect() as conn:
            rows = conn.execute(select(user_groups).order_by(user_groups.c.group_name)).all()
            return self._groups(conn, rows)

    def update_group(
        self,
        group_name: str,
        *,
        display_name: str | None = None,
        roles: Roles | None = None,
        devices: Iterable[str] | None = None,
    ) -> None:
        """Change the given fields (``devices`` replaces the list); GroupNotFoundError if none."""
        values: dict[str, Any] = {}
        if display_name is not None:
            values["display_name"] = display_name
        if roles is not None:
            values.update(_role_values(roles))
        with self.begin() as conn:
            if not self._group_exists(conn, group_name):
                raise GroupNotFoundError(group_name)
            if values:
                conn.execute(update(user_groups).where(user_groups.c.group_name == group_name).values(values))
            if devices is not None:
                conn.execute(delete(group_devices).where(group_devices.c.group_name == group_name))
                device_ids = sorted(set(devices))
                if device_ids:
                    conn.execute(
                        insert(group_devices),
                        [{"group_name": group_name, "device_id": d} for d in device_ids],
                    )

    def delete_group(self, group_name: str) -> bool:
        """Delete a group, its memberships and device grants, and its name from API keys."""
        with self.begin() as conn:
            conn.execute(delete(group_members).where(group_members.c.group_name == group_name))
            conn.execute(delete(group_devices).where(group_devices.c.group_name == group_name))
            # a later group of the same name must not inherit the keys that named this one
            self._strip_from_api_keys(conn, "groups", group_name)
            return bool(
                conn.execute(delete(user_groups).where(user_groups.c.group_name == group_name)).rowcount
            )

    def add_member(self, group_name: str, user_name: str) -> bool:
        """Make ``user_name`` a member of ``group_name``; False if it already was."""
        try:
            with self.begin() as conn:
                if not self._group_exists(conn, group_name):
                    raise GroupNotFoundError(group_name)
                if not self._user_exists(conn, user_name):
                    raise UserNotFoundError(user_name)
                exists = conn.execute(
                    select(group_members.c.user_name).where(
                        group_members.c.group_name == group_name, group_members.c.user_name == user_name
                    )
                ).first()
                if exists is not None:
                    return False
                conn.execute(insert(group_members).values(group_name=group_name, user_name=user_name))
                return True
        except IntegrityError:  # a concurrent add of the same membership won the race
            return False

    def remove_member(self, group_name: str, user_name: str) -> bool:
        """False if ``user_name`` was not a member (GroupNotFoundError if no such group)."""
        with self.begin() as conn:
            if not self._group_exists(conn, group_name):
                raise GroupNotFoundError(group_name)
            return bool(
                conn.execute(
                    delete(group_members).where(
                        group_members.c.group_name == group_name, group_members.c.user_name == user_name
                    )
                ).rowcount
            )

    def add_group_device(self, group_name: str, device_id: str) -> bool:
        """Grant ``group_name``'s roles on ``device_id``; False if it already had them."""
        try:
            with self.begin() as conn:
                if not self._group_exists(conn, group_name):
                    raise GroupNotFoundError(group_name)
                exists = conn.execute(
                    select(group_devices.c.device_id).where(
                        group_devices.c.group_name == group_name, group_devices.c.device_id == device_id
                    )
                ).first()
                if exists is not None:
                    return False
                conn.execute(insert(group_devices).values(group_name=group_name, device_id=device_id))
                return True
        except IntegrityError:
            return False

    def remove_group_device(self, group_name: str, device_id: str) -> bool:
        with self.begin() as conn:
            if not self._group_exists(conn, group_name):
                raise GroupNotFoundError(group_name)
            return bool(
                conn.execute(
                    delete(group_devices).where(
                        group_devices.c.group_name == group_name, group_devices.c.device_id == device_id
                    )
                ).rowcount
            )

    def groups_of_user(self, user_name: str) -> list[GroupRecord]:
        """The groups ``user_name`` belongs to, by name: what its rights are the union of."""
        with self.connect() as conn:
            rows = conn.execute(
                select(user_groups)
                .join(group_members, group_members.c.group_name == user_groups.c.group_name)
                .where(group_members.c.user_name == user_name)
                .order_by(user_groups.c.group_name)
            ).all()
            return self._groups(conn, rows)

    def groups_named(self, group_names: Iterable[str]) -> list[GroupRecord]:
        """The existing groups among ``group_names`` (an API key's or an external token's)."""
        names = sorted(set(group_names))
        if not names:
            return []
        with self.connect() as conn:
            rows = conn.execute(
                select(user_groups)
                .where(user_groups.c.group_name.in_(names))
                .order_by(user_groups.c.group_name)
            ).all()
            return self._groups(conn, rows)

    def groups_granting(self, device_id: str) -> list[GroupRecord]:
        """The groups whose device list names ``device_id``."""
        with self.connect() as conn:
            rows = conn.execute(
                select(user_groups)
                .join(group_devices, group_devices.c.group_name == user_groups.c.group_name)
                .where(group_devices.c.device_id == device_id)
                .order_by(user_groups.c.group_name)
            ).all()
            return self._groups(conn, rows)

    def forget_device(self, device_id: str) -> None:
        """Remove ``device_id`` from every group and API key, so a later device of the same id
        inherits no grant. (SqlStore.delete_device also drops the group rows with the device.)"""
        with self.begin() as conn:
            conn.execute(delete(group_devices).where(group_devices.c.device_id == device_id))
            self._strip_from_api_keys(conn, "devices", device_id)

    # ---- API keys ----------------------------------------------------------------------
    def add_api_key(self, record: ApiKeyRecord, password_hash: str) -> None:
        try:
            with self.begin() as conn:
                conn.execute(
                    insert(api_keys).values(
                        key=record.key,
                        password_hash=password_hash,
                        description=record.description,
                        devices=_dumps(list(record.devices)),
                        groups=_dumps(list(record.groups)),
                        expires_us=record.expires_us,
                        last_used_us=record.last_used_us,
                        revoked_us=record.revoked_us,
                        created_by=record.created_by,
                        created_us=record.created_us,
                        **_role_values(record.roles),
                    )
                )
        except IntegrityError:
            raise ApiKeyExistsError(record.key) from None

    def get_api_key(self, key: str) -> tuple[ApiKeyRecord, str] | None:
        """The key's record and its password hash (to check, never to show), or None."""
        row = self.first(select(api_keys).where(api_keys.c.key == key))
        return (_api_key(row), row.password_hash) if row is not None else None

    def list_api_keys(self) -> list[ApiKeyRecord]:
        with self.connect() as conn:
            rows = conn.execute(
                select(*_API_KEY_COLUMNS).order_by(api_keys.c.created_us, api_keys.c.key)
            ).all()
        return [_api_key(r) for r in rows]

    def revoke_api_key(self, key: str, at_us: int) -> bool:
        """Revoke a key (once: a second revocation keeps the first time); False if unknown."""
        with self.begin() as conn:
            if conn.execute(
                update(api_keys)
                .where(api_keys.c.key == key, api_keys.c.revoked_us.is_(None))
                .values(revoked_us=at_us)
            ).rowcount:
                return True
            return conn.execute(select(api_keys.c.key).where(api_keys.c.key == key)).first() is not None

    def touch_api_key(self, key: str, at_us: int) -> bool:
        """Record a use at ``at_us``, at most once a minute; True if the row was written."""
        with EngineStore.begin(self) as conn:  # a use changes nobody's access
            return bool(
                conn.execute(
                    update(api_keys)
                    .where(
                        api_keys.c.key == key,
                        or_(
                            api_keys.c.last_used_us.is_(None),
                            api_keys.c.last_used_us < at_us - TOUCH_INTERVAL_US,
                        ),
                    )
                    .values(last_used_us=at_us)
                ).rowcount
            )
