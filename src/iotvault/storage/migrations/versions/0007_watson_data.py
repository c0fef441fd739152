"""Watson IoT devices (issue 16): event formats beyond json, and unsigned command delivery.

* ``events.format`` holds any format a topic can name (1-64 characters, like every other
  topic level), not only ``json``: widened from 16 to 64. On PostgreSQL a metadata-only
  change (no table rewrite); SQLite, which cannot alter a column, copies the events table once
  (the upgrade of a large SQLite file takes a while and needs its size again in free disk).
* ``devices.command_delivery``: ``signed`` (the default: a JWS the device verifies) or
  ``unsigned`` (the payload as sent, Watson's behaviour), chosen per device by an admin.
* ``commands.delivery``: how each command was delivered, shown wherever a command is.
* ``device_types``: a type's command delivery, which devices registered under it get.

Revision ID: 0007_watson_data
Revises: 0006_web_sessions
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_watson_data"
down_revision = "0006_web_sessions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.alter_column("format", type_=sa.String(64), existing_nullable=False)
    op.add_column(
        "devices",
        sa.Column("command_delivery", sa.String(16), nullable=False, server_default="signed"),
    )
    op.add_column(
        "commands",
        sa.Column("delivery", sa.String(16), nullable=False, server_default="signed"),
    )
    op.create_table(
        "device_types",
        sa.Column("type_id", sa.String(64), primary_key=True),
        sa.Column("command_delivery", sa.String(16), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("device_types")
    with op.batch_alter_table("commands") as batch:
        batch.drop_column("delivery")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("command_delivery")
    op.execute("DELETE FROM events WHERE length(format) > 16")
    with op.batch_alter_table("events") as batch:
        batch.alter_column("format", type_=sa.String(16), existing_nullable=False)
