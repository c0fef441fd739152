"""Bounds on slow and abusive HTTP clients, which uvicorn alone leaves open.

uvicorn's h11 protocol closes a keep-alive connection that stays idle *between* requests
(``timeout_keep_alive``), but a connection that sends nothing at all after connecting, or
sends its headers a byte at a time (slowloris), is kept for ever: each one holds a descriptor
and a slot of ``limit_concurrency``, and a few thousand of them starve everyone else. This
protocol adds the missing deadline: a request's headers must be complete within
``header_timeout_s`` of the connection being made or of the previous response, else the
connection is closed and the attempt recorded as a security event (``http_slow_client``).

A header block larger than uvicorn's ``h11_max_incomplete_event_size`` is refused by uvicorn
with 400 and the connection closed; it is recorded here too (``http_headers_too_large``).
Slow *bodies* are bounded by :class:`iotvault.api.middleware.Hardening` (``body_timeout_s``),
which answers 408.

Two protocols with the same bounds: a subclass of uvicorn's ``H11Protocol`` (pure Python),
and of its ``HttpToolsProtocol`` (the C parser ``httptools``, what ``iotvault serve`` uses by
default: ``IOTVAULT_HTTP_PARSER``). httptools has no limit of its own on a header block, so
:class:`GuardedHttpToolsProtocol` counts the bytes received while a request's headers are
awaited and refuses past :data:`MAX_HEADER_BYTES`, as h11 does. The hooks used
(``connection_made``, ``handle_events`` / ``data_received``, ``on_response_complete``,
``send_400_response``, ``cycle``) are those of uvicorn 0.3x-0.5x, covered by the raw-socket
tests in ``tests/integration/test_http_abuse.py`` for both.

Both also write through a :class:`CorkedTransport`: a response's head and body, which uvicorn
writes apart, leave in one system call (BENCHMARKS.md, issue 17, round 6).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

SecurityRecorder = Callable[[str, str, dict[str, Any]], None]
"""``(kind, client address, detail)``: how a refused client becomes a security event."""

MAX_HEADER_BYTES = 64 * 1024
"""The largest request header block (request line and every header): larger is refused with 400.

Room for the largest Authorization header the API accepts (16 KiB) and cookies; uvicorn's
default (h11's 16 KiB) would refuse a legitimate large bearer pair.
"""


class CorkedTransport:
    """A transport whose writes made in one turn of the event loop leave in one ``send``.

    uvicorn writes a response's head and its body apart: two system calls, and two segments
    that wake the client. Held until the loop's next turn, they go out together (a response's
    head and body are sent in one turn). Nothing is held longer than that turn; ``close``
    sends what is held first, ``abort`` drops it. Everything else is the transport's own.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self._flush)
        self._held.append(data)

    def _flush(self) -> None:
        held, self._held = self._held, []
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = []
        self._transport.abort()

    def is_closing(self) -> bool:  # asked twice an answer: not through __getattr__
        return self._transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(b) for b in self._held)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _HeaderDeadline:
    """What both protocols add: a deadline for each request's headers, and the security event.

    Mixed into a uvicorn protocol, whose ``loop``, ``transport``, ``client`` and ``cycle`` it uses.
    One timer per connection, not one per request: a request's headers and the end of its
    answer only note the time (a timer made and cancelled per request was ~2% of a cached
    read's CPU); when the timer fires it closes the connection if the headers awaited since
    then are overdue, else it waits for what is left of their time.
    """

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    client: tuple[str, int] | None
    cycle: Any
    header_timeout_s: float = 10.0
    record: SecurityRecorder | None = None
    _deadline: asyncio.TimerHandle | None = None
    _waiting_since: float | None = None  # since when a request's headers are awaited; None: in one

    def _arm(self) -> None:
        """The connection is made: its first request's headers are awaited from now."""
        self._waiting_since = self.loop.time()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._look)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_in(self) -> None:
        self._waiting_since = None  # the application has the request now

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _rearm_after_response(self) -> None:
        if not self.transport.is_closing() and not self._in_request():
            # the next request's headers are awaited from now (uvicorn's keep-alive covers idleness)
            self._waiting_since = self.loop.time()
            if self._deadline is None:
                self._deadline = self.loop.call_later(self.header_timeout_s, self._look)

    def _look(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        since = self._waiting_since
        left = (
            self.header_timeout_s
            if since is None or self._in_request()
            else since + self.header_timeout_s - self.loop.time()
        )
        if left > 0:  # in a request, or headers awaited for less than their time: look again then
            self._deadline = self.loop.call_later(left, self._look)
            return
        self._report("http_slow_client", {"phase": "headers", "timeout_s": self.header_timeout_s})
        self.transport.close()

    def _report(self, kind: str, detail: dict[str, Any]) -> None:
        address = self.client[0] if self.client else "unknown"
        log.warning("HTTP: %s from %s (%s)", kind, address, detail)
        recorder = type(self).record
        if recorder is not None:
            recorder(kind, address, detail)


class GuardedH11Protocol(_HeaderDeadline, H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CorkedTransport(transport, self.loop))  # type: ignore[arg-type]
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self._in_request():  # the headers are in: the application has the request now
            self._headers_in()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._rearm_after_response()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        if len(self.conn.trailing_data[0]) >= self.conn._max_incomplete_event_size:
            self._report("http_headers_too_large", {"limit_bytes": self.conn._max_incomplete_event_size})
        self._disarm()
        super().send_400_response(msg)


class GuardedHttpToolsProtocol(_HeaderDeadline, HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size limit for each request's headers."""

    _head_bytes = 0  # received since the last request's headers were complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CorkedTransport(transport, self.loop))  # type: ignore[arg-type]
        self._arm()

    def on_headers_complete(self) -> None:
        self._head_bytes = 0
        self._headers_in()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        waiting = not self._in_request()
        if waiting:
            self._head_bytes += len(data)
        super().data_received(data)
        # still no complete headers after this many bytes (a body in the same packet is not
        # counted: on_headers_complete set the count back to 0 before it)
        too_large = waiting and self._head_bytes > MAX_HEADER_BYTES and not self._in_request()
        if too_large and not self.transport.is_closing():
            self._report("http_headers_too_large", {"limit_bytes": MAX_HEADER_BYTES})
            self.send_400_response("Request header fields too large")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._rearm_after_response()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        super().send_400_response(msg)


def guarded_protocol(
    header_timeout_s: float, record: SecurityRecorder | None, parser: str = "h11"
) -> type[GuardedH11Protocol | GuardedHttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these settings baked in.

    uvicorn instantiates the class itself, with its own arguments only, hence a class per node.
    ``parser``: ``httptools`` or ``h11``.
    """
    base: type[GuardedH11Protocol | GuardedHttpToolsProtocol] = (
        GuardedHttpToolsProtocol if parser == "httptools" else GuardedH11Protocol
    )
    return type(
        "NodeHttpProtocol",
        (base,),
        {"header_timeout_s": header_timeout_s, "record": staticmethod(record) if record else None},
    )
