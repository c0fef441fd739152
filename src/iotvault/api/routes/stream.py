"""Live events of a device as Server-Sent Events, one lean response per stream.

A stream is held open for hours by a dashboard, and a node serves thousands at once, so what
one stream keeps alive matters more than what one request costs. Starlette's
``StreamingResponse`` ran each stream as an anyio task group of two tasks (the body and a
disconnect listener) around an async generator, and every wait as one more task
(``asyncio.wait_for``): with the framework and middleware frames that no stream can shed, ~40
KiB of the app's memory per stream by tracemalloc, ~50 kB of resident memory (BENCHMARKS.md,
issue 17). :class:`EventStream` writes the frames itself from the request's own task, waits on
one future that a commit, the poll timer, a disconnect or the node's shutdown resolves, and
watches ``receive`` for the disconnect with one plain task.

The frames are made once per event and device, not per stream: the device's shared reads
(:mod:`iotvault.api.livefeed`) hold each event as its finished ``id:``/``event:``/``data:``
frame, and a stream sends what is new for it in one write.

What a client sees is what it saw before: ``: connected`` and ``retry: 2000`` first, then its
events in order from ``Last-Event-ID`` (or from the newest event), a ``: keep-alive`` comment
after ``KEEPALIVE_S`` without events, and the end of the response when the node stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from iotvault.api.deps import Requires
from iotvault.api.problems import Problem
from iotvault.api.routes.devices import EVENT_ID, DeviceIdPath, encoded_events
from iotvault.api.schemas import ERRORS
from iotvault.api.security import services
from iotvault.api.services import ApiServices
from iotvault.auth.policy import Permission, Principal

router = APIRouter(prefix="/iotf", tags=["devices"], responses=ERRORS)
log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream
PAGE = 500  # events one read returns at most (iotvault.api.livefeed.PAGE)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Frame = tuple[str, bytes]  # (event id, the event's whole SSE frame)

HELLO = b": connected\n\nretry: 2000\n\n"
KEEPALIVE = b": keep-alive\n\n"
HEADERS = (
    (b"x-accel-buffering", b"no"),
    (b"cache-control", b"no-store"),
    (b"content-type", b"text/event-stream; charset=utf-8"),
)


def frame(event_id: str, doc: bytes) -> bytes:
    """One ``event`` message; the JSON document on one ``data:`` line (no CR or LF in it)."""
    data = doc.replace(b"\n", b" ").replace(b"\r", b" ")
    return b"id: " + event_id.encode() + b"\nevent: event\ndata: " + data + b"\n\n"


def read_frames(svc: ApiServices, device_id: str, after: str) -> list[Frame]:
    """The events after ``after`` as frames, in one worker-thread call."""
    page = svc.ctx.store.events_page(device_id, count=PAGE, after=after)
    docs = encoded_events(svc.ctx.keyring, svc.event_docs, page)
    return [(e.event_id, frame(e.event_id, doc)) for e, doc in zip(page, docs, strict=True)]


class EventStream(Response):
    """The response of one stream; also what the notifier wakes (:meth:`set`).

    Waits are a future of the loop that :meth:`set` resolves (a commit for the device, or the
    node stopping), the poll timer resolves (events of another node, a missed wake-up), or the
    disconnect watcher resolves. A wake-up while the stream reads or writes is remembered
    (``_woken``), and the stream reads again before it waits.
    """

    media_type = "text/event-stream"

    def __init__(self, svc: ApiServices, device_id: str, cursor: str) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = list(HEADERS)
        self._svc = svc
        self._device_id = device_id
        self._cursor = cursor
        self._waiter: asyncio.Future[bool] | None = None
        self._woken = False
        self._gone = False  # the client disconnected

    def set(self) -> None:
        """Wake the stream (:class:`iotvault.api.services.EventNotifier`; any number of times)."""
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    async def _read(self, after: str) -> list[Frame]:
        """On SQLite right here, as the device reads (:func:`iotvault.api.routes.devices._read`
        says why); elsewhere in a worker thread. One read serves every stream of the device."""
        if self._svc.inline_reads:
            return read_frames(self._svc, self._device_id, after)
        return await run_in_threadpool(read_frames, self._svc, self._device_id, after)

    async def _watch(self, receive: Receive) -> None:
        """Until the client goes: a GET's (empty) body first, then only ``http.disconnect``.

        A client that sends a body anyway has it read and dropped; past the request size limit
        (:class:`iotvault.api.middleware.Hardening` raises) the stream ends as if it had gone.
        """
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception as exc:  # noqa: BLE001 - too late for an answer: the stream ends, said once
            log.info("live stream of %s ended by its request: %s", self._device_id, type(exc).__name__)
        finally:
            self._gone = True
            self.set()

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        svc, device_id = self._svc, self._device_id
        loop = asyncio.get_running_loop()
        poll_s = min(svc.stream_poll_s, KEEPALIVE_S)
        await send({"type": "http.response.start", "status": 200, "headers": list(HEADERS)})
        watcher = loop.create_task(self._watch(receive), name="sse-disconnect")
        svc.notifier.subscribe(device_id, self)
        svc.feeds.join(device_id, self._cursor)  # the streams of a device share its reads
        try:
            await send({"type": "http.response.body", "body": HELLO, "more_body": True})
            quiet_since = loop.time()
            while not (self._gone or svc.stopping.is_set()):
                self._woken = False
                page = await svc.feeds.after(device_id, self._cursor, self._read)
                if page:
                    self._cursor = page[-1][0]
                    body = page[0][1] if len(page) == 1 else b"".join(f for _, f in page)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    quiet_since = loop.time()
                    continue
                if not self._woken and not await self._wait(loop, poll_s):
                    svc.feeds.mark((device_id,))  # a wake-up may have been missed: read again
                if loop.time() - quiet_since >= KEEPALIVE_S and not self._gone:
                    quiet_since = loop.time()
                    await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
            if not self._gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # a server of ASGI 2.4 says so when the client went (uvicorn returns)
            return
        finally:
            watcher.cancel()
            svc.notifier.unsubscribe(device_id, self)
            svc.feeds.leave(device_id)
        if self.background is not None:  # as Starlette's responses do (none is given today)
            await self.background()

    async def _wait(self, loop: asyncio.AbstractEventLoop, poll_s: float) -> bool:
        """Whether the stream was woken (else the poll timer fired)."""
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(poll_s, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


@router.get(
    "/devices/{deviceId}/stream",
    summary="Live events of a device (Server-Sent Events)",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "a stream of `event` messages"}},
)
async def stream(
    request: Request,
    deviceId: DeviceIdPath,
    _p: Annotated[Principal, Requires(Permission.DEVICE_EVENTS_READ)],
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", pattern=EVENT_ID)] = None,
) -> Response:
    svc = services(request)
    ctx = svc.ctx

    def newest() -> str | None:
        if ctx.store.get_device(deviceId) is None:
            raise Problem(404, "device not found")
        latest = ctx.store.last_events(deviceId, 1)
        return latest[0].event_id if latest else None

    # "0" sorts before every event id: a device with no events yet streams all that arrive
    cursor: str = last_event_id or await run_in_threadpool(newest) or "0"
    return EventStream(svc, deviceId, cursor)
