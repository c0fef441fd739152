"""Commands sent to devices (``commands``), and the devices' answers applied in an ingest batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, insert, literal, select, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from iotvault.storage.db import EngineStore
from iotvault.storage.repository import CommandAck, CommandRecord, SecurityEvent
from iotvault.storage.schema import commands, devices, security_events
from iotvault.storage.security_events import security_row


class CommandTable(EngineStore):
    def add_command(self, record: CommandRecord, *, attempts: int = 5) -> CommandRecord:
        """Insert a command with the device's next ``seq`` (one more than its highest so far).

        Two nodes numbering the same device at once collide on the unique index; the loser
        numbers again.
        """
        row = _command_row(record)
        columns = [c for c in row if c != "seq"]
        next_seq = select(
            *(literal(row[c], type_=commands.c[c].type).label(c) for c in columns),
            (func.coalesce(func.max(commands.c.seq), 0) + 1).label("seq"),
        ).where(commands.c.device_id == record.device_id)
        for attempt in range(attempts):
            try:
                with self.begin() as conn:
                    # PostgreSQL: the device's row lock makes its senders take turns; SQLite has
                    # one writer, and INSERT ... SELECT reads the highest number under its lock.
                    conn.execute(
                        select(devices.c.device_id)
                        .where(devices.c.device_id == record.device_id)
                        .with_for_update()
                    )
                    conn.execute(insert(commands).from_select([*columns, "seq"], next_seq))
                    seq = conn.execute(
                        select(commands.c.seq).where(commands.c.command_id == record.command_id)
                    ).scalar_one()
                    return _replace_seq(record, int(seq))
            except IntegrityError:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def get_command(self, device_id: str, command_id: str) -> CommandRecord | None:
        with self.connect() as conn:
            row = conn.execute(
                select(commands).where(commands.c.command_id == command_id, commands.c.device_id == device_id)
            ).first()
        return _command(row) if row is not None else None

    def set_command_status(
        self, command_id: str, status: str, reason: str | None, at_us: int, *, only_from: str = "sent"
    ) -> bool:
        """Move a command from ``only_from`` to ``status``; False if it was not in ``only_from``."""
        with self.begin() as conn:
            return bool(
                conn.execute(
                    update(commands)
                    .where(commands.c.command_id == command_id, commands.c.status == only_from)
                    .values(status=status, reason=reason, updated_us=at_us)
                ).rowcount
            )


def _command_row(c: CommandRecord) -> dict[str, Any]:
    return {
        "command_id": c.command_id,
        "device_id": c.device_id,
        "type_id": c.type_id,
        "command": c.command,
        "seq": c.seq,
        "status": c.status,
        "reason": c.reason,
        "payload_sha256": c.payload_sha256,
        "issued_us": c.issued_us,
        "expires_us": c.expires_us,
        "updated_us": c.updated_us,
        "sent_by": c.sent_by[:128],
        "delivery": c.delivery,
    }


def _replace_seq(c: CommandRecord, seq: int) -> CommandRecord:
    return CommandRecord(
        c.command_id,
        c.device_id,
        c.type_id,
        c.command,
        seq,
        c.status,
        c.reason,
        c.payload_sha256,
        c.issued_us,
        c.expires_us,
        c.updated_us,
        c.sent_by,
        c.delivery,
    )


def _command(row: Row[Any]) -> CommandRecord:
    return CommandRecord(
        row.command_id,
        row.device_id,
        row.type_id,
        row.command,
        int(row.seq),
        row.status,
        row.reason,
        row.payload_sha256,
        row.issued_us,
        row.expires_us,
        row.updated_us,
        row.sent_by,
        row.delivery,
    )


def apply_command_acks(conn: Any, acks: Sequence[CommandAck]) -> None:
    """A device's answers: the first one decides a command's status; refusals are security events.

    Only the command's own device can answer it (the update is keyed by both ids). An answer
    that matches no waiting command — a replay the device refused, a forged command, a second
    answer — is recorded rather than applied.
    """
    notes: list[SecurityEvent] = []
    for ack in acks:
        matched = 0
        if ack.verified:
            matched = conn.execute(
                update(commands)
                .where(
                    commands.c.command_id == ack.command_id,
                    commands.c.device_id == ack.device_id,
                    commands.c.status == "sent",
                )
                .values(status=ack.status, reason=ack.reason, updated_us=ack.at_us)
            ).rowcount
        if ack.status != "acknowledged" or not matched:
            notes.append(
                SecurityEvent(
                    ack.at_us,
                    "command_ack_unmatched" if ack.status == "acknowledged" else "command_rejected",
                    ack.device_id,
                    {
                        "commandId": ack.command_id or None,
                        "reason": ack.reason,
                        "verified": ack.verified,
                        "matched": bool(matched),
                    },
                )
            )
    if notes:
        conn.execute(insert(security_events), [security_row(e) for e in notes])
