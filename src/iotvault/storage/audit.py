"""The audit log's tables: append a batch to the chain, read it back in order, query, checkpoints, pruning.

Serialising writers. Several processes (API and ingest nodes, the CLI) append to one chain.
Each append's first statement writes the one-row ``audit_head`` (``UPDATE … SET seq = seq``):
on PostgreSQL that row lock queues the other writers until this transaction commits, and they
then read the new head (READ COMMITTED re-reads a row it waited for); on SQLite it takes the
database's write lock before anything is read, so no writer works from a stale snapshot. The
unique ``prev_hash`` is the last line: a writer that somehow extended a record that was already
extended fails to commit, and :meth:`AuditStore.append` retries it on the new head.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from iotvault.domain.audit import (
    GENESIS,
    Anchor,
    AuditEntry,
    AuditRecord,
    Checkpoint,
    Fields,
    detail_text,
    entry_hash,
)
from iotvault.errors import StorageError
from iotvault.storage.db import EngineStore, by_paramstyle, driver_connection, for_driver, insert_rows
from iotvault.storage.schema import alerts, audit_checkpoints, audit_head, audit_log

__all__ = ["AlertRecord", "AuditFilter", "AuditStore"]

_APPEND_ATTEMPTS = 5
_HEAD_ID = 1


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """What ``GET /iotf/audit`` and ``iotvault audit export`` may narrow a listing by."""

    actor: str | None = None
    action: str | None = None
    target: str | None = None
    outcome: str | None = None
    since_us: int | None = None
    until_us: int | None = None


@dataclass(frozen=True, slots=True)
class AlertRecord:
    id: int
    at_us: int
    kind: str
    subject: str
    severity: str
    count: int
    summary: str
    delivery: str  # none (no webhook), pending, delivered, failed


def _record(row: Row[Any]) -> AuditRecord:
    entry = AuditEntry(
        at_us=row.at_us,
        actor=row.actor,
        action=row.action,
        target=row.target,
        outcome=row.outcome,
        client=row.client,
        request_id=row.request_id,
        detail=json.loads(row.detail or "{}"),
    )
    return AuditRecord(row.seq, entry, row.prev_hash, row.hash)


_INTO = (
    "INSERT INTO audit_log (seq, at_us, actor, action, target, outcome, client, request_id, detail,"
    " prev_hash, hash)"
)
_INSERT = by_paramstyle(f"{_INTO} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_COPY = (
    "COPY audit_log (seq, at_us, actor, action, target, outcome, client, request_id, detail, prev_hash, hash)"
    " FROM STDIN"
)
_PLAIN = frozenset({str, int, float, bool, type(None)})
_KEYS = frozenset({str})
# the detail column's text: json.dumps(detail, sort_keys=True, separators=(",", ":")), ASCII
_COLUMN_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _as_stored(detail: Any) -> dict[str, Any]:
    """``detail`` as it reads back from its JSON text: a flat document of plain values (what a
    request's record holds) is that already; anything else goes through JSON once."""
    d = detail if type(detail) is dict else dict(detail)
    if _KEYS.issuperset(map(type, d)) and _PLAIN.issuperset(map(type, d.values())):
        return d
    loaded: dict[str, Any] = json.loads(json.dumps(d, sort_keys=True))
    return loaded


def _columns(entry: AuditEntry) -> tuple[Fields, str, str]:
    """The entry as its row holds it: its fields, the detail's column text (of the detail as
    :func:`_as_stored` makes it), and the detail's text as the hash covers it.

    Each text is clipped to its column's width and its NUL replaced, which PostgreSQL's text
    refuses (one request for ``/iotf/devices/a%00b`` would otherwise stop the log's writer,
    retrying that batch for ever, with every later record queued behind it). The hash covers
    exactly what is stored. Its detail text (:func:`detail_text`, UTF-8) is the column's text
    too whenever the two agree, which they do when it holds nothing but printable ASCII (JSON
    escapes control characters either way); otherwise the column's is encoded on its own.
    This runs once per request's record, in the writer thread, holding the interpreter lock
    the event loop waits for: one pass, no intermediate entry.
    """
    detail = _as_stored(entry.detail)
    hashed = detail_text(detail)
    if not hashed.isascii() and _SURROGATE.search(hashed):  # its text cannot be UTF-8: see _text
        detail = json.loads(_SURROGATE.sub("\ufffd", hashed))
        hashed = detail_text(detail)  # again: two keys may have become one
    stored = hashed if hashed.isascii() and "\x7f" not in hashed else _COLUMN_JSON.encode(detail)
    fields = (
        int(entry.at_us),
        _text(entry.actor, 160),
        _text(entry.action, 64),
        _text(entry.target, 200),
        _text(entry.outcome, 16),
        _text(entry.client, 64),
        _text(entry.request_id, 64),
    )
    return fields, stored, hashed


_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value: str, width: int) -> str:
    """``value`` clipped to its column's ``width``, its NUL (which PostgreSQL's text refuses)
    and lone surrogates (which no UTF-8 holds: the hash's bytes, SQLite and PostgreSQL all
    refuse them; Python makes them of undecodable bytes, e.g. a command line's arguments)
    replaced by U+FFFD. Either would otherwise stop the writer."""
    value = value[:width].replace("\x00", "\ufffd")
    if not value.isascii():
        value = _SURROGATE.sub("\ufffd", value)
    return value


def _chained(columns: Sequence[tuple[Fields, str, str]], seq: int, prev: str) -> list[tuple[Any, ...]]:
    """The rows that put ``columns`` (:func:`_columns`) after record ``seq`` of hash ``prev``."""
    rows = []
    for fields, stored, hashed in columns:
        seq += 1
        digest = entry_hash(seq, fields, hashed, prev)
        rows.append((seq, *fields, stored, prev, digest))
        prev = digest
    return rows


def _insert(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert the rows of :func:`_chained` inside ``conn``'s transaction."""
    dialect = conn.dialect
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        with driver_connection(conn, _COPY) as raw, raw.cursor() as cur, cur.copy(_COPY) as copy:
            for row in rows:
                copy.write_row(row)
        return
    with driver_connection(conn, _INSERT["qmark"]) as raw:  # Core's rows cost more than the rows
        cur = raw.cursor()
        try:
            if dialect.name == "sqlite":  # a few steps, not one a row (insert_rows says why)
                insert_rows(cur, _INTO, rows)
            else:
                cur.executemany(for_driver(_INSERT, conn), rows)
        finally:
            cur.close()


class AuditStore(EngineStore):
    """Reads and writes the audit tables on the node's engine."""

    _local_writer = threading.Lock()  # threads of one process queue here, not in the database

    def _lock_head(self, conn: Connection) -> tuple[int, str]:
        locked = conn.execute(
            update(audit_head).where(audit_head.c.id == _HEAD_ID).values(seq=audit_head.c.seq)
        ).rowcount
        if not locked:  # a schema made without the migration's row
            conn.execute(insert(audit_head).values(id=_HEAD_ID, seq=0, hash=GENESIS))
        seq, hash_hex = conn.execute(
            select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == _HEAD_ID)
        ).one()
        return int(seq), str(hash_hex)

    def append(self, entries: Sequence[AuditEntry]) -> Anchor:
        """Chain ``entries`` after the current head in one transaction; the chain's new head.

        The rows go to the driver as tuples (``COPY`` on PostgreSQL, ``executemany`` on SQLite),
        without Core's per-row parameters: the writer thread holds the interpreter lock while
        it builds them (BENCHMARKS.md, issue 17, "Audit record cost").
        """
        if not entries:
            return Anchor(*self.head())
        columns = [_columns(e) for e in entries]
        for attempt in range(_APPEND_ATTEMPTS):
            try:
                with self._local_writer, self.begin() as conn:
                    seq, prev = self._lock_head(conn)
                    rows = _chained(columns, seq, prev)
                    _insert(conn, rows)
                    head = Anchor(rows[-1][0], rows[-1][-1])
                    conn.execute(
                        update(audit_head)
                        .where(audit_head.c.id == _HEAD_ID)
                        .values(seq=head.seq, hash=head.hash)
                    )
                    return head
            except IntegrityError as exc:
                if attempt == _APPEND_ATTEMPTS - 1:
                    raise StorageError(
                        "the audit log's head kept moving; the records were not appended"
                    ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def head(self) -> tuple[int, str]:
        """The last record's sequence number and hash, as the writers see it."""
        with self.connect() as conn:
            row = conn.execute(
                select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == _HEAD_ID)
            ).first()
        return (0, GENESIS) if row is None else (int(row.seq), str(row.hash))

    def oldest(self) -> AuditRecord | None:
        with self.connect() as conn:
            row = conn.execute(select(audit_log).order_by(audit_log.c.seq).limit(1)).first()
        return None if row is None else _record(row)

    def count(self) -> int:
        with self.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(audit_log)).scalar_one())

    def records(
        self, *, from_seq: int = 0, until_seq: int | None = None, batch: int = 1000
    ) -> Iterator[AuditRecord]:
        """Records from ``from_seq`` (to ``until_seq``) in stored order (by ``seq``), a batch at a time."""
        after = from_seq - 1
        while True:
            q = select(audit_log).where(audit_log.c.seq > after).order_by(audit_log.c.seq).limit(batch)
            if until_seq is not None:
                q = q.where(audit_log.c.seq <= until_seq)
            with self.connect() as conn:
                rows = conn.execute(q).all()
            if not rows:
                return
            for row in rows:
                yield _record(row)
            after = rows[-1].seq

    def query(
        self, where: AuditFilter, *, before_seq: int | None = None, limit: int = 100
    ) -> list[AuditRecord]:
        """Records matching ``where``, newest first, older than ``before_seq`` (the cursor)."""
        q = select(audit_log).order_by(audit_log.c.seq.desc()).limit(limit)
        for column, value in (
            (audit_log.c.actor, where.actor),
            (audit_log.c.action, where.action),
            (audit_log.c.target, where.target),
            (audit_log.c.outcome, where.outcome),
        ):
            if value is not None:
                q = q.where(column == value)
        if where.since_us is not None:
            q = q.where(audit_log.c.at_us >= where.since_us)
        if where.until_us is not None:
            q = q.where(audit_log.c.at_us < where.until_us)
        if before_seq is not None:
            q = q.where(audit_log.c.seq < before_seq)
        with self.connect() as conn:
            return [_record(r) for r in conn.execute(q)]

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        with self.begin() as conn:
            conn.execute(
                insert(audit_checkpoints).values(
                    seq=checkpoint.seq,
                    hash=checkpoint.hash,
                    at_us=checkpoint.at_us,
                    signature=checkpoint.signature,
                )
            )

    def checkpoints(self) -> list[Checkpoint]:
        with self.connect() as conn:
            rows = conn.execute(select(audit_checkpoints).order_by(audit_checkpoints.c.seq)).all()
        return [Checkpoint(r.seq, r.hash, r.at_us, r.signature) for r in rows]

    def latest_checkpoint(self) -> Checkpoint | None:
        with self.connect() as conn:
            r = conn.execute(
                select(audit_checkpoints).order_by(audit_checkpoints.c.seq.desc()).limit(1)
            ).first()
        return None if r is None else Checkpoint(r.seq, r.hash, r.at_us, r.signature)

    def prune_before(self, seq: int) -> int:
        """Delete the records before ``seq``; only after a checkpoint signed record ``seq - 1``.

        Verification then starts from that checkpoint: the records that remain still prove
        themselves, and the pruned part is vouched for by the signature.
        """
        with self.begin() as conn:
            anchored = conn.execute(
                select(audit_checkpoints.c.seq).where(audit_checkpoints.c.seq == seq - 1)
            ).first()
            if anchored is None:
                raise ValueError(
                    f"no signed checkpoint of record {seq - 1}: pruning would break verification"
                )
            return int(conn.execute(delete(audit_log).where(audit_log.c.seq < seq)).rowcount)

    # -- alerts ------------------------------------------------------------------------------

    def add_alert(
        self, at_us: int, *, kind: str, subject: str, severity: str, count: int, summary: str, delivery: str
    ) -> int:
        values = {
            "at_us": at_us,
            "kind": kind,
            "subject": subject[:160],
            "severity": severity,
            "count": count,
            "summary": summary,
            "delivery": delivery,
        }
        with self.begin() as conn:
            key = conn.execute(insert(alerts).values(**values)).inserted_primary_key
        assert key is not None  # noqa: S101 - an INSERT always has one
        return int(key[0])

    def set_alert_delivery(self, alert_id: int, delivery: str) -> None:
        with self.begin() as conn:
            conn.execute(update(alerts).where(alerts.c.id == alert_id).values(delivery=delivery))

    def list_alerts(
        self, *, kind: str | None = None, before_id: int | None = None, limit: int = 100
    ) -> list[AlertRecord]:
        q = select(alerts).order_by(alerts.c.id.desc()).limit(limit)
        if kind is not None:
            q = q.where(alerts.c.kind == kind)
        if before_id is not None:
            q = q.where(alerts.c.id < before_id)
        with self.connect() as conn:
            return [AlertRecord(**r._mapping) for r in conn.execute(q)]
