"""The audit record of HTTP requests: who did what to which resource, and how it ended.

One pure ASGI middleware, outside the routes, so that no route can forget it: every state change
(any method but GET, HEAD and OPTIONS) and every read of device data or administrative listings
(``GET /iotf/…`` and the web application's device pages) becomes one audit record when its
response ends — actor (the authenticated principal, or ``anonymous``), the route template and
the path's ids, the status, the client address and the request id. The OpenID Connect endpoints
are left to the provider's own events (login success and failure, lockout, revocation), which
reach the audit log as security events with names of failed logins hashed.

A route adds what only it knows (how many events a read returned) to ``request.state.audit``.
Bodies are never recorded. Administrative changes get a record of their own, with the documents
before and after, from the services that make them (:mod:`iotvault.audit.changes`): this
middleware gives them the request's :class:`~iotvault.audit.changes.Origin` (actor, address,
request id).

Each request gets an id: a well-formed ``X-Request-Id`` from the caller is kept, otherwise one is
made (:class:`RequestIds`); it is echoed in the response and stored with the record.
"""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Callable
from typing import Any, Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from iotvault.audit.changes import Origin, enter_origin, leave_origin
from iotvault.clock import now_us
from iotvault.domain.audit import AuditEntry

__all__ = ["AuditTrail"]

_READ_PREFIXES: Final = ("/iotf/", "/devices/", "/api/")
_QUIET_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_REQUEST_ID: Final = re.compile(rb"[A-Za-z0-9._-]{1,64}")


class RequestIds:
    """Ids for requests that bring none: 32 hex digits, unique per process and across processes.

    A random prefix drawn once and a counter: an id names a request in logs and the audit log
    and needs no secrecy (a caller may choose its own). ``uuid4`` per request asked the kernel
    for randomness each time, and that system call let other threads take the interpreter lock
    from the event loop (BENCHMARKS.md, issue 17).
    """

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


def _outcome(status: int) -> str:
    if status < 400:
        return "success"
    if status in (401, 403, 404, 429):
        return "denied"
    return "failure" if status < 500 else "error"


def _actor(state: dict[str, Any]) -> str:
    principal = state.get("principal")
    if principal is None:
        return "anonymous"
    kind = getattr(principal, "kind", "unknown")
    ident = getattr(principal, "id", "")
    return f"{kind}:{ident}" if ident else str(kind)


class AuditTrail:
    """Records requests through ``record`` (the audit log's, which never blocks)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        record: Callable[[AuditEntry], None],
        describe: Callable[[Any], Any],
        skip: frozenset[tuple[str, str]] = frozenset(),
        requests: bool = True,
    ) -> None:
        self.app = app
        self._requests = requests  # False: only the changes' own records (to measure the cost)
        self._record = record
        self._describe = describe
        self._skip = skip  # (method, route path) recorded elsewhere: the provider's endpoints
        self._new_id = RequestIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        path: str = scope["path"]
        audited = self._requests and (method not in _QUIET_METHODS or path.startswith(_READ_PREFIXES))
        request_id = ""
        for name, value in scope.get("headers") or ():
            if name == b"x-request-id":  # the last one, as dict(headers) would give
                request_id = value.decode() if _REQUEST_ID.fullmatch(value) else ""
        if not request_id:
            request_id = self._new_id()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            await send(message)

        state: dict[str, Any] = scope.setdefault("state", {})
        client = scope.get("client")
        address = str(client[0]) if client else ""

        def where() -> Origin:  # built only if the request changes something: reads do not
            return Origin(self._record, lambda: _actor(state), self._describe, address, request_id)

        token = enter_origin(where)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            leave_origin(token)
            if audited:
                self._after(scope, method, path, status, address, request_id)

    def _after(
        self, scope: Scope, method: str, path: str, status: int, address: str, request_id: str
    ) -> None:
        route = scope.get("route")
        template = str(getattr(route, "path", "") or path)
        if (method, template) in self._skip:
            return
        state: dict[str, Any] = scope.get("state") or {}
        detail: dict[str, Any] = {"method": method, "route": template, "status": status}
        extra = state.get("audit")
        if isinstance(extra, dict):
            detail.update(extra)
        params = scope.get("path_params") or {}
        target = str(params.get("deviceId") or params.get("userName") or params.get("groupName") or path)
        self._record(
            AuditEntry(
                now_us(),
                _actor(state),
                "http.request",
                target[:200],
                _outcome(status),
                address,
                request_id,
                detail,
            )
        )
