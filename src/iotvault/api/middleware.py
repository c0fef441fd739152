"""OWASP REST hardening applied to every request and response, as plain ASGI middleware.

* security headers on every response (``Cache-Control: no-store``, ``nosniff``, frame denial,
  a restrictive CSP for API answers, HSTS when the public URL is HTTPS);
* credentials are refused in URLs (``?access_token=…`` and friends) with 400, so they never
  land in access logs, browser history or proxies;
* request bodies: ``Content-Type`` must be JSON for the JSON API (415), size is capped by
  ``Content-Length`` and by counting the streamed body (413);
* ``Accept`` must allow what the endpoint produces (406);
* a per-address rate limit answers 429 with ``Retry-After`` before any work is done;
* a request body must arrive within ``body_timeout_s`` (408, a security event): a client
  that trickles its body (slowloris) cannot hold a request open for ever.

Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``: it does not buffer streamed
responses (Server-Sent Events) and costs less per request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from iotvault.api.problems import PROBLEM_JSON, TITLES
from iotvault.api.ratelimit import RateLimiter

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CREDENTIAL_PARAMS = frozenset(
    {"access_token", "id_token", "refresh_token", "api_key", "apikey", "password", "client_secret", "token"}
)
JSON_TYPES = ("application/json", "application/merge-patch+json", "application/problem+json")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

_BASE_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
_API_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
_HSTS = (b"strict-transport-security", b"max-age=63072000; includeSubDomains")


_READ_HEADERS = frozenset({b"accept", b"content-type", b"content-length", b"transfer-encoding"})
_CREDENTIAL_WORDS = ("token", "key", "password", "secret")  # each name in CREDENTIAL_PARAMS holds one
_ACCEPTS_KEPT = 256  # Accept headers whose answer is remembered (a client may send any number)
_ACCEPT_KEPT_LENGTH = 256  # and only headers this short: at most 256 x 256 characters are held


def _read_headers(scope: Scope) -> dict[str, str]:
    """The request headers the hardening reads (the last of a repeated one, as a dict keeps)."""
    found: dict[str, str] = {}
    for k, v in scope["headers"]:
        name = k.lower()
        if name in _READ_HEADERS:
            found[name.decode("latin-1")] = v.decode("latin-1")
    return found


def _has_body(method: str, headers: dict[str, str]) -> bool:
    """Whether a request may come with a body: a body method, or a length or a transfer
    coding announced (HTTP/1.1 has no other way to send one: RFC 9112, 6.3)."""
    return method in BODY_METHODS or "content-length" in headers or "transfer-encoding" in headers


def _may_name_credentials(query: str) -> bool:
    """False only for a query that cannot hold a parameter of :data:`CREDENTIAL_PARAMS` (what
    most are: ``count=50``), so that only the others are parsed; an escaped name (``%``) is."""
    if not query:
        return False
    lowered = query.lower()
    return "%" in query or any(word in lowered for word in _CREDENTIAL_WORDS)


_accepted: dict[tuple[str, str], bool] = {}


def _accepts(accept: str, offered: str) -> bool:
    """Whether an Accept header admits *offered* (q=0 excludes); the answers for the last
    :data:`_ACCEPTS_KEPT` short headers are remembered (clients send the same few again and again)."""
    if len(accept) > _ACCEPT_KEPT_LENGTH:  # none that a client sends again and again
        return _parse_accepts(accept, offered)
    key = (accept, offered)
    known = _accepted.get(key)
    if known is None:
        if len(_accepted) >= _ACCEPTS_KEPT:
            _accepted.clear()
        known = _accepted[key] = _parse_accepts(accept, offered)
    return known


def _parse_accepts(accept: str, offered: str) -> bool:
    if not accept.strip():
        return True
    main = offered.split("/", 1)[0]
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params):
            continue
        if media in ("*/*", offered, f"{main}/*"):
            return True
        if offered == "application/json" and media == "application/problem+json":
            return True
    return False


class Hardening:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body: int,
        https: bool,
        limiter: RateLimiter | None,
        produces: Callable[[str], str | None],
        json_body_paths: Callable[[str], bool],
        body_timeout_s: float = 30.0,
        on_abuse: Callable[[str, str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.on_abuse = on_abuse
        self.max_body = max_body
        self.headers = [*_BASE_HEADERS, *([_HSTS] if https else [])]
        self.api_headers = [*self.headers, _API_CSP]  # answers of the API: a policy of their own
        self.names = frozenset(name for name, _ in self.api_headers)
        self.limiter = limiter
        self.produces = produces
        self.json_body_paths = json_body_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: PLR0911 - one check, one exit
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        headers = _read_headers(scope)
        send_with_headers = self._headed(send, path)

        if self.limiter is not None:
            client = scope.get("client")
            retry = await self.limiter.hit_address(client[0] if client else "unknown")
            if retry is not None:
                await _problem(
                    send_with_headers,
                    429,
                    "too many requests from this address",
                    [(b"retry-after", str(retry).encode())],
                )
                return
        query = scope.get("query_string", b"").decode("latin-1")
        if _may_name_credentials(query) and any(
            k.lower() in CREDENTIAL_PARAMS for k, _ in parse_qsl(query, keep_blank_values=True)
        ):
            await _problem(
                send_with_headers,
                400,
                "credentials are accepted only in the Authorization header, never in the URL",
            )
            return
        produced = self.produces(path)
        if produced is not None and not _accepts(headers.get("accept", ""), produced):
            await _problem(send_with_headers, 406, f"this endpoint produces {produced}")
            return
        if method in BODY_METHODS and self.json_body_paths(path):
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            length = headers.get("content-length")
            if ctype not in JSON_TYPES and (ctype or (length not in (None, "0"))):
                await _problem(send_with_headers, 415, "send the body as application/json")
                return
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await _problem(send_with_headers, 400, "invalid Content-Length")
                return
            if int(length) > self.max_body:
                await _problem(send_with_headers, 413, f"the body is larger than {self.max_body} bytes")
                return

        if not _has_body(method, headers):  # nothing to wait for or to count
            await self.app(scope, receive, send_with_headers)
            return
        guard = _SlowBody(receive, send_with_headers, self.body_timeout_s, lambda: self._slow_body(scope))
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await guard.receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:  # a body without a length, or longer than it said
                    await guard.refuse(413, f"the body is larger than {self.max_body} bytes")
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, counting_receive, guard.send)

    def _headed(self, send: Send, path: str) -> Send:
        """``send``, adding the security headers to the answer's start (those it has not set itself)."""
        extra = self.api_headers if path.startswith(("/iotf", "/healthz", "/readyz")) else self.headers
        names = self.names

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                own = list(message.get("headers", ()))
                present = {k.lower() for k, _ in own}
                if present.isdisjoint(names):  # what nearly every answer is
                    message["headers"] = own + extra
                else:  # the answer's own values of these headers are kept
                    message["headers"] = own + [h for h in extra if h[0] not in present]
            await send(message)

        return send_with_headers

    def _slow_body(self, scope: Scope) -> None:
        if self.on_abuse is not None:
            client = scope.get("client")
            address = client[0] if client else "unknown"
            self.on_abuse("http_slow_client", address, {"phase": "body", "timeout_s": self.body_timeout_s})


class _SlowBody:
    """``receive`` with one deadline for the whole request body (slowloris bodies), and the
    refusal of a body while it arrives (:meth:`refuse`: one too large).

    Past the deadline the client gets 408 with ``Connection: close`` from here and the
    application sees a disconnect; whatever it answers then is dropped (FastAPI turns any
    failure while reading a body into its own 400, so an exception would not get through).
    After the body, ``receive`` only waits for a disconnect (a live stream's) and has no deadline.
    """

    def __init__(
        self, receive: Receive, send: Send, timeout_s: float, on_timeout: Callable[[], None]
    ) -> None:
        self._receive = receive
        self._send = send
        self._timeout_s = timeout_s
        self._on_timeout = on_timeout
        self._deadline: float | None = None
        self._body_done = False
        self._refused = False
        self._started = False

    async def receive(self) -> Message:
        if self._refused:
            return {"type": "http.disconnect"}
        if self._body_done:
            return await self._receive()
        loop = asyncio.get_running_loop()
        if self._deadline is None:
            self._deadline = loop.time() + self._timeout_s
        try:
            message = await asyncio.wait_for(self._receive(), max(0.0, self._deadline - loop.time()))
        except TimeoutError:
            self._on_timeout()
            await self.refuse(408, f"the request body did not arrive within {self._timeout_s:.0f}s")
            return {"type": "http.disconnect"}
        if message["type"] == "http.request":
            self._body_done = not message.get("more_body", False)
        return message

    async def refuse(self, status: int, detail: str) -> None:
        """Answer ``status`` now, with ``Connection: close`` (the rest of the body is not read),
        unless an answer began; from now on the application reads a disconnect and what it
        answers is dropped."""
        self._refused = True
        if not self._started:
            await _problem(self._send, status, detail, [(b"connection", b"close")])

    async def send(self, message: Message) -> None:
        if self._refused:
            return  # the refusal was the answer
        if message["type"] == "http.response.start":
            self._started = True
        await self._send(message)


async def _problem(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(
        {"type": "about:blank", "title": TITLES.get(status, "Error"), "status": status, "detail": detail}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_JSON.encode()),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
