"""The OpenID Connect provider: clients, signing keys, sessions, grants, codes, refresh tokens,
device codes, and identity events (failed logins, lockouts, replays).

Also registers the public client ``iotvault-cli`` (device authorization grant only), which
``iotvault login`` uses; an administrator may remove it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import json
import time

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

CLI_CLIENT = "iotvault-cli"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def upgrade() -> None:
    clients = op.create_table(
        "oidc_clients",
        sa.Column("client_id", sa.String(64), primary_key=True),
        sa.Column("display_name", sa.String(128), nullable=False, server_default=""),
        sa.Column("secret_hash", sa.String(128), nullable=True),
        sa.Column("redirect_uris", sa.Text, nullable=False, server_default="[]"),
        sa.Column("post_logout_redirect_uris", sa.Text, nullable=False, server_default="[]"),
        sa.Column("grant_types", sa.Text, nullable=False, server_default="[]"),
        sa.Column("allow_anonymous", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_by", sa.String(64), nullable=False, server_default=""),
        sa.Column("created_us", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "oidc_signing_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("alg", sa.String(16), nullable=False),
        sa.Column("public_jwk", sa.Text, nullable=False),
        sa.Column("wrapped", sa.LargeBinary, nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("retired_us", sa.BigInteger, nullable=True),
        sa.Column("publish_until_us", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "oidc_sessions",
        sa.Column("session_id", sa.String(32), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("user_name", sa.String(64), nullable=False),
        sa.Column("user_stamp", sa.BigInteger, nullable=False),
        sa.Column("amr", sa.String(64), nullable=False),
        sa.Column("auth_time_us", sa.BigInteger, nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("expires_us", sa.BigInteger, nullable=False),
        sa.Column("ended_us", sa.BigInteger, nullable=True),
        sa.Column("end_reason", sa.String(32), nullable=True),
    )
    op.create_index("ix_oidc_sessions_token", "oidc_sessions", ["token_hash"], unique=True)
    op.create_index("ix_oidc_sessions_user", "oidc_sessions", ["user_name"])
    op.create_table(
        "oidc_auth_requests",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("expires_us", sa.BigInteger, nullable=False),
        sa.Column("completed_us", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "oidc_grants",
        sa.Column("grant_id", sa.String(32), primary_key=True),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("session_id", sa.String(32), nullable=True),
        sa.Column("user_name", sa.String(64), nullable=True),
        sa.Column("user_stamp", sa.BigInteger, nullable=True),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("anonymous", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("scope", sa.String(512), nullable=False, server_default=""),
        sa.Column("amr", sa.String(64), nullable=False),
        sa.Column("auth_time_us", sa.BigInteger, nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("expires_us", sa.BigInteger, nullable=False),
        sa.Column("revoked_us", sa.BigInteger, nullable=True),
        sa.Column("revoke_reason", sa.String(32), nullable=True),
    )
    op.create_index("ix_oidc_grants_session", "oidc_grants", ["session_id"])
    op.create_index("ix_oidc_grants_user", "oidc_grants", ["user_name"])
    op.create_table(
        "oidc_codes",
        sa.Column("code_hash", sa.String(64), primary_key=True),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("redirect_uri", sa.Text, nullable=False),
        sa.Column("code_challenge", sa.String(128), nullable=True),
        sa.Column("nonce", sa.String(512), nullable=True),
        sa.Column("scope", sa.String(512), nullable=False, server_default=""),
        sa.Column("session_id", sa.String(32), nullable=True),
        sa.Column("user_name", sa.String(64), nullable=True),
        sa.Column("user_stamp", sa.BigInteger, nullable=True),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("anonymous", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("amr", sa.String(64), nullable=False),
        sa.Column("auth_time_us", sa.BigInteger, nullable=False),
        sa.Column("expires_us", sa.BigInteger, nullable=False),
        sa.Column("used_us", sa.BigInteger, nullable=True),
        sa.Column("grant_id", sa.String(32), nullable=True),
    )
    op.create_table(
        "oidc_refresh_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("grant_id", sa.String(32), nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("expires_us", sa.BigInteger, nullable=False),
        sa.Column("used_us", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_oidc_refresh_tokens_grant", "oidc_refresh_tokens", ["grant_id"])
    op.create_table(
        "oidc_device_codes",
        sa.Column("device_code_hash", sa.String(64), primary_key=True),
        sa.Column("user_code_hash", sa.String(64), nullable=False),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(512), nullable=False, server_default=""),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("expires_us", sa.BigInteger, nullable=False),
        sa.Column("interval_s", sa.Integer, nullable=False),
        sa.Column("last_poll_us", sa.BigInteger, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("user_name", sa.String(64), nullable=True),
        sa.Column("user_stamp", sa.BigInteger, nullable=True),
        sa.Column("auth_time_us", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_oidc_device_codes_user_code", "oidc_device_codes", ["user_code_hash"], unique=True)
    op.create_table(
        "identity_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at_us", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("user_name", sa.String(64), nullable=True),
        sa.Column("client_id", sa.String(64), nullable=True),
        sa.Column("address", sa.String(64), nullable=True),
        sa.Column("detail", sa.String(256), nullable=False, server_default=""),
    )
    op.create_index("ix_identity_events_at", "identity_events", ["at_us"])
    op.create_index("ix_identity_events_user", "identity_events", ["kind", "user_name", "at_us"])
    op.create_index("ix_identity_events_address", "identity_events", ["kind", "address", "at_us"])

    # a public client: no secret_hash (NULL), PKCE or the device grant instead
    op.bulk_insert(
        clients,
        [
            {
                "client_id": CLI_CLIENT,
                "display_name": "iotvault command line (iotvault login)",
                "redirect_uris": "[]",
                "post_logout_redirect_uris": "[]",
                "grant_types": json.dumps([DEVICE_GRANT, "refresh_token"]),
                "allow_anonymous": False,
                "created_by": "migration 0004",
                "created_us": time.time_ns() // 1000,
            }
        ],
    )


def downgrade() -> None:
    for name, table in (
        ("ix_identity_events_address", "identity_events"),
        ("ix_identity_events_user", "identity_events"),
        ("ix_identity_events_at", "identity_events"),
        ("ix_oidc_device_codes_user_code", "oidc_device_codes"),
        ("ix_oidc_refresh_tokens_grant", "oidc_refresh_tokens"),
        ("ix_oidc_grants_user", "oidc_grants"),
        ("ix_oidc_grants_session", "oidc_grants"),
        ("ix_oidc_sessions_user", "oidc_sessions"),
        ("ix_oidc_sessions_token", "oidc_sessions"),
    ):
        op.drop_index(name, table_name=table)
    for table in (
        "identity_events",
        "oidc_device_codes",
        "oidc_refresh_tokens",
        "oidc_codes",
        "oidc_grants",
        "oidc_auth_requests",
        "oidc_sessions",
        "oidc_signing_keys",
        "oidc_clients",
    ):
        op.drop_table(table)
