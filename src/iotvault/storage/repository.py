"""The repository interface: what the rest of iotvault may ask of storage.

Plain records in, plain records out; the payload of a :class:`StoredEvent` is always the
encrypted record, never plaintext. :class:`iotvault.storage.sql.SqlStore` implements it for
SQLite and PostgreSQL; unit tests of pure logic may use a small fake. What the key ring reads
is declared beside it, as :class:`iotvault.crypto.keyring.KeyStore`: crypto imports no storage.

Methods are synchronous: the ingest path calls them from its one writer thread, the command
line directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: str
    type_id: str
    status: str
    last_seen_us: int | None
    metadata: Mapping[str, Any]
    created_us: int
    command_delivery: str = "signed"  # or "unsigned": the payload as sent (Watson's way)


class PageCheck(NamedTuple):
    """What a newest-first page read before held, enough to tell whether it still would.

    Events are only ever added (a device's go all at once, with it), so the page is unchanged
    while as many events as it held have an id from its ``oldest`` on and the newest is its
    ``newest``. ``oldest`` is "" for a page that held all the device's events (fewer than asked
    for): then an event stored late with an older id changes it too.
    """

    oldest: str
    length: int
    newest: str


class StoredEvent(NamedTuple):
    """One stored event. A named tuple rather than a frozen dataclass: ingest makes one per
    event and a page read 50 at a time, and a tuple is much cheaper to make (BENCHMARKS.md)."""

    device_id: str
    event_id: str
    type_id: str
    event_type: str
    fmt: str
    received_us: int
    payload: bytes  # the encrypted record


@dataclass(frozen=True, slots=True)
class RejectedMessage:
    received_us: int
    source: str
    topic: str
    device_id: str | None
    reason: str
    size: int


@dataclass(frozen=True, slots=True)
class InflightRecord:
    """Messages committed but maybe not yet acknowledged to the sender (see ingest.dedupe)."""

    consumer: str
    created_us: int
    entries: bytes
    id: int | None = None


@dataclass(frozen=True, slots=True)
class CommandAck:
    """A device's answer (``cmdack``) to one of its commands, applied with the batch holding it."""

    device_id: str
    command_id: str
    status: str  # acknowledged | rejected | expired
    reason: str | None
    at_us: int
    verified: bool = True  # False: the device could not verify what it refused; never applied


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """A command sent to a device (``commands`` table); the payload is kept only as a digest."""

    command_id: str
    device_id: str
    type_id: str
    command: str
    seq: int
    status: str  # sent | delivered | acknowledged | rejected | failed (expired derived when read)
    reason: str | None
    payload_sha256: str
    issued_us: int
    expires_us: int
    updated_us: int
    sent_by: str
    delivery: str = "signed"  # "unsigned": the payload as sent, "delivered" once the broker took it


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    """What the broker needs to admit a device: its type and credential hashes."""

    device_id: str
    type_id: str
    credential_hash: str | None
    previous_credential_hash: str | None
    previous_expires_us: int | None


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    """One row of ``security_events``; ``detail`` is small JSON, never a payload or a secret."""

    at_us: int
    kind: str
    subject: str
    detail: Mapping[str, Any] = field(default_factory=dict)
    id: int | None = None


@dataclass(slots=True)
class BatchWrite:
    """Everything one ingest batch changes, committed in one transaction."""

    events: list[StoredEvent] = field(default_factory=list)
    rejected: list[RejectedMessage] = field(default_factory=list)
    statuses: dict[str, tuple[str, int]] = field(default_factory=dict)  # device -> (status, at_us)
    inflight: list[InflightRecord] = field(default_factory=list)
    delete_inflight_before_us: int | None = None
    command_acks: list[CommandAck] = field(default_factory=list)


class DeviceStore(Protocol):
    def add_device(
        self, device: DeviceRecord, *, wrapped_key: bytes, credential_hash: str | None
    ) -> None: ...
    def get_device(self, device_id: str) -> DeviceRecord | None: ...
    def list_devices(self) -> list[DeviceRecord]: ...
    def delete_device(self, device_id: str) -> bool: ...
    def set_credential(
        self, device_id: str, credential_hash: str, *, previous_valid_until_us: int | None
    ) -> None: ...


class EventStore(Protocol):
    def write_batch(self, batch: BatchWrite) -> None: ...
    def touch_last_seen(self, seen: Mapping[str, int]) -> None: ...
    def last_events(self, device_id: str, count: int) -> list[StoredEvent]: ...
    def events_page(
        self,
        device_id: str,
        *,
        count: int,
        before: str | None = None,
        after: str | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
    ) -> list[StoredEvent]: ...
    async def newest_events(self, device_id: str, count: int) -> list[StoredEvent]: ...
    async def page_news(self, device_id: str, check: PageCheck, count: int) -> list[StoredEvent] | None: ...
    def count_events(self, device_id: str | None = None) -> int: ...
    def replace_payloads(self, rows: Sequence[tuple[str, str, bytes]]) -> None: ...
    def load_inflight(self) -> list[InflightRecord]: ...
    def list_rejected(self, limit: int = 100) -> list[RejectedMessage]: ...
