"""The web application's browser sessions, shared by every API node.

Revision ID: 0006_web_sessions
Revises: 0005_audit
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_web_sessions"
down_revision = "0005_audit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("used_us", sa.BigInteger, nullable=False),
        sa.Column("expires_us", sa.BigInteger, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("refreshing_until_us", sa.BigInteger, nullable=False),
        sa.Column("sealed", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_web_sessions_expiry", "web_sessions", ["kind", "expires_us"])


def downgrade() -> None:
    op.drop_index("ix_web_sessions_expiry", table_name="web_sessions")
    op.drop_table("web_sessions")
