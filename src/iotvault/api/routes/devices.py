"""Device data: the list of readable devices, their latest events, pages of events.

Live events (Server-Sent Events) are :mod:`iotvault.api.routes.stream`.

Payloads are decrypted on the way out; a record that does not decrypt (tampered, or its key
destroyed) is returned with ``payload: null`` and ``error`` set, never as garbage and never as
a 500 for the whole page.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from iotvault.api.deps import Requires
from iotvault.api.problems import Problem
from iotvault.api.readcache import EventDocCache, Page
from iotvault.api.schemas import ERRORS, DeviceOut, EventOut
from iotvault.api.security import services
from iotvault.auth.policy import Permission, Principal, may_list_device
from iotvault.context import Context
from iotvault.documents import RecordOpener, device_doc, event_doc, to_json
from iotvault.domain.ids import UUID_PATTERN
from iotvault.domain.types import Identifier, whole
from iotvault.metrics import Counter
from iotvault.storage.repository import DeviceRecord, StoredEvent

router = APIRouter(prefix="/iotf", tags=["devices"], responses=ERRORS)

READ_THREADS = 4
"""Threads reading device data at once, per app; more requests wait on the event loop.

The database pool is sized for this (:data:`iotvault.node.POOL_SIZES`: 10 for an API node,
12 for one that also ingests, whose writer holds one). With starlette's 40 threads, every read
beyond the pool opened and closed a connection of its own (on SQLite the connect pragmas ran
each time; on PostgreSQL past the overflow a thread waits for one, up to the pool timeout),
and the threads fought over the GIL. With 4, the
same throughput came with a lower p99 (BENCHMARKS.md, "Measurements behind choices in the code").
"""

LATEST_DEFAULT = 50  # events in a last-N read without ``count``
LATEST_MAX = 1000
EVENT_ID = whole(UUID_PATTERN)
DeviceIdPath = Annotated[Identifier, Path(description="deviceId")]


class DeviceList(BaseModel):
    devices: list[DeviceOut]


class DeviceEvents(BaseModel):
    deviceId: str
    events: list[EventOut]


class EventPage(DeviceEvents):
    next: str | None = Field(None, description="cursor for the next page: pass it as `before` (or `after`)")


@router.get(
    "/devices",
    summary="Devices the caller may read (an admin: the whole registry)",
    response_model=DeviceList,
)
async def list_devices(
    request: Request, principal: Annotated[Principal, Requires(Permission.DEVICES_LIST)]
) -> Any:
    svc = services(request)
    if not (principal.readable or principal.admin):
        return {"devices": []}
    devices = await run_in_threadpool(svc.ctx.store.list_devices)
    return {"devices": [device_doc(d) for d in devices if may_list_device(principal, d.device_id)]}


async def _read(request: Request, load: Callable[[], bytes]) -> Response:
    """Run ``load``: on SQLite right here, elsewhere in a worker thread, ``READ_THREADS`` at once.

    ``load`` returns the JSON body. On SQLite a read is tens of microseconds of work in C that
    releases the interpreter lock at every row: in a worker thread each release handed the lock
    to the event loop and the row waited for it back, so a last-50 read cost ~1.2 ms of CPU in
    lock hand-overs alone and half the throughput (BENCHMARKS.md, issue 17). In WAL mode a
    read waits for no writer, so the loop is held only for the read's own work (a 1000-event
    page whose documents are not cached: a few milliseconds). PostgreSQL's driver waits for the
    server once per query, which a thread does without that cost.
    """
    if services(request).inline_reads:
        return Response(load(), media_type="application/json")
    gate: asyncio.Semaphore | None = getattr(request.app.state, "device_reads", None)
    if gate is None:
        gate = request.app.state.device_reads = asyncio.Semaphore(READ_THREADS)
    async with gate:
        body = await run_in_threadpool(load)
    return Response(body, media_type="application/json")


def encoded_events(
    keyring: RecordOpener, cache: EventDocCache, events: list[StoredEvent], *, generation: int | None = None
) -> list[bytes]:
    """Each event's JSON document, from the cache or decrypted and encoded now (and kept).

    The events of one page are of one device. A document that did not decrypt is not kept: it
    says so on every read, until the record opens again or is gone. ``generation`` is the
    cache's as it was before the events were read (read now if not given): documents of a
    device deleted since are not put back.
    """
    if not events:
        return []
    device_id = events[0].device_id
    if generation is None:
        generation = cache.generation
    found = cache.get(device_id, [e.event_id for e in events])
    fresh: list[tuple[str, bytes]] = []
    out: list[bytes] = []
    for e, hit in zip(events, found, strict=True):
        if hit is not None:
            out.append(hit)
            continue
        doc = event_doc(keyring, e)
        encoded = to_json(doc)
        if doc["error"] is None:
            fresh.append((e.event_id, encoded))
        out.append(encoded)
    cache.put(device_id, fresh, generation=generation)
    return out


def _page(device_id: str, docs: list[bytes], *extra: tuple[bytes, Any]) -> bytes:
    """``{"deviceId": ..., "events": [...], ...}`` from encoded documents (what to_json makes)."""
    body = b'{"deviceId":' + to_json(device_id) + b',"events":[' + b",".join(docs) + b"]"
    for name, value in extra:
        body += b',"' + name + b'":' + to_json(value)
    return body + b"}"


def _device_or_404(ctx: Context, device_id: str) -> DeviceRecord:
    device = ctx.store.get_device(device_id)
    if device is None:
        raise Problem(404, "device not found")
    return device


@router.get(
    "/devices/{deviceId}",
    summary="The latest events of a device, newest first",
    response_model=DeviceEvents,
)
async def latest_events(
    request: Request,
    deviceId: DeviceIdPath,
    _p: Annotated[Principal, Requires(Permission.DEVICE_EVENTS_READ)],
    count: Annotated[int, Query(ge=1, le=LATEST_MAX, description="how many events")] = LATEST_DEFAULT,
) -> Response:
    return await newest_page(request, deviceId, count)


INLINE_DOCS = 32
"""Events of a last-N read decrypted on the event loop at most; a page with more documents to
make is made in a read thread (PostgreSQL: SQLite makes every page on the loop)."""


async def newest_page(request: Request, device_id: str, count: int) -> Response:
    """The answer of :func:`latest_events` once its caller is admitted and its parameters valid;
    :mod:`iotvault.api.direct` serves the plain form of the same request with it too.

    A page answered before (:meth:`~iotvault.api.readcache.EventDocCache.kept`) is answered
    again as it was if this process knows it current (found so, and no new event of the device
    heard of since, ``page_trust_ms``) or one statement shows nothing changed, or made from the
    events added since and its own newest if only that changed
    (:meth:`~iotvault.storage.events.EventTable.page_news`); otherwise the page is read
    (:meth:`~iotvault.storage.events.EventTable.newest_events`). Both are awaited on the event
    loop, without a worker thread; only a page with many events to decrypt is made in one.
    """
    svc = services(request)
    docs = svc.event_docs
    kept = docs.kept(device_id, count)
    generation = docs.generation  # before the read: a deletion meanwhile keeps the page out
    answered = svc.metrics.newest_pages
    if kept is not None:
        held = kept.page
        if kept.current:  # found current, and no new event heard of since (page_trust_ms)
            return _as_kept(request, held, answered, "known")
        news = await svc.ctx.store.page_news(device_id, held.check, count)
        if news == []:
            docs.trust(device_id, count, kept)
            return _as_kept(request, held, answered, "unchanged")
        if news is not None:
            answered.inc(label_value="grown")
            keep = count - len(news)
            return await _made(request, device_id, count, news, held.ids[:keep], held.docs[:keep], generation)
    answered.inc(label_value="read")
    page = await svc.ctx.store.newest_events(device_id, count)
    if not page:  # a device's events go with it, so only an empty page asks whether it exists
        await run_in_threadpool(_device_or_404, svc.ctx, device_id)
    return await _made(request, device_id, count, page, (), (), generation)


class _MadeJson(Response):
    """A JSON answer whose body was made before (a kept page): only its two headers are made."""

    def __init__(self, body: bytes) -> None:  # Response's own __init__ would only make these
        self.status_code = 200
        self.background = None
        self.body = body
        self.raw_headers = [
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"application/json"),
        ]


def _as_kept(request: Request, page: Page, answered: Counter, how: str) -> Response:
    """A kept page answered again as it was, counted as ``how`` in ``/metrics``."""
    answered.inc(label_value=how)
    request.state.audit = {"events": len(page.ids)}  # the audit record says how many were read
    return _MadeJson(page.body)


async def _made(
    request: Request,
    device_id: str,
    count: int,
    fresh: list[StoredEvent],
    ids: tuple[str, ...],
    encoded: tuple[bytes, ...],
    generation: int,
) -> Response:
    """The answer of the newest ``count`` events: ``fresh`` (just read, newest first) and then
    the events ``ids`` of a kept page, whose documents are ``encoded``; kept as a page if all
    of it decrypted. Made here on the loop unless many documents are to be made."""
    svc = services(request)
    docs = svc.event_docs
    request.state.audit = {"events": len(fresh) + len(ids)}  # the audit record says how many were read

    def make() -> bytes:
        made = encoded_events(svc.ctx.keyring, docs, fresh, generation=generation)
        body = _page(device_id, [*made, *encoded])
        fresh_ids = [e.event_id for e in fresh]
        if (fresh_ids or ids) and None not in docs.get(device_id, fresh_ids):  # only if all decrypted
            page = Page.of([*fresh_ids, *ids], count, [*made, *encoded], body)
            docs.put_page(device_id, count, page, generation=generation)
        return body

    few = len(fresh) <= INLINE_DOCS or None not in docs.get(device_id, [e.event_id for e in fresh])
    if svc.inline_reads or few:
        return Response(make(), media_type="application/json")
    return await _read(request, make)


def _to_us(value: datetime | None, name: str) -> int | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise Problem(422, f"{name} needs a time zone, e.g. 2026-11-22T10:00:00Z")
    return int(value.timestamp() * 1_000_000)


@router.get(
    "/devices/{deviceId}/events",
    summary="Events of a device, paged by cursor and filtered by time",
    response_model=EventPage,
)
async def events_page(
    request: Request,
    deviceId: DeviceIdPath,
    _p: Annotated[Principal, Requires(Permission.DEVICE_EVENTS_READ)],
    count: Annotated[int, Query(ge=1, le=1000)] = 50,
    before: Annotated[
        str | None, Query(pattern=EVENT_ID, description="events older than this eventId")
    ] = None,
    after: Annotated[
        str | None, Query(pattern=EVENT_ID, description="events newer than this eventId (oldest first)")
    ] = None,
    since: Annotated[datetime | None, Query(description="ISO 8601 time, inclusive")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601 time, inclusive")] = None,
) -> Any:
    if before is not None and after is not None:
        raise Problem(422, "give either before or after, not both")
    since_us, until_us = _to_us(since, "since"), _to_us(until, "until")
    svc = services(request)
    ctx = svc.ctx

    def load() -> bytes:
        page = ctx.store.events_page(
            deviceId, count=count, before=before, after=after, since_us=since_us, until_us=until_us
        )
        if not page:
            _device_or_404(ctx, deviceId)
        request.state.audit = {"events": len(page)}
        nxt = page[-1].event_id if len(page) == count else None
        return _page(deviceId, encoded_events(ctx.keyring, svc.event_docs, page), (b"next", nxt))

    return await _read(request, load)
