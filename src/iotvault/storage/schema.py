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
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
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
