"""The plain last-N read, answered without FastAPI's routing and parameter solving.

``GET /iotf/devices/{deviceId}`` with no query or only ``count=N`` is what dashboards poll.
Through FastAPI, matching it against every route and solving its parameters and its
``Requires`` dependency were ~45% of the read's CPU, more than the read itself
(BENCHMARKS.md, issue 17, round 4). :class:`DirectReads` sits innermost among the middlewares
(inside the timer, the audit trail, the hardening and the web session bridge, which all apply
as before) and answers exactly that form itself, with nothing of its own to decide:

- the route, its path and the permission it declares are read from the FastAPI route
  (:func:`iotvault.api.routes.devices.latest_events`), and the caller is admitted by the same
  :func:`iotvault.api.deps.admit` that ``Requires`` calls: authorization stays in one place;
- the answer is made by the same :func:`~iotvault.api.routes.devices.newest_page`;
- refusals and domain errors are answered by :func:`iotvault.api.problems.answer`, as the
  route's exception handlers answer them; an unexpected error goes on up, as it does from a route;
- anything else (another method or path, any other query, a ``count`` or a device id the route
  would refuse, a ``root_path``) goes on to FastAPI untouched, which answers it as before.

It refuses to be built over a route that declares more than it handles (another dependency, a
header, another query parameter): what is added to the route later must not be skipped here
without a word. ``tests/integration/test_direct_reads.py`` compares both ways, answer by answer.

:class:`DirectReadsApp` is the FastAPI application that sends the plain form there: through the
same middlewares as every request (built a second time from the app's own list, in the same
order, around :class:`DirectReads`), but not through FastAPI's own outer layers (its error,
telemetry and body-limit middlewares, ~3% of the read: BENCHMARKS.md, issue 17, round 7),
which have nothing to do for it. An unexpected error is answered as the app's handler of
unexpected errors answers it (500, an incident id, the error in the log).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.requests import Request
from starlette.routing import BaseRoute

from iotvault import errors
from iotvault.api.deps import admit, permission_of
from iotvault.api.problems import Problem, answer, answer_unexpected
from iotvault.api.routes.devices import LATEST_DEFAULT, LATEST_MAX, latest_events, newest_page
from iotvault.auth.policy import Permission
from iotvault.domain.ids import IDENTIFIER_PATTERN
from iotvault.domain.types import whole

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_DEVICE = re.compile(whole(IDENTIFIER_PATTERN))
_FOUND = "iotvault.direct_read"  # the scope key under which DirectReadsApp leaves what plain() found
_COUNT = re.compile(rb"count=([1-9][0-9]{0,3})")


class RouteMismatchError(RuntimeError):
    """The route declares what :class:`DirectReads` would not check or pass on."""


def latest_route(routes: list[BaseRoute]) -> APIRoute:
    """The FastAPI route of the last-N read, as the app holds it."""
    for context in iter_route_contexts(routes):
        route = context.original_route
        if isinstance(route, APIRoute) and route.endpoint is latest_events:
            return route
    raise RouteMismatchError("the app has no last-N read route")


def _declared(route: APIRoute) -> Permission:
    """The route's permission, once its declaration is known to be all that is answered here."""
    d = route.dependant
    shape = {
        "methods": sorted(route.methods or ()),
        "path": [p.name for p in d.path_params],
        "query": [(q.name, q.field_info.default) for q in d.query_params],
        "other": [*d.header_params, *d.cookie_params, *d.body_params],
        "dependencies": [(s.call, bool(s.dependencies)) for s in d.dependencies],
    }
    permission = permission_of(d.dependencies)
    expected_query = [("count", LATEST_DEFAULT)]
    if (
        permission is None
        or shape["methods"] != ["GET"]
        or shape["path"] != ["deviceId"]
        or shape["query"] != expected_query
        or shape["other"]
        or len(d.dependencies) != 1
        or d.dependencies[0].dependencies
    ):
        raise RouteMismatchError(f"{route.path} declares more than iotvault.api.direct answers: {shape}")
    return permission


class DirectReads:
    def __init__(self, app: ASGIApp, *, route: APIRoute) -> None:
        self.app = app
        self.route = route
        self.permission = _declared(route)

    def plain(self, scope: Scope) -> tuple[str, int] | None:
        """The device and count of a plain last-N read, or None for anything else."""
        if scope["type"] != "http" or scope["method"] != "GET" or scope.get("root_path"):
            return None
        match = self.route.path_regex.match(scope["path"])
        if match is None:
            return None
        device_id: str = match.group("deviceId")
        if _DEVICE.fullmatch(device_id) is None:
            return None
        query: bytes = scope.get("query_string", b"")
        if not query:
            return device_id, LATEST_DEFAULT
        given = _COUNT.fullmatch(query)
        if given is None:
            return None
        count = int(given.group(1))
        return (device_id, count) if count <= LATEST_MAX else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        plain = scope.pop(_FOUND, None) or self.plain(scope)
        if plain is None:
            await self.app(scope, receive, send)
            return
        device_id, count = plain
        # what FastAPI's router puts in the scope: the timer and the audit trail read them
        scope["route"] = self.route
        scope["endpoint"] = self.route.endpoint
        scope["path_params"] = {"deviceId": device_id}
        request = Request(scope, receive, send)
        try:
            await admit(self.permission, request)
            response = await newest_page(request, device_id, count)
        except (Problem, errors.IotVaultError) as exc:
            response = answer(request, exc)
        except Exception as exc:  # noqa: BLE001 - what the app's handler of unexpected errors answers
            response = answer_unexpected(request, exc)
        await response(scope, receive, send)


async def _unreachable(scope: Scope, receive: Receive, send: Send) -> None:
    """Behind :class:`DirectReads` in :class:`DirectReadsApp`'s own stack, which only plain reads enter."""
    raise RuntimeError("only a plain last-N read is sent the direct way")


class DirectReadsApp(FastAPI):
    """FastAPI, with the plain last-N read of :meth:`read_directly`'s route served by its
    middlewares and :class:`DirectReads` without FastAPI's outer layers (see the module)."""

    _reads: DirectReads | None = None
    _direct: ASGIApp | None = None

    def read_directly(self, route: APIRoute) -> None:
        self._reads = DirectReads(_unreachable, route=route)

    def build_middleware_stack(self) -> ASGIApp:
        if self._reads is not None:  # the app's middlewares (outermost first) around DirectReads
            direct: ASGIApp = self._reads
            for cls, args, kwargs in reversed(self.user_middleware):
                direct = cls(direct, *args, **kwargs)
            self._direct = direct
        stack: ASGIApp = super().build_middleware_stack()
        return stack

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reads = self._reads
        plain = None if reads is None or self.root_path else reads.plain(scope)
        if plain is None:
            await super().__call__(scope, receive, send)
            return
        scope[_FOUND] = plain  # DirectReads need not look again
        if self.middleware_stack is None:  # built once, both stacks: no middleware added after
            self.middleware_stack = self.build_middleware_stack()
        scope["app"] = self  # as Starlette's own __call__ does: request.app
        assert self._direct is not None  # noqa: S101 - built with the stack
        await self._direct(scope, receive, send)
