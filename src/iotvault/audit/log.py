"""The audit log as the rest of iotvault uses it: record, checkpoint, verify, export.

Recording never blocks the caller on the database: :meth:`AuditLog.record` puts the entry on a
bounded queue and a writer thread appends what has gathered as one batch (one transaction, one
head lock) every ``flush_interval`` seconds. That keeps the cost on the last-50 read and on
ingest to a queue append; the price is that a crash loses at most the entries of the last
interval, which SECURITY.md states. Administrative actions that must be on disk before the
caller answers can call :meth:`AuditLog.flush`.

In a node the batch's own work (the chain, the rows, the transaction) is done by a child
process (:class:`~iotvault.audit.appender.ProcessAppender`, given to :meth:`AuditLog.start`): in
the node's process it would hold the interpreter lock the event loop needs, on every audited
request's record. Commands and tests append in their own process.

A full queue (the database has been gone for long) does not block the caller either: the entry
is counted in ``dropped`` and the next batch records a ``audit.dropped`` entry saying how many
were lost, so the gap is itself on the record.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from iotvault.audit.appender import AppendRefusedError, ProcessAppender
from iotvault.crypto.audit_signing import CheckpointSigner, checkpoint_valid
from iotvault.domain.audit import START, Anchor, AuditEntry, Checkpoint, Verdict, verify
from iotvault.errors import StorageError
from iotvault.storage.audit import AuditStore

__all__ = ["AuditLog", "verify_log"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AuditSettings:
    flush_interval: float = 0.2
    checkpoint_interval: float = 60.0
    queue_size: int = 100_000
    export_path: Path | None = None  # each checkpoint is also appended here as a JSON line


class AuditLog:
    """Append-only audit recording with periodic signed checkpoints of the chain's head."""

    def __init__(
        self,
        store: AuditStore,
        signer: CheckpointSigner,
        clock: Callable[[], int],
        settings: AuditSettings | None = None,
    ) -> None:
        self._store = store
        self._appender: ProcessAppender | None = None  # the node's writer process (start)
        self._signer = signer
        self._clock = clock
        self._settings = settings or AuditSettings()
        self._queue_size = self._settings.queue_size
        # appended by the recording threads (the event loop), emptied by the writer: a deque's
        # append and popleft are atomic, with none of queue.Queue's lock and condition per entry
        self._queue: deque[AuditEntry] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._flush_lock = threading.Lock()
        self._last_checkpoint_us = 0
        self._pending_since_us: int | None = None  # when the oldest entry not yet written was queued
        self.dropped = 0
        self.observers: list[Callable[[AuditEntry], object]] = []  # e.g. the alert monitor

    @property
    def public_key(self) -> str:
        return self._signer.public_key_b64()

    def record(self, entry: AuditEntry) -> None:
        """Queue ``entry``; never blocks, never raises (a full queue is counted and recorded)."""
        if len(self._queue) < self._queue_size:
            self._queue.append(entry)
        else:
            self.dropped += 1
        if self._pending_since_us is None:
            self._pending_since_us = entry.at_us
        for observe in self.observers:
            try:
                observe(entry)
            except Exception:  # an observer's failure must never cost the caller its answer
                log.exception("audit: an observer failed")

    def flush(self) -> int:
        """Append everything queued so far; the number of records written."""
        with self._flush_lock:
            batch: list[AuditEntry] = []
            while True:
                try:
                    batch.append(self._queue.popleft())
                except IndexError:
                    break
            if self.dropped:
                lost, self.dropped = self.dropped, 0
                batch.append(
                    AuditEntry(
                        self._clock(), "system", "audit.dropped", "audit", "error", detail={"count": lost}
                    )
                )
            if not batch:
                return 0
            try:
                self._append(batch)
            except StorageError:
                # back at the head of the queue for the next attempt, before what came since,
                # and not shown to the observers again (an alert rule would count them twice)
                self._queue.extendleft(reversed(batch))
                raise
            except Exception:  # an entry no store can write (a bug elsewhere): not the batch
                log.exception("audit: a batch of %d records could not be written; one by one now", len(batch))
                self._one_by_one(batch)
            self._pending_since_us = None if not self._queue else self._clock()
            return len(batch)

    def _append(self, batch: Sequence[AuditEntry]) -> None:
        """Chain and store ``batch``: by the writer process if there is one, else here."""
        (self._store if self._appender is None else self._appender).append(batch)

    def _one_by_one(self, batch: list[AuditEntry]) -> None:
        """Write ``batch`` entry by entry; each that cannot be written at all becomes an
        ``audit.unwritable`` record in its place (its action and the error's type), so that the
        chain shows where one is missing and the writer neither retries it for ever nor dies.
        A :class:`StorageError` puts what is left back at the head of the queue, as for a batch."""
        for i, entry in enumerate(batch):
            try:
                self._append([entry])
                continue
            except StorageError:
                self._queue.extendleft(reversed(batch[i:]))
                raise
            except Exception as exc:  # this entry only; the record in its place says which
                log.exception("audit: an %r record could not be written", str(entry.action)[:100])
                stand_in = AuditEntry(
                    int(self._clock()),
                    "system",
                    "audit.unwritable",
                    "audit",
                    "error",
                    detail={"action": str(entry.action)[:100], "error": _kind(exc)},
                )
            try:
                self._append([stand_in])
            except StorageError:
                self._queue.extendleft(reversed([stand_in, *batch[i + 1 :]]))
                raise
            except Exception:  # counted: the next flush records audit.dropped
                log.exception("audit: not even the audit.unwritable record could be written")
                self.dropped += 1

    @property
    def queue_depth(self) -> int:
        """Entries queued and not yet written (``/metrics``)."""
        return len(self._queue)

    @property
    def write_lag_s(self) -> float:
        """How long the oldest entry not yet written has waited, in seconds; 0 when none waits."""
        since = self._pending_since_us
        return 0.0 if since is None else max(0.0, (self._clock() - since) / 1_000_000)

    def checkpoint(self) -> Checkpoint | None:
        """Sign the chain's current head (unless already signed) and keep it, and export it."""
        seq, hash_hex = self._store.head()
        latest = self._store.latest_checkpoint()
        if seq == 0 or (latest is not None and latest.seq >= seq):
            return None
        signed = self._signer.sign(Anchor(seq, hash_hex), self._clock())
        self._store.add_checkpoint(signed)
        self._last_checkpoint_us = signed.at_us
        if self._settings.export_path is not None:
            line = {
                "seq": signed.seq,
                "hash": signed.hash,
                "at_us": signed.at_us,
                "signature": signed.signature,
            }
            with self._settings.export_path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(line, sort_keys=True) + "\n")
        return signed

    def prune_before(self, seq: int) -> int:
        """Delete records older than ``seq`` after signing record ``seq - 1`` (retention)."""
        self.flush()
        previous = next(iter(self._store.records(from_seq=seq - 1, batch=1)), None)
        if previous is None or previous.seq != seq - 1:
            return 0
        existing = {c.seq for c in self._store.checkpoints()}
        if previous.seq not in existing:
            self._store.add_checkpoint(self._signer.sign(Anchor(previous.seq, previous.hash), self._clock()))
        return self._store.prune_before(seq)

    # -- the writer thread ------------------------------------------------------------------

    def start(self, appender: ProcessAppender | None = None) -> None:
        """Start the writer thread; with ``appender``, batches are stored by its process."""
        self._appender = appender
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the writer after a last flush and checkpoint (and then its process)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.flush()
            self.checkpoint()
        except StorageError as exc:
            log.warning("audit: could not write the last records at shutdown: %s", exc)
        finally:
            if self._appender is not None:
                self._appender.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        interval = self._settings.flush_interval
        every_us = int(self._settings.checkpoint_interval * 1_000_000)
        if self._appender is not None:
            try:
                self._appender.start()  # now, not at the first batch: it imports for a moment
            except StorageError as exc:  # said in the log; the first flush tries again
                log.debug("audit: %s", exc)
        while not self._stop.wait(interval):
            try:
                self.flush()
                if self._clock() - self._last_checkpoint_us >= every_us:
                    self.checkpoint()
            except StorageError as exc:  # the database is away: keep the queue, try again
                log.warning("audit: %s", exc)
            except Exception:  # a bug: the writer goes on (a flush keeps no entry it cannot write)
                log.exception("audit: the writer failed; it goes on")
                self._last_checkpoint_us = self._clock()  # a failing checkpoint: at its next time


def _kind(exc: Exception) -> str:
    """The type of the error that kept a record off the chain (a writer process says which)."""
    return exc.kind if isinstance(exc, AppendRefusedError) else type(exc).__name__


def read_exported(path: Path) -> list[Checkpoint]:
    """Checkpoints exported to ``path`` by :class:`AuditLog` (JSON lines)."""
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            found.append(Checkpoint(int(d["seq"]), str(d["hash"]), int(d["at_us"]), str(d["signature"])))
    return found


def verify_log(store: AuditStore, public_key: str, extra_checkpoints: Iterable[Checkpoint] = ()) -> Verdict:
    """Check the whole stored chain against every checkpoint (stored and exported).

    A checkpoint with a bad signature fails at its record; records missing before the first
    one stored are fine only when a valid checkpoint vouches for the record just before it.
    """
    head_seq, head_hash = store.head()  # first: records appended while we read are not ours to judge
    checkpoints = [*store.checkpoints(), *extra_checkpoints]
    for cp in checkpoints:
        if not checkpoint_valid(public_key, cp):
            return Verdict(
                False, 0, START, cp.seq, f"the checkpoint of record {cp.seq} has no valid signature"
            )
    first = store.oldest()
    if first is None:
        if checkpoints:
            last = max(c.seq for c in checkpoints)
            return Verdict(
                False, 0, START, 1, f"no records, but a signed checkpoint names record {last} (truncated)"
            )
        return Verdict(True, 0, START)
    start = START
    if first.seq != 1:
        start = Anchor(first.seq - 1, first.prev_hash)
        if start not in {c.anchor for c in checkpoints}:
            return Verdict(
                False, 0, START, 1,
                f"records 1 to {first.seq - 1} are missing and no signed checkpoint vouches for their end",
            )  # fmt: skip
    records = store.records(from_seq=first.seq, until_seq=max(head_seq, first.seq))
    verdict = verify(records, start=start, checkpoints=[c.anchor for c in checkpoints])
    if verdict.ok and (verdict.head.seq, verdict.head.hash) != (head_seq, head_hash):
        return Verdict(
            False, verdict.checked, verdict.head, verdict.head.seq + 1,
            f"the chain ends at record {verdict.head.seq} but its head says record {head_seq} (truncated)",
        )  # fmt: skip
    return verdict
