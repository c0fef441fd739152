"""Users, groups and API keys on real SQLite and PostgreSQL: store, services and the command line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from argon2 import PasswordHasher
from sqlalchemy import inspect, select, text
from typer.testing import CliRunner

from iotvault import accounts
from iotvault.cli.main import app
from iotvault.clock import now_us
from iotvault.config import Settings, load_settings
from iotvault.context import Context, context
from iotvault.devices import delete_device, register_device
from iotvault.domain.accounts import Roles
from iotvault.errors import ValidationError
from iotvault.storage import migrate
from iotvault.storage.accounts import (
    TOUCH_INTERVAL_US,
    ApiKeyNotFoundError,
    ApiKeyRecord,
    GroupExistsError,
    GroupNotFoundError,
    UserExistsError,
    UserNotFoundError,
)
from iotvault.storage.db import create_db_engine
from iotvault.storage.schema import metadata, users

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MINUTE_US = 60_000_000
DAY_US = 86_400 * 1_000_000


def _env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return {"IOTVAULT_DATA_DIR": str(tmp_path / "data"), "IOTVAULT_DATABASE_URL": database_url}


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return load_settings(environ=_env(tmp_path, database_url))


@pytest.fixture
def ctx(settings: Settings) -> Iterator[Context]:
    with context(settings) as c:
        yield c


# ---- schema --------------------------------------------------------------------------
def test_migration_matches_the_table_definitions(database_url: str) -> None:
    engine = create_db_engine(database_url)
    try:
        migrate.upgrade(engine, "0001")
        assert migrate.current_revision(engine) == "0001"
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
        assert {"users", "user_groups", "group_members", "group_devices", "api_keys"} <= set(
            inspect(engine).get_table_names()
        )
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
    finally:
        engine.dispose()


# ---- users ---------------------------------------------------------------------------
def test_user_lifecycle(ctx: Context) -> None:
    accounts.create_group(ctx, "readers", "Readers", roles=Roles(reader=True), devices=["d1"])
    password = accounts.create_user(
        ctx,
        "alice@example.com",
        "Alice",
        attributes={"Language": "en", "Country": "NZ", "emailAddress": "alice@example.com"},
        groups=["readers"],
    )
    assert len(password) == 24
    user = ctx.accounts.get_user("alice@example.com")
    assert user is not None
    assert user.display_name == "Alice"
    assert dict(user.attributes) == {"Language": "en", "Country": "NZ", "emailAddress": "alice@example.com"}
    assert user.groups == ("readers",)
    assert not user.disabled
    assert user.created_us > 0

    given = accounts.create_user(ctx, "bob", None, password="bob's long password")
    assert given == "bob's long password"
    bob = ctx.accounts.get_user("bob")
    assert bob is not None
    assert bob.display_name == "bob"
    assert bob.groups == ()
    assert [u.user_name for u in ctx.accounts.list_users()] == ["alice@example.com", "bob"]

    with pytest.raises(UserExistsError) as exists:
        accounts.create_user(ctx, "bob", "Bob again")
    assert exists.value.user_name == "bob"
    with pytest.raises(GroupNotFoundError) as missing:
        accounts.create_user(ctx, "carol", "Carol", groups=["readers", "nope"])
    assert missing.value.group_name == "nope"
    assert ctx.accounts.get_user("carol") is None  # one transaction: nothing half-made
    with pytest.raises(ValidationError):
        accounts.create_user(ctx, "carol", "Carol", password="short")
    with pytest.raises(ValidationError):
        accounts.create_user(ctx, "carol/x", "Carol")
    with pytest.raises(ValidationError):
        accounts.create_user(ctx, "carol", "Carol", attributes={"k": 1})  # type: ignore[dict-item]

    updated = accounts.update_user(ctx, "bob", display_name="Bob B.", attributes={"Country": "FR"})
    assert (updated.display_name, dict(updated.attributes)) == ("Bob B.", {"Country": "FR"})
    assert accounts.update_user(ctx, "bob", disabled=True).disabled
    with pytest.raises(UserNotFoundError):
        accounts.update_user(ctx, "nobody", disabled=True)

    accounts.delete_user(ctx, "alice@example.com")
    assert ctx.accounts.get_user("alice@example.com") is None
    readers = ctx.accounts.get_group("readers")
    assert readers is not None
    assert readers.members == ()
    with pytest.raises(UserNotFoundError):
        accounts.delete_user(ctx, "alice@example.com")


def test_authenticate(ctx: Context) -> None:
    accounts.create_user(ctx, "alice", "Alice", password="correct horse battery")
    user = accounts.authenticate(ctx, "alice", "correct horse battery")
    assert user is not None
    assert user.user_name == "alice"
    assert accounts.authenticate(ctx, "alice", "correct horse batterY") is None
    assert accounts.authenticate(ctx, "nobody", "correct horse battery") is None
    assert accounts.authenticate(ctx, "bad/name\x00", "correct horse battery") is None
    assert accounts.authenticate(ctx, "x" * 500, "correct horse battery") is None

    accounts.update_user(ctx, "alice", disabled=True)
    assert accounts.authenticate(ctx, "alice", "correct horse battery") is None
    accounts.update_user(ctx, "alice", disabled=False)
    assert accounts.authenticate(ctx, "alice", "correct horse battery") is not None

    new = accounts.reset_password(ctx, "alice")
    assert accounts.authenticate(ctx, "alice", "correct horse battery") is None
    assert accounts.authenticate(ctx, "alice", new) is not None
    accounts.set_password(ctx, "alice", "another long password")
    assert accounts.authenticate(ctx, "alice", "another long password") is not None
    with pytest.raises(UserNotFoundError):
        accounts.reset_password(ctx, "nobody")


def test_a_hash_with_old_parameters_is_upgraded_at_login(ctx: Context) -> None:
    accounts.create_user(ctx, "old", "Old", password="an old password")
    weak = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash("an old password")
    ctx.accounts.set_password_hash("old", weak)
    assert accounts.authenticate(ctx, "old", "an old password") is not None
    stored = ctx.accounts.password_hash("old")
    assert stored is not None
    assert stored != weak
    assert "m=65536,t=2,p=1" in stored
    assert accounts.authenticate(ctx, "old", "an old password") is not None


def test_a_corrupt_hash_fails_the_login_without_an_error(ctx: Context) -> None:
    accounts.create_user(ctx, "corrupt", "C", password="a fine password")
    ctx.accounts.set_password_hash("corrupt", "$argon2id$nonsense")
    assert accounts.authenticate(ctx, "corrupt", "a fine password") is None


# ---- groups --------------------------------------------------------------------------
def test_groups_members_and_devices(ctx: Context) -> None:
    for name in ("alice", "bob"):
        accounts.create_user(ctx, name, name.title())
    ops = accounts.create_group(
        ctx, "ops", "Operations", roles=Roles(reader=True, writer=True), devices=["d2", "d1", "d1"]
    )
    assert (ops.group_name, ops.display_name, ops.devices, ops.members) == (
        "ops",
        "Operations",
        ("d1", "d2"),
        (),
    )
    assert ops.roles == Roles(reader=True, writer=True)
    accounts.create_group(ctx, "admins", None, roles=Roles(admin=True))
    with pytest.raises(GroupExistsError) as exists:
        accounts.create_group(ctx, "ops")
    assert exists.value.group_name == "ops"
    with pytest.raises(ValidationError):
        accounts.create_group(ctx, "bad", devices=["d/1"])

    assert accounts.add_member(ctx, "ops", "alice")
    assert not accounts.add_member(ctx, "ops", "alice")  # already
    assert accounts.add_member(ctx, "admins", "alice")
    assert accounts.add_member(ctx, "ops", "bob")
    with pytest.raises(UserNotFoundError):
        accounts.add_member(ctx, "ops", "nobody")
    with pytest.raises(GroupNotFoundError):
        accounts.add_member(ctx, "nogroup", "alice")

    assert [g.group_name for g in ctx.accounts.groups_of_user("alice")] == ["admins", "ops"]
    assert ctx.accounts.groups_of_user("nobody") == []
    alice = ctx.accounts.get_user("alice")
    assert alice is not None
    assert alice.groups == ("admins", "ops")
    assert {u.user_name: u.groups for u in ctx.accounts.list_users()} == {
        "alice": ("admins", "ops"),
        "bob": ("ops",),
    }
    group = ctx.accounts.get_group("ops")
    assert group is not None
    assert group.members == ("alice", "bob")

    assert accounts.add_group_device(ctx, "ops", "d3")
    assert not accounts.add_group_device(ctx, "ops", "d3")
    assert accounts.remove_group_device(ctx, "ops", "d1")
    assert not accounts.remove_group_device(ctx, "ops", "d1")
    assert [g.group_name for g in ctx.accounts.groups_granting("d3")] == ["ops"]
    assert ctx.accounts.groups_granting("d1") == []

    changed = accounts.update_group(ctx, "ops", display_name="Ops", roles=Roles(reader=True), devices=["d9"])
    assert (changed.display_name, changed.roles, changed.devices) == ("Ops", Roles(reader=True), ("d9",))
    assert changed.members == ("alice", "bob")  # untouched
    with pytest.raises(GroupNotFoundError):
        accounts.update_group(ctx, "nogroup", roles=Roles())

    assert accounts.remove_member(ctx, "ops", "bob")
    assert not accounts.remove_member(ctx, "ops", "bob")
    assert [g.group_name for g in ctx.accounts.list_groups()] == ["admins", "ops"]

    accounts.delete_group(ctx, "ops")
    assert ctx.accounts.get_group("ops") is None
    assert [g.group_name for g in ctx.accounts.groups_of_user("alice")] == ["admins"]
    assert ctx.accounts.groups_granting("d9") == []
    with pytest.raises(GroupNotFoundError):
        accounts.delete_group(ctx, "ops")
    # a new group of the same name starts empty
    assert accounts.create_group(ctx, "ops").members == ()


def test_deleting_a_device_removes_its_grants(ctx: Context) -> None:
    register_device(ctx, "t", "gone")
    register_device(ctx, "t", "kept")
    accounts.create_group(ctx, "g", roles=Roles(reader=True), devices=["gone", "kept"])
    key = accounts.create_api_key(ctx, roles=Roles(reader=True), devices=["gone", "kept"], created_by="test")
    delete_device(ctx, "gone")
    group = ctx.accounts.get_group("g")
    assert group is not None
    assert group.devices == ("kept",)
    found = ctx.accounts.get_api_key(key.key)
    assert found is not None
    assert found[0].devices == ("kept",)
    # a device registered later under the same id inherits nothing
    register_device(ctx, "t", "gone")
    assert ctx.accounts.groups_granting("gone") == []


# ---- API keys ------------------------------------------------------------------------
def test_api_keys(ctx: Context) -> None:
    accounts.create_group(ctx, "readers", roles=Roles(reader=True), devices=["d1"])
    new = accounts.create_api_key(
        ctx,
        roles=Roles(reader=True),
        devices=["d2"],
        groups=["readers"],
        expires_us=None,
        description="a dashboard",
        created_by="cli",
    )
    key, password = new
    assert key.startswith("k-")
    assert len(key) == 22
    assert len(password) >= 43
    record, stored = ctx.accounts.get_api_key(key) or (None, "")
    assert record is not None
    assert stored.startswith("sha256$")
    assert password not in stored
    assert (record.roles, record.devices, record.groups) == (Roles(reader=True), ("d2",), ("readers",))
    assert (record.description, record.created_by, record.last_used_us, record.revoked_us) == (
        "a dashboard",
        "cli",
        None,
        None,
    )

    t0 = now_us()
    ok = accounts.verify_api_key(ctx, key, password, t0)
    assert ok is not None
    assert ok.key == key
    assert ok.last_used_us == t0
    assert [k.last_used_us for k in ctx.accounts.list_api_keys()] == [t0]
    # within a minute: no write; after it: one
    assert accounts.verify_api_key(ctx, key, password, t0 + 30_000_000) is not None
    assert ctx.accounts.list_api_keys()[0].last_used_us == t0
    later = t0 + TOUCH_INTERVAL_US + 1
    assert accounts.verify_api_key(ctx, key, password, later) is not None
    assert ctx.accounts.list_api_keys()[0].last_used_us == later

    assert accounts.verify_api_key(ctx, key, password + "x", t0) is None
    assert accounts.verify_api_key(ctx, key, "", t0) is None
    assert accounts.verify_api_key(ctx, "k-" + "A" * 20, password, t0) is None  # unknown
    assert accounts.verify_api_key(ctx, "k-\x00" + "A" * 19, password, t0) is None  # hostile
    assert accounts.verify_api_key(ctx, "", password, t0) is None

    accounts.revoke_api_key(ctx, key, t0 + 5)
    assert accounts.verify_api_key(ctx, key, password, later + MINUTE_US) is None
    accounts.revoke_api_key(ctx, key, t0 + 99)  # a second revocation keeps the first time
    assert ctx.accounts.list_api_keys()[0].revoked_us == t0 + 5
    with pytest.raises(ApiKeyNotFoundError):
        accounts.revoke_api_key(ctx, "k-" + "B" * 20)
    with pytest.raises(ApiKeyNotFoundError):
        accounts.revoke_api_key(ctx, "not a key")


def test_api_key_expiry_and_validation(ctx: Context) -> None:
    t0 = now_us()
    new = accounts.create_api_key(ctx, roles=Roles(writer=True), expires_us=t0 + DAY_US, created_by="cli")
    assert accounts.verify_api_key(ctx, new.key, new.password, t0 + DAY_US - 1) is not None
    assert accounts.verify_api_key(ctx, new.key, new.password, t0 + DAY_US) is None
    with pytest.raises(ValidationError):
        accounts.create_api_key(ctx, roles=Roles(), created_by="cli")
    with pytest.raises(ValidationError):
        accounts.create_api_key(ctx, roles=Roles(reader=True), expires_us=t0 - 1, created_by="cli")
    with pytest.raises(GroupNotFoundError):
        accounts.create_api_key(ctx, roles=Roles(reader=True), groups=["nope"], created_by="cli")
    with pytest.raises(ValidationError):
        accounts.create_api_key(ctx, roles=Roles(reader=True), devices=["a/b"], created_by="cli")


def test_deleting_a_group_removes_it_from_api_keys(ctx: Context) -> None:
    accounts.create_group(ctx, "g1", roles=Roles(reader=True), devices=["d1"])
    accounts.create_group(ctx, "g_1", roles=Roles(reader=True), devices=["d2"])  # LIKE's "_" is escaped
    new = accounts.create_api_key(ctx, roles=Roles(reader=True), groups=["g1", "g_1"], created_by="cli")
    accounts.delete_group(ctx, "g1")
    found = ctx.accounts.get_api_key(new.key)
    assert found is not None
    assert found[0].groups == ("g_1",)
    accounts.create_group(ctx, "g1", roles=Roles(reader=True, writer=True), devices=["d1"])
    found = ctx.accounts.get_api_key(new.key)
    assert found is not None
    assert found[0].groups == ("g_1",)  # the new g1 is not the old one


def test_store_round_trips_a_record(ctx: Context) -> None:
    record = ApiKeyRecord(
        key="k-" + "C" * 20,
        description="",
        roles=Roles(admin=True),
        devices=(),
        groups=(),
        expires_us=123,
        last_used_us=None,
        revoked_us=None,
        created_by="someone",
        created_us=1,
    )
    ctx.accounts.add_api_key(record, "sha256$" + "0" * 64)
    assert ctx.accounts.get_api_key(record.key) == (record, "sha256$" + "0" * 64)
    assert ctx.accounts.list_api_keys() == [record]
    assert ctx.accounts.touch_api_key(record.key, 10)
    assert not ctx.accounts.touch_api_key(record.key, 20)
    assert ctx.accounts.list_api_keys() == [replace(record, last_used_us=10)]


# ---- secrets at rest -----------------------------------------------------------------
def _all_rows_text(ctx: Context) -> str:
    parts = []
    with ctx.engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(select(table)):
                parts.append(repr(tuple(row)))
    return "\n".join(parts)


def test_secrets_are_never_stored_in_plaintext(ctx: Context, settings: Settings, database_url: str) -> None:
    accounts.create_group(ctx, "g", roles=Roles(reader=True))
    generated = accounts.create_user(ctx, "gen", "Gen", groups=["g"])
    chosen = "my chosen pass phrase"
    accounts.create_user(ctx, "chosen", "Chosen", password=chosen)
    reset = accounts.reset_password(ctx, "gen")
    key = accounts.create_api_key(ctx, roles=Roles(reader=True), groups=["g"], created_by="cli")
    secrets = [generated, chosen, reset, key.password]

    rows = _all_rows_text(ctx)
    assert key.key in rows  # the public id is stored, and the scan sees the tables
    for secret in secrets:
        assert secret not in rows
    with ctx.engine.connect() as conn:
        hashes = list(conn.execute(select(users.c.password_hash)).scalars())
    assert all(h.startswith("$argon2id$") for h in hashes)

    if database_url.startswith("sqlite"):
        ctx.engine.dispose()
        raw = b"".join(p.read_bytes() for p in (settings.data_dir).glob("iotvault.db*"))
        assert b"k-" in raw
        for secret in secrets:
            assert secret.encode() not in raw
    else:
        dumped: list[str] = []
        with ctx.engine.connect() as conn:
            for table in metadata.sorted_tables:
                query = text(f"SELECT row_to_json(t)::text FROM {table.name} t")  # noqa: S608 - our names
                dumped += conn.execute(query).scalars()
        assert any(key.key in row for row in dumped)
        for secret in secrets:
            assert not any(secret in row for row in dumped)


# ---- seed import ---------------------------------------------------------------------
SEED_GROUPS: list[dict[str, Any]] = [
    {
        "_id": "g-admins",
        "_rev": "1-abc",
        "type": "userGroup",
        "groupName": "admins",
        "displayName": "Administrators",
        "roleAdmin": "true",
        "roleReader": "false",
        "roleWriter": "false",
        "devices": [],
    },
    {
        "groupName": "field",
        "displayName": "Field team",
        "roleAdmin": False,
        "roleReader": True,
        "roleWriter": "true",
        "devices": ["thermo-1", "thermo-2"],
    },
]
SEED_USERS: list[dict[str, Any]] = [
    {
        "userName": "admin",
        "displayName": "The administrator",
        "attributes": {"Language": "en", "Country": "US", "emailAddress": "admin@example.com"},
        "groups": ["admins"],
    },
    {
        "userName": "tech@example.com",
        "displayName": "A technician",
        "attributes": {},
        "groups": ["field"],
        "password": "seeded password 1",
    },
]


def test_import_seed(ctx: Context) -> None:
    report = accounts.import_seed(ctx, {"docs": SEED_USERS}, json.dumps(SEED_GROUPS))
    assert report.groups_created == ("admins", "field")
    assert report.users_created == ("admin", "tech@example.com")
    assert set(report.passwords) == {"admin"}
    admins, field = ctx.accounts.get_group("admins"), ctx.accounts.get_group("field")
    assert admins is not None
    assert field is not None
    assert (admins.roles, admins.display_name, admins.members) == (
        Roles(admin=True),
        "Administrators",
        ("admin",),
    )
    assert (field.roles, field.devices) == (Roles(reader=True, writer=True), ("thermo-1", "thermo-2"))
    assert accounts.authenticate(ctx, "admin", report.passwords["admin"]) is not None
    tech = accounts.authenticate(ctx, "tech@example.com", "seeded password 1")
    assert tech is not None
    assert tech.groups == ("field",)
    admin = ctx.accounts.get_user("admin")
    assert admin is not None
    assert admin.attributes["emailAddress"] == "admin@example.com"

    again = accounts.import_seed(ctx, SEED_USERS, SEED_GROUPS)
    assert (again.groups_created, again.users_created, dict(again.passwords)) == ((), (), {})
    assert again.groups_skipped == ("admins", "field")
    assert again.users_skipped == ("admin", "tech@example.com")


@pytest.mark.parametrize(
    ("users_doc", "groups_doc", "error"),
    [
        ([{"userName": "u", "groups": ["missing"]}], [], GroupNotFoundError),
        ([{"userName": "u/1"}], [], ValidationError),
        ([{"userName": "u", "roleAdmin": True}], [], ValidationError),  # unknown field
        ([{"userName": "u", "password": "short"}], [], ValidationError),
        ([{"userName": "u"}, {"userName": "u"}], [], ValidationError),
        ([], [{"groupName": "g", "roleAdmin": "yes"}], ValidationError),
        ([], [{"groupName": "g", "devices": "thermo-1"}], ValidationError),
        ([], "not json", ValidationError),
        ([], 42, ValidationError),
    ],
)
def test_a_bad_seed_changes_nothing(
    ctx: Context, users_doc: Any, groups_doc: Any, error: type[Exception]
) -> None:
    good_group = [{"groupName": "ok", "roleReader": True}]
    groups = [*groups_doc, *good_group] if isinstance(groups_doc, list) else groups_doc
    with pytest.raises(error):
        accounts.import_seed(ctx, [*users_doc, {"userName": "fine"}], groups)
    assert ctx.accounts.list_users() == []
    assert ctx.accounts.list_groups() == []


# ---- command line --------------------------------------------------------------------
def _cli(env: dict[str, str], *args: str, input_text: str | None = None) -> Any:
    result = CliRunner().invoke(app, list(args), env=env, input=input_text)
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result


def test_cli_help() -> None:
    for args in (
        ["users"],
        ["users", "add"],
        ["users", "set-password"],
        ["groups"],
        ["groups", "add"],
        ["groups", "set-roles"],
        ["apikeys"],
        ["apikeys", "add"],
        ["seed", "import"],
    ):
        result = CliRunner().invoke(app, [*args, "--help"])
        assert result.exit_code == 0, (args, result.output)
        assert "Usage" in result.output


def test_cli_users_groups_and_keys(tmp_path: Path, database_url: str) -> None:
    env = _env(tmp_path, database_url)
    added = _cli(env, "groups", "add", "field", "--reader", "-d", "t1", "-d", "t2", "--json")
    group = json.loads(added.stdout)
    # naming devices before they are registered is allowed, and warned about (a typo looks the same)
    assert "device 't1' is not registered" in added.stderr
    assert "device 't2' is not registered" in added.stderr
    assert (group["roleReader"], group["roleWriter"], group["devices"]) == (True, False, ["t1", "t2"])
    _cli(env, "groups", "add", "admins", "--admin", "--display-name", "Admins")

    added = json.loads(
        _cli(
            env,
            "users",
            "add",
            "alice",
            "--group",
            "field",
            "-a",
            "Language=en",
            "-a",
            "Country=NZ",
            "--json",
        ).output
    )
    generated = added["password"]
    assert added["groups"] == ["field"]
    assert added["attributes"] == {"Language": "en", "Country": "NZ"}
    plain = _cli(env, "users", "add", "bob", "--password-stdin", input_text="bob's pass phrase\n").output
    assert "bob's pass phrase" not in plain
    assert "password" not in plain  # given, so not shown back

    listing = _cli(env, "users", "list", "--json").output
    assert generated not in listing
    assert [u["userName"] for u in json.loads(listing)] == ["alice", "bob"]
    assert "alice" in _cli(env, "users", "list").output

    settings = load_settings(environ=env)
    with context(settings) as ctx:
        assert accounts.authenticate(ctx, "alice", generated) is not None
        assert accounts.authenticate(ctx, "bob", "bob's pass phrase") is not None

    _cli(env, "users", "disable", "bob")
    with context(settings) as ctx:
        assert accounts.authenticate(ctx, "bob", "bob's pass phrase") is None
    _cli(env, "users", "enable", "bob")
    new_pw = json.loads(_cli(env, "users", "set-password", "bob", "--json").output)["password"]
    _cli(env, "users", "set-password", "alice", "--password-stdin", input_text="alice's new phrase\n")
    with context(settings) as ctx:
        assert accounts.authenticate(ctx, "bob", new_pw) is not None
        assert accounts.authenticate(ctx, "alice", "alice's new phrase") is not None

    _cli(env, "groups", "add-member", "admins", "bob")
    _cli(env, "groups", "add-device", "field", "t3")
    _cli(env, "groups", "remove-device", "field", "t1")
    _cli(env, "groups", "set-roles", "field", "--writer", "--no-reader")
    groups = {g["groupName"]: g for g in json.loads(_cli(env, "groups", "list", "--json").output)}
    assert groups["admins"]["members"] == ["bob"]
    assert groups["field"]["devices"] == ["t2", "t3"]
    assert (groups["field"]["roleReader"], groups["field"]["roleWriter"]) == (False, True)
    _cli(env, "groups", "remove-member", "admins", "bob")

    key = json.loads(
        _cli(
            env,
            "apikeys",
            "add",
            "--reader",
            "-g",
            "field",
            "--expires-in",
            "30",
            "--description",
            "x",
            "--json",
        ).output
    )
    assert key["key"].startswith("k-")
    assert key["createdBy"] == "cli"
    keys_out = _cli(env, "apikeys", "list", "--json").output
    assert key["password"] not in keys_out
    assert "sha256$" not in keys_out
    assert json.loads(keys_out)[0]["revoked"] is None
    with context(settings) as ctx:
        assert accounts.verify_api_key(ctx, key["key"], key["password"], now_us()) is not None
    _cli(env, "apikeys", "revoke", key["key"])
    assert json.loads(_cli(env, "apikeys", "list", "--json").output)[0]["revoked"] is not None
    with context(settings) as ctx:
        assert accounts.verify_api_key(ctx, key["key"], key["password"], now_us()) is None

    _cli(env, "users", "delete", "alice", "--yes")
    _cli(env, "groups", "delete", "admins", "--yes")
    assert [u["userName"] for u in json.loads(_cli(env, "users", "list", "--json").output)] == ["bob"]
    assert [g["groupName"] for g in json.loads(_cli(env, "groups", "list", "--json").output)] == ["field"]


def test_cli_errors_are_library_errors(tmp_path: Path) -> None:
    env = _env(tmp_path, f"sqlite:///{tmp_path / 'data' / 'iotvault.db'}")
    runner = CliRunner()
    result = runner.invoke(app, ["users", "add", "bad/name"], env=env)
    assert isinstance(result.exception, ValidationError)
    result = runner.invoke(app, ["groups", "add-member", "nogroup", "bob"], env=env)
    assert isinstance(result.exception, GroupNotFoundError)
    result = runner.invoke(app, ["apikeys", "add"], env=env)
    assert isinstance(result.exception, ValidationError)
    result = runner.invoke(app, ["apikeys", "revoke", "k-" + "A" * 20], env=env)
    assert isinstance(result.exception, ApiKeyNotFoundError)
    result = runner.invoke(app, ["users", "add", "x", "-a", "novalue"], env=env)
    assert result.exit_code == 2
    result = runner.invoke(app, ["users", "delete", "x"], env=env, input="n\n")
    assert result.exit_code == 1  # declined: aborted


def test_cli_seed_import(tmp_path: Path) -> None:
    env = _env(tmp_path, f"sqlite:///{tmp_path / 'data' / 'iotvault.db'}")
    users_file, groups_file = tmp_path / "users.json", tmp_path / "groups.json"
    users_file.write_text(json.dumps(SEED_USERS))
    groups_file.write_text(json.dumps({"docs": SEED_GROUPS}))
    report = json.loads(
        _cli(env, "seed", "import", "--users", str(users_file), "--groups", str(groups_file), "--json").output
    )
    assert report["usersCreated"] == ["admin", "tech@example.com"]
    assert set(report["passwords"]) == {"admin"}
    again = _cli(env, "seed", "import", "--users", str(users_file), "--groups", str(groups_file)).output
    assert "0 created, 2 already existed" in again
    assert report["passwords"]["admin"] not in again
