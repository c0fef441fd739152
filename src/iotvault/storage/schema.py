"""Table definitions (SQLAlchemy Core), shared by the repository and the migrations' tests.

What stays plaintext, and why: ids, types, formats and receive times are needed to find and
page events without decrypting them; the payload is the only field with the device's data, so
it alone is stored as an AES-256-GCM record (see :mod:`iotvault.crypto.cipher`). Times are
integer microseconds since the Unix epoch (UTC) so that SQLite and PostgreSQL compare them the
same way.

Indexes follow the queries: the events primary key ``(device_id, event_id)`` serves "last n
events of a device" and, because event ids are UUIDv7 (time-ordered), also "events of a device
in a time range" (:func:`iotvault.storage.sql.event_id_bound`), so no second index slows the
ingest path.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
)

metadata = MetaData()

meta = Table(
    "iotvault_meta",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

devices = Table(
    "devices",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("type_id", String(64), nullable=False),
    Column("status", String(16), nullable=False, server_default="offline"),
    Column("last_seen_us", BigInteger, nullable=True),
    Column("metadata", Text, nullable=False, server_default="{}"),
    Column("credential_hash", String(128), nullable=True),
    Column("previous_credential_hash", String(128), nullable=True),
    Column("previous_credential_expires_us", BigInteger, nullable=True),
    Column("created_us", BigInteger, nullable=False),
)

device_keys = Table(
    "device_keys",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("wrapped", LargeBinary, nullable=False),
    Column("created_us", BigInteger, nullable=False),
)

events = Table(
    "events",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("event_id", String(36), primary_key=True),
    Column("type_id", String(64), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("format", String(16), nullable=False),
    Column("received_us", BigInteger, nullable=False),
    Column("payload", LargeBinary, nullable=False),
)

rejected_messages = Table(
    "rejected_messages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("received_us", BigInteger, nullable=False),
    Column("source", String(128), nullable=False),
    Column("topic", String(512), nullable=False),
    Column("device_id", String(64), nullable=True),
    Column("reason", String(32), nullable=False),
    Column("size", Integer, nullable=False),
    Index("ix_rejected_messages_received", "received_us"),
)

ingest_inflight = Table(
    "ingest_inflight",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("consumer", String(128), nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("entries", LargeBinary, nullable=False),
)


# ---- accounts (revision 0002) -------------------------------------------------------------
# Memberships cascade with their user or group; a group's devices are plain ids, not foreign
# keys, because a group may name a device before it registers (the seed's documents do), and
# SqlStore.delete_device removes them so that a later device of the same id inherits nothing.
# API keys keep their devices and groups as JSON lists: few rows, read whole on every check.
users = Table(
    "users",
    metadata,
    Column("user_name", String(64), primary_key=True),
    Column("display_name", String(128), nullable=False, server_default=""),
    Column("password_hash", String(256), nullable=False),
    Column("attributes", Text, nullable=False, server_default="{}"),
    Column("disabled", Boolean, nullable=False, server_default=false()),
    Column("created_us", BigInteger, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
)

user_groups = Table(
    "user_groups",
    metadata,
    Column("group_name", String(64), primary_key=True),
    Column("display_name", String(128), nullable=False, server_default=""),
    Column("role_admin", Boolean, nullable=False, server_default=false()),
    Column("role_reader", Boolean, nullable=False, server_default=false()),
    Column("role_writer", Boolean, nullable=False, server_default=false()),
    Column("created_us", BigInteger, nullable=False),
)

group_members = Table(
    "group_members",
    metadata,
    Column(
        "group_name",
        String(64),
        ForeignKey("user_groups.group_name", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("user_name", String(64), ForeignKey("users.user_name", ondelete="CASCADE"), primary_key=True),
    Index("ix_group_members_user", "user_name"),
)

group_devices = Table(
    "group_devices",
    metadata,
    Column(
        "group_name",
        String(64),
        ForeignKey("user_groups.group_name", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("device_id", String(64), primary_key=True),
    Index("ix_group_devices_device", "device_id"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("password_hash", String(128), nullable=False),
    Column("description", String(256), nullable=False, server_default=""),
    Column("role_admin", Boolean, nullable=False, server_default=false()),
    Column("role_reader", Boolean, nullable=False, server_default=false()),
    Column("role_writer", Boolean, nullable=False, server_default=false()),
    Column("devices", Text, nullable=False, server_default="[]"),
    Column("groups", Text, nullable=False, server_default="[]"),
    Column("expires_us", BigInteger, nullable=True),
    Column("last_used_us", BigInteger, nullable=True),
    Column("revoked_us", BigInteger, nullable=True),
    Column("created_by", String(64), nullable=False),
    Column("created_us", BigInteger, nullable=False),
)
