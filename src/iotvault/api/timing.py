"""Request latency per route, as the operator's Prometheus sees it (``/metrics``).

Plain ASGI, outermost, so that the time includes every middleware (hardening, audit, rate
limits) and the refusals they answer. The route is the matched route's *template*
(``/iotf/devices/{deviceId}``), never the raw path: the label values stay a small, fixed set
that a client cannot grow by calling made-up paths (those count as ``unmatched``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from iotvault.metrics import Histogram

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestTimer:
    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = getattr(scope.get("route"), "path", None)
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.histogram.observe(time.perf_counter() - start, method, route or "unmatched")
