"""Accounts: users, groups with their roles, members and devices, and API keys.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _roles() -> list[sa.Column[bool]]:
    return [
        sa.Column(name, sa.Boolean, nullable=False, server_default=sa.false())
        for name in ("role_admin", "role_reader", "role_writer")
    ]


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("user_name", sa.String(64), primary_key=True),
        sa.Column("display_name", sa.String(128), nullable=False, server_default=""),
        sa.Column("password_hash", sa.String(256), nullable=False),
        sa.Column("attributes", sa.Text, nullable=False, server_default="{}"),
        sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("updated_us", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "user_groups",
        sa.Column("group_name", sa.String(64), primary_key=True),
        sa.Column("display_name", sa.String(128), nullable=False, server_default=""),
        *_roles(),
        sa.Column("created_us", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "group_members",
        sa.Column(
            "group_name",
            sa.String(64),
            sa.ForeignKey("user_groups.group_name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "user_name", sa.String(64), sa.ForeignKey("users.user_name", ondelete="CASCADE"), primary_key=True
        ),
    )
    op.create_index("ix_group_members_user", "group_members", ["user_name"])
    op.create_table(
        "group_devices",
        sa.Column(
            "group_name",
            sa.String(64),
            sa.ForeignKey("user_groups.group_name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("device_id", sa.String(64), primary_key=True),
    )
    op.create_index("ix_group_devices_device", "group_devices", ["device_id"])
    op.create_table(
        "api_keys",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("password_hash", sa.String(128), nullable=False),
        sa.Column("description", sa.String(256), nullable=False, server_default=""),
        *_roles(),
        sa.Column("devices", sa.Text, nullable=False, server_default="[]"),
        sa.Column("groups", sa.Text, nullable=False, server_default="[]"),
        sa.Column("expires_us", sa.BigInteger, nullable=True),
        sa.Column("last_used_us", sa.BigInteger, nullable=True),
        sa.Column("revoked_us", sa.BigInteger, nullable=True),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_index("ix_group_devices_device", table_name="group_devices")
    op.drop_table("group_devices")
    op.drop_index("ix_group_members_user", table_name="group_members")
    op.drop_table("group_members")
    op.drop_table("user_groups")
    op.drop_table("users")
