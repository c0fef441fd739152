"""Batching, durable ingest: a message's ``submit()`` returns only after its batch committed.

The transport (the external-broker subscriber or the embedded broker) awaits ``submit()`` and
acknowledges the message (PUBACK) only afterwards, so an acknowledged event is always on disk.
Messages are collected for at most ``ingest_batch_ms`` or ``ingest_batch_size`` messages,
whichever comes first, then validated, encrypted and written in one transaction by a single
writer thread (SQLite allows one writer; one thread also keeps the key cache and the dedupe
index single-threaded). While one batch commits, the next one fills; a batch cut while the
writer is busy waits for it in a hand-over slot, from which the writer takes it the moment the
commit before it ends, without a round trip through the event loop (:meth:`IngestPipeline._write_chain`).

If the commit fails (database gone), the same batch is retried with backoff and jitter and no
message in it is acknowledged until it succeeds; the broker holds further messages back once
its in-flight window is full, which is the back-pressure.

Events in any format are stored: ``json`` payloads must be valid JSON, any other format's (the
topic's last level: ``text``, ``xml``, ``bin``, …) are kept as the bytes they are, encrypted the
same way, and served as text or base64 (:func:`iotvault.documents.event_doc`).

A device's answer to a command (event type ``cmdack``) is not stored as an event: it updates
its command's status in the same transaction as the rest of its batch
(:func:`iotvault.domain.commands.parse_command_ack`, ``BatchWrite.command_acks``).

Nothing here logs a payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import NamedTuple

import orjson

from iotvault.clock import now_us
from iotvault.crypto.cipher import SealingKey, seal_record
from iotvault.crypto.keyring import KeyRing
from iotvault.domain.commands import parse_command_ack
from iotvault.domain.ids import EventIdFactory
from iotvault.domain.topics import JSON_FORMAT, CommandTopic, EventTopic, StatusTopic, Topic, parse_topic
from iotvault.errors import DatabaseUnavailableError, DataKeyNotFoundError, IotVaultError, TopicError
from iotvault.ingest.dedupe import InflightIndex, digest, pack, unpack
from iotvault.metrics import Metrics
from iotvault.storage.repository import (
    BatchWrite,
    CommandAck,
    InflightRecord,
    RejectedMessage,
    StoredEvent,
)
from iotvault.storage.sql import SqlStore

log = logging.getLogger(__name__)


class IngestFailedError(IotVaultError):
    """A batch could not be handled for a reason other than an outage; nothing in it is acknowledged."""


class Outcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    STATUS = "status"
    REJECTED = "rejected"
    COMMAND_ACK = "command_ack"  # a device's answer to a command: applied to it, not stored


class Reason(StrEnum):
    """Why a message was not stored as data; also the ``reason`` column of rejected messages."""

    BAD_TOPIC = "bad_topic"
    FORBIDDEN_TOPIC = "forbidden_topic"
    TOO_LARGE = "too_large"
    INVALID_JSON = "invalid_json"
    UNKNOWN_DEVICE = "unknown_device"
    TYPE_MISMATCH = "type_mismatch"
    BAD_STATUS = "bad_status"
    BAD_COMMAND_ACK = "bad_command_ack"


_READY_MAX = 2  # cut batches waiting for the busy writer (IngestPipeline._ready)
_TOPIC_CACHE = 50_000  # parsed topics kept by a pipeline (a few MB at most)


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message as received, whatever the transport."""

    topic: str
    payload: bytes
    qos: int
    dup: bool
    packet_id: int | None
    consumer: str  # who sent it to us: our subscriber's client id, or the device's client id


_STATUS_WORDS = {
    "connected": "online",
    "online": "online",
    "connect": "online",
    "disconnected": "offline",
    "offline": "offline",
    "disconnect": "offline",
}


def parse_status(payload: bytes) -> str | None:
    """``{"status": "connected"}`` (ours) or ``{"Action": "Connect"}`` (Watson's) → online/offline."""
    try:
        doc = json.loads(payload)
    except (
        ValueError,
        RecursionError,
    ):  # RecursionError: deeply nested arrays; UnicodeDecodeError is a ValueError
        return None
    if not isinstance(doc, dict):
        return None
    word = doc.get("status", doc.get("Action"))
    return _STATUS_WORDS.get(word.lower()) if isinstance(word, str) else None


@dataclass(slots=True)
class _Pending:
    msg: Inbound
    received_us: int  # arrival, in whole milliseconds; a stored event's is read from its id
    future: asyncio.Future[Outcome]
    event_id: str = ""  # made at the first attempt to commit it, kept for the retries
    event_us: int = 0  # the time its event id carries (whole milliseconds), the stored receive time


class _Route(NamedTuple):
    """How one topic's events are stored, worked out once per batch (:meth:`IngestPipeline._commit`).

    Only for an event topic of a known device, of the device's type, not a command's answer,
    whose data key was found: every later message on the topic in the batch needs only its
    own checks (size, JSON), an id and its sealing.
    """

    device_id: str
    type_id: str
    event_type: str
    fmt: str
    is_json: bool
    key: SealingKey


_new_tuple = tuple.__new__  # a StoredEvent without its Python-level __new__ (0.2 µs an event)


@dataclass(slots=True)
class _DeviceCache:
    """deviceId → typeId (None: unknown), with a short life so deletions and additions show.

    At most ``max_entries``: messages for ids no one registered (a broker without topic ACLs
    lets anyone name any) are remembered too, so that each costs no query, and would otherwise
    grow it for ever. When full, the entries whose life has ended go; if that frees too little
    (that many ids within one life), all go and are asked again.
    """

    ttl_s: float = 10.0
    max_entries: int = 100_000
    entries: dict[str, tuple[str | None, float]] = field(default_factory=dict)

    def get(self, device_id: str, now: float) -> tuple[bool, str | None]:
        hit = self.entries.get(device_id)
        if hit is None or hit[1] < now:
            return False, None
        return True, hit[0]

    def put(self, device_id: str, type_id: str | None, now: float) -> None:
        entries = self.entries
        if len(entries) >= self.max_entries and device_id not in entries:
            # a copy: the event loop may drop an entry meanwhile (forget_devices)
            for key, (_, until) in list(entries.items()):
                if until < now:
                    entries.pop(key, None)
            if len(entries) >= self.max_entries * 3 // 4:
                entries.clear()
        entries[device_id] = (type_id, now + self.ttl_s)


def _chain_ended(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:  # _write_chain catches what _commit raises
        log.error("ingest: the writer stopped", exc_info=fut.exception())


class IngestPipeline:
    def __init__(
        self,
        store: SqlStore,
        keyring: KeyRing,
        metrics: Metrics,
        *,
        batch_size: int = 500,
        batch_ms: float = 5.0,
        max_payload_bytes: int = 65536,
        dedupe_window_s: float = 120.0,
        on_commit: Callable[[set[str]], None] | None = None,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._metrics = metrics
        self._batch_size = batch_size
        self._batch_s = batch_ms / 1000.0
        self._max_payload = max_payload_bytes
        self._index = InflightIndex(dedupe_window_s)
        self._ids = EventIdFactory()
        self._devices = _DeviceCache()
        self._topics: dict[str, Topic] = {}
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iotvault-writer")
        # batches cut and waiting for the writer: two at most, so that the next batch is ready
        # when a commit ends (with one, the loop, busy with incoming messages, had often not
        # cut the next yet) but messages still join the batch after them while all are busy.
        # The writer thread takes from it itself (_write_chain), under _handoff, which also
        # guards _writer_busy: a chain of commits is running in the writer, or a failed batch
        # is being retried (_commit_batches); then a new batch waits here, else it starts one
        self._ready: deque[list[_Pending]] = deque()
        self._handoff = threading.Lock()
        self._writer_busy = False
        self._room = asyncio.Event()  # set when _ready has room again (by _commit_batches)
        # what the writer did with each batch, in commit order: its outcomes or its exception
        self._results: asyncio.Queue[tuple[list[_Pending], list[Outcome] | Exception]] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight: list[list[_Pending]] = []  # batches given to the writer, oldest first
        self._task: asyncio.Task[None] | None = None
        self._committer: asyncio.Task[None] | None = None
        self._seen: dict[str, int] = {}
        self._last_cleanup = 0.0
        self._last_seen_flush = 0.0
        self._closing = False
        self._on_commit = on_commit
        self._committed_devices: set[str] = set()
        self._intake_open = True
        self.trouble: str | None = None  # why commits are failing now (readiness), else None
        self.feeds: dict[str, Callable[[], bool]] = {}  # broker connections feeding us: connected?

    # ---- lifecycle -------------------------------------------------------------------
    async def __aenter__(self) -> IngestPipeline:
        loop = self._loop = asyncio.get_running_loop()
        records = await loop.run_in_executor(self._executor, self._store.load_inflight)
        now = time.monotonic()
        for rec in records:
            # entries from before this start may be redelivered as soon as senders reconnect
            self._index.remember_all(rec.consumer, unpack(rec.entries), now)
        if records:
            log.info(
                "ingest: %d messages were stored but not yet acknowledged before the last stop; a "
                "redelivery of them is recognised and stored once (normal after a restart)",
                len(self._index),
            )
        self._task = asyncio.create_task(self._run(), name="iotvault-ingest-batcher")
        self._committer = asyncio.create_task(self._commit_batches(), name="iotvault-ingest-committer")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # no wake-up here: Python 3.11's wait_for can swallow a cancel that races a wake-up;
        # the loop also checks _closing
        self._closing = True
        for task in (self._task, self._committer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # not acknowledged: whatever of these was committed is recognised when it comes again
        # (the writer takes no new batch once _closing is set; _in_flight holds _ready's too)
        for p in [p for batch in self._in_flight for p in batch] + self._pending:
            if not p.future.done():
                p.future.cancel()
        self._in_flight.clear()
        with self._handoff:
            self._ready.clear()
        self._pending.clear()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(IotVaultError):
            await loop.run_in_executor(self._executor, self._flush_seen)
        self._executor.shutdown(wait=True)

    def stop_intake(self) -> None:
        """Accept no new message (shutdown's first step): each is left unacknowledged.

        Batches already cut still commit and are answered; a message that arrives from now on
        gets a cancelled future, which transports take as "do not acknowledge", so the sender
        keeps it and delivers it to the next node or run.
        """
        self._intake_open = False

    def attach_feed(self, name: str, connected: Callable[[], bool]) -> None:
        """A transport that feeds this pipeline reports its connection here (readiness)."""
        self.feeds[name] = connected

    # ---- the transport's entry point -------------------------------------------------
    async def submit(self, msg: Inbound) -> Outcome:
        """Return once the message is durably handled (stored, applied, recorded or deduped)."""
        return await self.enqueue(msg)

    def enqueue(self, msg: Inbound) -> asyncio.Future[Outcome]:
        """Queue a message; the future completes once it is durably handled.

        For transports that acknowledge from a callback rather than a task per message (the
        external-broker subscriber). The future is cancelled if the pipeline is closing.
        """
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        if self._closing or not self._intake_open:
            fut.cancel()
            return fut
        # the event id is made in the writer thread from this arrival time (_commit): a UUIDv7
        # costs two os.urandom calls, and each released the GIL to the writer from this loop
        self._pending.append(_Pending(msg, time.time_ns() // 1_000_000 * 1000, fut))
        n = len(self._pending)
        if n == 1:
            self._wake.set()
        if n == self._batch_size:  # the queue grows one by one: it passes this size exactly
            self._full.set()
        return fut

    # ---- batching loop ---------------------------------------------------------------
    async def _run(self) -> None:
        """Cut batches: when ``batch_size`` messages wait, or ``batch_ms`` after the first one.

        A batch cut while the writer is busy waits in ``_ready`` (two at most) for the writer
        to take it; while it waits, newer messages gather for the batch after it.
        """
        loop = asyncio.get_running_loop()
        while not self._closing:
            if not self._pending:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                except TimeoutError:
                    if not self._in_flight:
                        await loop.run_in_executor(self._executor, self._housekeeping)
                    continue
            if len(self._pending) < self._batch_size:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), timeout=self._batch_s)
            batch, self._pending = self._pending[: self._batch_size], self._pending[self._batch_size :]
            batch = [p for p in batch if not p.future.done()]  # a cancelled submit needs no answer
            if batch:
                # in _in_flight already while it waits for room: a shutdown cancels its futures
                self._in_flight.append(batch)
                while len(self._ready) >= _READY_MAX:  # let the messages gather behind them
                    self._room.clear()
                    await self._room.wait()
                self._hand_over(batch)

    def _hand_over(self, batch: list[_Pending]) -> None:
        """Give a cut batch (last in ``_in_flight``) to the writer: to a running chain, or start one."""
        with self._handoff:
            if self._writer_busy:
                self._ready.append(batch)
                return
            self._writer_busy = True
        self._start_chain(batch)

    def _start_chain(self, first: list[_Pending]) -> None:
        assert self._loop is not None  # noqa: S101 - set by __aenter__, before any batch
        self._loop.run_in_executor(self._executor, self._write_chain, first).add_done_callback(_chain_ended)

    def _write_chain(self, batch: list[_Pending]) -> None:
        """The writer thread: commit this batch, then each one handed over meanwhile, in order.

        The next batch is taken here, right after the commit before it, instead of the event
        loop starting each commit: the loop, busy with the incoming messages, had taken
        milliseconds to get round to it, and the writer waited that long between commits (the
        profile in BENCHMARKS.md, "Ingest: the writer's wait between commits"). Each result goes
        to :meth:`_commit_batches` with one wake-up of the loop; a failed commit ends the
        chain, and the loop retries that batch before any later one is written.
        """
        assert self._loop is not None  # noqa: S101 - set by __aenter__, before any batch
        post = self._loop.call_soon_threadsafe
        put = self._results.put_nowait
        current: list[_Pending] | None = batch
        while current is not None:
            result: list[Outcome] | Exception
            try:
                result = self._commit(current)
            except Exception as exc:  # noqa: BLE001 - an outage or a bug: _commit_batches decides which
                result = exc
            with self._handoff:
                nxt = None
                if self._ready and not isinstance(result, Exception) and not self._closing:
                    nxt = self._ready.popleft()
                elif not isinstance(result, Exception):
                    self._writer_busy = False  # a batch handed over from now on starts a chain
            # taken before the result is posted: _commit_batches then sees the slot free
            try:
                post(put, (current, result))
            except RuntimeError:  # the loop is closed: shutting down, nobody waits for this
                return
            current = nxt

    async def _commit_batches(self) -> None:
        """Answer each committed batch's messages in commit order; retry a failed commit.

        The writer thread goes on to the next batch before this one's messages are answered
        (hundreds of futures, and the PUBACKs they release), so it does not sit idle while
        the event loop does that.
        """
        loop = asyncio.get_running_loop()
        while True:
            batch, result = await self._results.get()
            if len(self._ready) < _READY_MAX:
                self._room.set()
            try:
                if isinstance(result, Exception):
                    outcomes: list[Outcome] | None = await self._settle(loop, batch, result)
                    self._resume_chain()
                else:
                    outcomes = result
            except Exception as exc:  # a bug, not an outage: fail these messages, keep ingesting
                log.exception("ingest: batch of %d messages failed; they are not acknowledged", len(batch))
                self._resume_chain()
                outcomes = None
                failure = IngestFailedError(str(exc))
            self._in_flight.pop(0)  # the oldest: batches are committed and answered in order
            if outcomes is None:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(failure)
                continue
            for p, outcome in zip(batch, outcomes, strict=True):
                if not p.future.done():
                    p.future.set_result(outcome)
            # the oldest message's wait: its arrival to this answer (the PUBACK follows now)
            self._metrics.ingest_lag.observe(max(0.0, time.time() - batch[0].received_us / 1e6))
            if self._on_commit is not None and self._committed_devices:
                devices, self._committed_devices = self._committed_devices, set()
                self._on_commit(devices)

    def _resume_chain(self) -> None:
        """After a failed batch is settled: the writer goes on with the batches behind it."""
        with self._handoff:
            nxt = self._ready.popleft() if self._ready and not self._closing else None
            if nxt is None:
                self._writer_busy = False
        if nxt is not None:
            self._room.set()
            self._start_chain(nxt)

    async def _settle(
        self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], failure: Exception
    ) -> list[Outcome]:
        """The outcome of a batch whose commit failed: while the database is out, retry it.

        Raises what is not an outage (a bug): the batch's messages are then failed.
        """
        delay = 0.1
        attempt: asyncio.Future[list[Outcome]] | None = None
        while True:
            try:
                if attempt is None:
                    raise failure
                outcomes = await attempt
            except IotVaultError as exc:
                self.trouble = exc.reason if isinstance(exc, DatabaseUnavailableError) else type(exc).__name__
                self._metrics.commit_failures.inc()
                log.warning(
                    "ingest: commit of %d messages failed (%s); retrying in %.1fs", len(batch), exc, delay
                )
            else:
                self.trouble = None
                return outcomes
            await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not a secret
            delay = min(delay * 2, 5.0)  # back within seconds once the database is
            attempt = loop.run_in_executor(self._executor, self._commit, batch, True)

    # ---- the writer thread -----------------------------------------------------------
    def _device_type(self, device_id: str) -> str | None:
        now = time.monotonic()
        found, type_id = self._devices.get(device_id, now)
        if found:
            return type_id
        dev = self._store.get_device(device_id)
        type_id = dev.type_id if dev is not None else None
        self._devices.put(device_id, type_id, now)
        return type_id

    def _refresh(self, batch: list[_Pending]) -> None:
        """Read the types and current keys of the batch's devices that are not cached or run
        out within half their life, each kind in one statement (:meth:`KeyRing.
        refresh_sealing_keys` says why); the pass below then finds them cached. Only devices
        known to exist get a key read; a topic that does not parse is the pass's to refuse."""
        now = time.monotonic()
        ahead = self._devices.ttl_s / 2
        device_ids: set[str] = set()
        for topic in {p.msg.topic for p in batch}:
            try:
                device_ids.add(self._parse_topic(topic).device_id)
            except TopicError:
                continue
        cache = self._devices
        due = [d for d in device_ids if (hit := cache.entries.get(d)) is None or hit[1] - now < ahead]
        if due:
            found = self._store.types_of(due)
            for d in due:
                cache.put(d, found.get(d), now)
        known = [d for d in device_ids if (hit := cache.entries.get(d)) is not None and hit[0] is not None]
        self._keyring.refresh_sealing_keys(known)

    def _parse_topic(self, topic: str) -> Topic:
        """``parse_topic``, remembered: a fleet publishes on few topics per device.

        Parsing validates four identifiers, about 2.7 µs a message; a hit costs a dict look-up.
        Only valid topics are kept, at most ``_TOPIC_CACHE`` of them (then it starts afresh).
        """
        parsed = self._topics.get(topic)
        if parsed is None:
            parsed = parse_topic(topic)
            if len(self._topics) >= _TOPIC_CACHE:
                self._topics.clear()
            self._topics[topic] = parsed
        return parsed

    def _commit(self, batch: list[_Pending], retry: bool = False) -> list[Outcome]:  # noqa: PLR0912, PLR0915 - one flat pass per message
        """Validate, seal and write one batch; its messages' outcomes, in order.

        Two passes. The first decides each message's fate in order: dedupe, then, for a topic
        not yet seen in this batch, the full classification (topic, device, type, format, data
        key), whose answer for an event topic is kept as a :class:`_Route`; a later message on
        that topic only has its own checks (size, JSON). The second makes the ids of the
        events to store in one call and seals each with a fresh nonce. The per-event work in
        both is what the ack-only baseline does not do (BENCHMARKS.md, issue 17 ingest round).
        """
        self._refresh(batch)
        out = BatchWrite()
        outcomes: list[Outcome] = []
        entries: dict[str, list[tuple[int, bytes]]] = {}
        now_mono = time.monotonic()
        rejected: list[str] = []
        statuses = duplicates = 0
        seen: dict[str, int] = {}
        routes: dict[str, _Route] = {}  # this batch's event topics, known good
        to_store: list[tuple[_Pending, _Route]] = []
        max_payload = self._max_payload
        check = self._index.check
        loads = orjson.loads
        decode_error = orjson.JSONDecodeError

        def reject(p: _Pending, reason: Reason, device_id: str | None = None) -> None:
            out.rejected.append(
                RejectedMessage(
                    p.received_us, p.msg.consumer, p.msg.topic, device_id, reason.value, len(p.msg.payload)
                )
            )
            outcomes.append(Outcome.REJECTED)
            rejected.append(reason.value)

        taken: list[tuple[str, int, tuple[bytes, float]]] = []  # dedupe entries this batch consumed
        for p in batch:
            msg = p.msg
            if msg.packet_id is not None:
                h = digest(msg.topic, msg.payload)
                if check(msg.consumer, msg.packet_id, h, dup=msg.dup, taken=taken):
                    outcomes.append(Outcome.DUPLICATE)
                    duplicates += 1
                    continue
                entries.setdefault(msg.consumer, []).append((msg.packet_id, h))
            route = routes.get(msg.topic)
            if route is not None:  # the topic passed every check of its own in this batch
                if len(msg.payload) > max_payload:
                    reject(p, Reason.TOO_LARGE, route.device_id)
                    continue
                if route.is_json:
                    try:
                        loads(msg.payload)  # as below
                    except decode_error:
                        reject(p, Reason.INVALID_JSON, route.device_id)
                        continue
                to_store.append((p, route))
                outcomes.append(Outcome.STORED)
                continue
            try:
                topic = self._parse_topic(msg.topic)
            except TopicError:
                reject(p, Reason.BAD_TOPIC)
                continue
            if isinstance(topic, CommandTopic):
                reject(p, Reason.FORBIDDEN_TOPIC, topic.device_id)
                continue
            if len(msg.payload) > max_payload:
                reject(p, Reason.TOO_LARGE, topic.device_id)
                continue
            type_id = self._device_type(topic.device_id)
            if type_id is None:
                reject(p, Reason.UNKNOWN_DEVICE, topic.device_id)
                continue
            if type_id != topic.type_id:
                reject(p, Reason.TYPE_MISMATCH, topic.device_id)
                continue
            if isinstance(topic, StatusTopic):
                status = parse_status(msg.payload)
                if status is None:
                    reject(p, Reason.BAD_STATUS, topic.device_id)
                    continue
                out.statuses[topic.device_id] = (status, p.received_us)
                outcomes.append(Outcome.STATUS)
                statuses += 1
                continue
            assert isinstance(topic, EventTopic)  # noqa: S101 - parse_topic returns one of three
            is_json = topic.fmt == JSON_FORMAT
            if is_json:
                try:
                    # RFC 8259 strictly: UTF-8, one value, no NaN or Infinity, at most 1024 levels
                    # deep (a 1 KB "[[[[…" is refused, not a crash); 5x faster than json.loads
                    loads(msg.payload)
                except decode_error:
                    reject(p, Reason.INVALID_JSON, topic.device_id)
                    continue
            elif topic.is_command_ack:  # an answer to a command is JSON, whatever else it says
                reject(p, Reason.BAD_COMMAND_ACK, topic.device_id)
                continue
            # any other format (text, xml, bin, …: the topic's last level) is stored as the
            # bytes it is, encrypted like JSON, and served as text or base64 (issue 16)
            if topic.is_command_ack:  # updates its command in this batch's transaction
                ack = parse_command_ack(msg.payload)
                if ack is None:
                    reject(p, Reason.BAD_COMMAND_ACK, topic.device_id)
                    continue
                out.command_acks.append(
                    CommandAck(
                        topic.device_id,
                        ack.command_id,
                        ack.status,
                        ack.reason,
                        p.received_us,
                        verified=ack.verified,
                    )
                )
                seen[topic.device_id] = max(seen.get(topic.device_id, 0), p.received_us)
                outcomes.append(Outcome.COMMAND_ACK)
                continue
            try:
                # the device's current data key, once per topic and batch; every record still
                # gets a fresh nonce from the OS (seal_record, below)
                key = self._keyring.sealing_key(topic.device_id)
            except DataKeyNotFoundError:  # deleted since the cache entry was made
                self._devices.entries.pop(topic.device_id, None)
                reject(p, Reason.UNKNOWN_DEVICE, topic.device_id)
                continue
            route = routes[msg.topic] = _Route(
                topic.device_id, topic.type_id, topic.event_type, topic.fmt, is_json, key
            )
            to_store.append((p, route))
            outcomes.append(Outcome.STORED)

        # ids are made in arrival order, and the receive time is the id's, so the two always
        # agree and a time range can be served from the (device_id, event_id) key; a retried
        # batch keeps the ids of its first attempt
        fresh = [p for p, _ in to_store if not p.event_id]
        if fresh:
            made = self._ids.new_many([p.received_us // 1000 for p in fresh])
            for p, (new_id, ms) in zip(fresh, made, strict=True):
                p.event_id = new_id
                p.event_us = ms * 1000
        events = out.events
        for p, route in to_store:
            event_id = p.event_id
            device_id = route.device_id
            events.append(
                _new_tuple(
                    StoredEvent,
                    (
                        device_id,
                        event_id,
                        route.type_id,
                        route.event_type,
                        route.fmt,
                        p.event_us,
                        seal_record(route.key, event_id, p.msg.payload),
                    ),
                )
            )
            if seen.get(device_id, 0) < p.event_us:
                seen[device_id] = p.event_us
        stored = len(to_store)

        created_us = now_us()
        out.inflight = [InflightRecord(c, created_us, pack(e)) for c, e in entries.items()]
        if now_mono - self._last_cleanup > 10.0:
            out.delete_inflight_before_us = created_us - int(self._index.window_s * 1_000_000)
        try:
            if not (retry and self._committed_before(out)):
                self._store.write_batch(out)
        except BaseException:
            # not committed: the batch is retried, and a redelivery in it must be recognised
            # again then (else it is stored twice: issue 18, finding 2)
            self._index.restore(taken)
            raise

        # Only now that the batch is committed does the in-memory state follow it. Nothing
        # after this point may raise: the caller would take the committed batch for a failed
        # one and commit it again (issue 18, finding 1).
        if out.delete_inflight_before_us is not None:
            self._last_cleanup = now_mono
        for consumer, es in entries.items():
            self._index.remember_all(consumer, es, now_mono)
        self._index.expire(now_mono)
        for d, at in seen.items():
            self._seen[d] = at
        self._committed_devices |= seen.keys()
        m = self._metrics
        m.batches.inc()
        m.events_stored.inc(stored)
        m.status_updates.inc(statuses)
        m.duplicates.inc(duplicates)
        for r in rejected:
            m.rejected.inc(label_value=r)
        if now_mono - self._last_seen_flush > 1.0:
            self._flush_seen()
        return outcomes

    def _committed_before(self, out: BatchWrite) -> bool:
        """Whether the failed previous attempt of this batch had in fact committed.

        A commit can fail after the database made it durable (the connection lost while
        ``COMMIT`` was answered, a fast shutdown of PostgreSQL): writing the batch again would
        store it twice. Event ids are kept across attempts, so one look-up tells; a batch
        without events holds only idempotent changes (statuses, command answers) and records.
        """
        if not out.events:
            return False
        first = out.events[0]
        if not self._store.has_event(first.device_id, first.event_id):
            return False
        log.warning("ingest: the failed commit of a batch had in fact committed; not writing it again")
        return True

    def _flush_seen(self) -> None:
        """Write devices' ``lastSeen`` at most once a second, not once per event.

        Never raises: it runs after a batch's commit, whose messages are answered whatever
        happens here. ``lastSeen`` is advisory; if the update fails (database gone, a lock
        held past ``lock_timeout``, a full disk) the times are kept for the next attempt.
        """
        self._last_seen_flush = time.monotonic()
        if not self._seen:
            return
        seen, self._seen = self._seen, {}
        try:
            self._store.touch_last_seen(seen)
        except Exception as exc:
            log.warning(
                "ingest: lastSeen of %d devices not updated (%s); retrying later",
                len(seen),
                exc,
                exc_info=not isinstance(exc, IotVaultError),
            )
            for device, at in seen.items():
                if self._seen.get(device, 0) < at:
                    self._seen[device] = at

    def _housekeeping(self) -> None:
        self._flush_seen()
        self._index.expire(time.monotonic())

    def forget_devices(self, device_ids: Iterable[str]) -> None:
        for d in device_ids:
            self._devices.entries.pop(d, None)
