"""Table definitions (SQLAlchemy Core), shared by the repository and the migrations' tests.

What stays plaintext, and why: ids, types, formats and receive times are needed to find and
page events without decrypting them; the payload is the only field with the device's data, so
it alone is stored as an AES-256-GCM record (see :mod:`iotvault.crypto.cipher`). Times are
integer microseconds since the Unix epoch (UTC) so that SQLite and PostgreSQL compare them the
same way.

Indexes follow the queries: the events primary key ``(device_id, event_id)`` serves "last n
events of a device" and, because event ids are UUIDv7 (time-ordered), also "events of a device
in a time range" (:func:`iotvault.domain.ids.event_id_bound`), so no second index slows the
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
    # signed (a JWS the device verifies) or unsigned (the payload as sent): revision 0006
    Column("command_delivery", String(16), nullable=False, server_default="signed"),
)

# Settings of a device type (revision 0006): the command delivery its devices get when they are
# registered. A type needs no row: the default is signed.
device_types = Table(
    "device_types",
    metadata,
    Column("type_id", String(64), primary_key=True),
    Column("command_delivery", String(16), nullable=False),
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
    Column("format", String(64), nullable=False),  # json, text, xml, bin, …: revision 0006
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


# ---- the OpenID Connect provider (revision 0004) -------------------------------------------
# Secrets (refresh tokens, authorization and device codes, session cookies) are stored only as
# SHA-256 hashes of 256-bit random values; signing keys only wrapped by the master key. A
# "grant" is one token family: what one login gave one client. Every token it issues names it
# (claim ``sid``), so revoking the grant ends its refresh tokens and, at the API, its access
# tokens. Users are referenced by name without foreign keys, like group devices: a deleted or
# re-created user fails the ``user_stamp`` check (``users.updated_us`` at login) instead.
oidc_clients = Table(
    "oidc_clients",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column("display_name", String(128), nullable=False, server_default=""),
    Column("secret_hash", String(128), nullable=True),  # NULL: a public client (PKCE, no secret)
    Column("redirect_uris", Text, nullable=False, server_default="[]"),
    Column("post_logout_redirect_uris", Text, nullable=False, server_default="[]"),
    Column("grant_types", Text, nullable=False, server_default="[]"),
    Column("allow_anonymous", Boolean, nullable=False, server_default=false()),
    Column("created_by", String(64), nullable=False, server_default=""),
    Column("created_us", BigInteger, nullable=False),
)

oidc_signing_keys = Table(
    "oidc_signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("alg", String(16), nullable=False),
    Column("public_jwk", Text, nullable=False),
    Column("wrapped", LargeBinary, nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("retired_us", BigInteger, nullable=True),  # a newer key signs since
    Column("publish_until_us", BigInteger, nullable=True),  # in the JWKS until its tokens expired
)

oidc_sessions = Table(
    "oidc_sessions",
    metadata,
    Column("session_id", String(32), primary_key=True),
    Column("token_hash", String(64), nullable=False),
    Column("user_name", String(64), nullable=False),
    Column("user_stamp", BigInteger, nullable=False),
    Column("amr", String(64), nullable=False),
    Column("auth_time_us", BigInteger, nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("expires_us", BigInteger, nullable=False),
    Column("ended_us", BigInteger, nullable=True),
    Column("end_reason", String(32), nullable=True),
    Index("ix_oidc_sessions_token", "token_hash", unique=True),
    Index("ix_oidc_sessions_user", "user_name"),
)

oidc_auth_requests = Table(
    "oidc_auth_requests",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("params", Text, nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("expires_us", BigInteger, nullable=False),
    Column("completed_us", BigInteger, nullable=True),
)

oidc_grants = Table(
    "oidc_grants",
    metadata,
    Column("grant_id", String(32), primary_key=True),
    Column("client_id", String(64), nullable=False),
    Column("session_id", String(32), nullable=True),
    Column("user_name", String(64), nullable=True),  # NULL for anonymous
    Column("user_stamp", BigInteger, nullable=True),
    Column("subject", String(64), nullable=False),
    Column("anonymous", Boolean, nullable=False, server_default=false()),
    Column("scope", String(512), nullable=False, server_default=""),
    Column("amr", String(64), nullable=False),
    Column("auth_time_us", BigInteger, nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("expires_us", BigInteger, nullable=False),
    Column("revoked_us", BigInteger, nullable=True),
    Column("revoke_reason", String(32), nullable=True),
    Index("ix_oidc_grants_session", "session_id"),
    Index("ix_oidc_grants_user", "user_name"),
)

oidc_codes = Table(
    "oidc_codes",
    metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("client_id", String(64), nullable=False),
    Column("redirect_uri", Text, nullable=False),
    Column("code_challenge", String(128), nullable=True),
    Column("nonce", String(512), nullable=True),
    Column("scope", String(512), nullable=False, server_default=""),
    Column("session_id", String(32), nullable=True),
    Column("user_name", String(64), nullable=True),
    Column("user_stamp", BigInteger, nullable=True),
    Column("subject", String(64), nullable=False),
    Column("anonymous", Boolean, nullable=False, server_default=false()),
    Column("amr", String(64), nullable=False),
    Column("auth_time_us", BigInteger, nullable=False),
    Column("expires_us", BigInteger, nullable=False),
    Column("used_us", BigInteger, nullable=True),
    Column("grant_id", String(32), nullable=True),  # what the exchange issued: revoked on reuse
)

oidc_refresh_tokens = Table(
    "oidc_refresh_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("grant_id", String(32), nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("expires_us", BigInteger, nullable=False),
    Column("used_us", BigInteger, nullable=True),  # rotated: presenting it again is a replay
    Index("ix_oidc_refresh_tokens_grant", "grant_id"),
)

oidc_device_codes = Table(
    "oidc_device_codes",
    metadata,
    Column("device_code_hash", String(64), primary_key=True),
    Column("user_code_hash", String(64), nullable=False),
    Column("client_id", String(64), nullable=False),
    Column("scope", String(512), nullable=False, server_default=""),
    Column("created_us", BigInteger, nullable=False),
    Column("expires_us", BigInteger, nullable=False),
    Column("interval_s", Integer, nullable=False),
    Column("last_poll_us", BigInteger, nullable=True),
    Column("status", String(16), nullable=False),  # pending, approved, denied, consumed
    Column("user_name", String(64), nullable=True),
    Column("user_stamp", BigInteger, nullable=True),
    Column("auth_time_us", BigInteger, nullable=True),
    Index("ix_oidc_device_codes_user_code", "user_code_hash", unique=True),
)

# Failed logins, lockouts, replayed codes and refresh tokens, anonymous logins. The login
# throttle counts these rows, so it holds across several API nodes on one database.
identity_events = Table(
    "identity_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at_us", BigInteger, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("user_name", String(64), nullable=True),
    Column("client_id", String(64), nullable=True),
    Column("address", String(64), nullable=True),
    Column("detail", String(256), nullable=False, server_default=""),
    Index("ix_identity_events_at", "at_us"),
    Index("ix_identity_events_user", "kind", "user_name", "at_us"),
    Index("ix_identity_events_address", "kind", "address", "at_us"),
)


# ---- device security (revision 0003) --------------------------------------------------------
# Every command sent to a device, kept after the device is deleted: it is the audit trail of who
# commanded what, and it keeps a device's command counter (``seq``) rising if the id is ever
# registered again. The payload itself is not kept, only its SHA-256.
commands = Table(
    "commands",
    metadata,
    Column("command_id", String(36), primary_key=True),
    Column("device_id", String(64), nullable=False),
    Column("type_id", String(64), nullable=False),
    Column("command", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", String(200), nullable=True),
    Column("payload_sha256", String(64), nullable=False),
    Column("issued_us", BigInteger, nullable=False),
    Column("expires_us", BigInteger, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    Column("sent_by", String(128), nullable=False),
    Column("delivery", String(16), nullable=False, server_default="signed"),  # revision 0006
    Index("ix_commands_device_seq", "device_id", "seq", unique=True),
)

# Failed device logins, throttled addresses, topic denials, revoked sessions, commands sent and
# commands devices refused. ``detail`` is a small JSON object, never a payload or a secret.
security_events = Table(
    "security_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at_us", BigInteger, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("subject", String(128), nullable=False),
    Column("detail", Text, nullable=False, server_default="{}"),
    Index("ix_security_events_at", "at_us"),
)

# The audit log (iotvault.audit): append-only, hash-chained. ``prev_hash`` is unique so that two
# writers can never both extend the same record (a fork fails to commit and is retried); the
# one-row ``audit_head`` is what writers lock, so PostgreSQL serialises them without advisory
# locks (which CockroachDB lacks). ``detail`` is small JSON, never a secret or a payload.
audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("at_us", BigInteger, nullable=False),
    Column("actor", String(160), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(200), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("client", String(64), nullable=False, server_default=""),
    Column("request_id", String(64), nullable=False, server_default=""),
    Column("detail", Text, nullable=False, server_default="{}"),
    Column("prev_hash", String(64), nullable=False, unique=True),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_log_at", "at_us"),
)

audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", String(64), nullable=False),
    Column("at_us", BigInteger, nullable=False),
    Column("signature", String(128), nullable=False),
)

# Alerts raised from audit records and security events (iotvault.audit.alerts): one row per
# episode, with the webhook's delivery state.
alerts = Table(
    "alerts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at_us", BigInteger, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("subject", String(160), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("count", Integer, nullable=False),
    Column("summary", Text, nullable=False),
    Column("delivery", String(16), nullable=False, server_default="none"),
    Index("ix_alerts_at", "at_us"),
)

# Browser sessions of the web application (iotvault.web.session), shared by every API node.
# ``id`` is the SHA-256 of the cookie value, never the value; ``sealed`` is the session (its OAuth
# tokens, CSRF token, user) under AES-256-GCM with a key derived from the cookie value, so the
# database alone opens none. ``kind`` is "session" or "pending" (a sign-in in flight).
web_sessions = Table(
    "web_sessions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("kind", String(8), nullable=False),
    Column("created_us", BigInteger, nullable=False),
    Column("used_us", BigInteger, nullable=False),
    Column("expires_us", BigInteger, nullable=False),
    Column("version", Integer, nullable=False),
    Column("refreshing_until_us", BigInteger, nullable=False),
    Column("sealed", LargeBinary, nullable=False),
    Index("ix_web_sessions_expiry", "kind", "expires_us"),
)
