"""The backend-for-frontend bridge: a browser session becomes the API's bearer token.

Plain ASGI middleware, inside :class:`iotvault.api.middleware.Hardening`. For a request that
carries the session cookie and no ``Authorization`` header it

* refuses a state change (any method but GET, HEAD, OPTIONS) unless the request echoes the
  session's CSRF token (header ``X-CSRF-Token``, or the form field ``csrf_token`` that the page
  routes check) and, when the browser says where it comes from (``Origin``), comes from the
  public URL's origin — 403 otherwise;
* refreshes the session's access token when it is about to expire (the provider rotates the
  refresh token), and ends the session when the refresh is refused;
* adds ``Authorization: Bearer <access token>``, so the API's one authenticator and the one
  authorization policy decide, exactly as for any other client.

So the pages and their scripts call the same ``/iotf`` endpoints as everyone else, the
browser never sees a token, and a page of another site can neither read the API (no CORS with
credentials; ``SameSite=Strict``) nor make it change anything (no CSRF token).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from http.cookies import CookieError, SimpleCookie
from typing import Final
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool

from iotvault.api.middleware import ASGIApp, Message, Receive, Scope, Send
from iotvault.api.problems import PROBLEM_JSON
from iotvault.web.client import WebClient
from iotvault.web.session import SessionStore, WebSession

SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
SESSION_KEY: Final = "iotvault.web.session"  # the WebSession in the ASGI scope
COOKIE_KEY: Final = "iotvault.web.cookie"
REFRESH_MARGIN_S: Final = 30
REFRESH_WAIT_S: Final = 10  # how long a request waits for a refresh another one claimed
# the OpenID Connect provider's own endpoints: a session's token is never added to them (the
# token endpoint, for one, must see only the client's own authentication)
PROVIDER_PAGES: Final = frozenset({"/login", "/device"})
PROVIDER_PREFIXES: Final = ("/oauth/", "/device/", "/.well-known/")  # not "/device": "/devices" is ours


def read_cookies(header: str) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return {}
    return {k: m.value for k, m in jar.items()}


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def tokens_ok(session: WebSession, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(session.csrf.encode(), token.encode())


def apply_tokens(session: WebSession, doc: dict[str, object]) -> None:
    session.access_token = str(doc["access_token"])
    refresh = doc.get("refresh_token")
    if isinstance(refresh, str):
        session.refresh_token = refresh
    id_token = doc.get("id_token")
    if isinstance(id_token, str):
        session.id_token = id_token
    expires_in = doc.get("expires_in")
    session.expires_at = time.time() + (float(expires_in) if isinstance(expires_in, int | float) else 60.0)


def apply_session(session: WebSession, current: WebSession) -> None:
    """Take the tokens another request (on any node) refreshed into ``session``."""
    session.access_token = current.access_token
    session.refresh_token = current.refresh_token
    session.id_token = current.id_token
    session.expires_at = current.expires_at
    session.version = current.version


class SessionBridge:
    def __init__(self, app: ASGIApp, *, sessions: SessionStore, client: WebClient) -> None:
        self.app = app
        self.sessions = sessions
        self.client = client
        self.origin = origin_of(client.base)

    async def _fresh(self, value: str, session: WebSession, address: str) -> bool:
        """Whether the session holds a usable access token (refreshed if need be).

        One refresh per session across all nodes: the refresh is claimed in the session's row
        (a spent refresh token, used twice, makes the provider revoke the grant); whoever loses
        the claim waits for the winner's tokens.
        """
        if session.expires_at - REFRESH_MARGIN_S > time.time():
            return True
        if session.refresh_token is None:
            return session.expires_at > time.time()
        if not await run_in_threadpool(self.sessions.claim_refresh, value, session):
            return await self._await_refresh(value, session)
        doc = await run_in_threadpool(self.client.refresh, session.refresh_token, address)
        if doc is None:
            return False
        apply_tokens(session, doc)
        return bool(await run_in_threadpool(self.sessions.save_refreshed, value, session))

    async def _await_refresh(self, value: str, session: WebSession) -> bool:
        """Wait for the refresh another request claimed; whether the session is usable then."""
        deadline = time.monotonic() + REFRESH_WAIT_S
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            current = await run_in_threadpool(self.sessions.get, value)
            if current is None:
                return False
            if current.version != session.version:
                apply_session(session, current)
                break
        return session.expires_at > time.time()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in PROVIDER_PAGES or path.startswith(PROVIDER_PREFIXES):  # the provider's own rules
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        cookie_header, has_authorization = _cookies_and_authorization(headers)
        value = read_cookies(cookie_header).get(self.sessions.cookie) if cookie_header else None
        session = None
        if value and not has_authorization:
            session = await run_in_threadpool(self.sessions.get, value)
        if session is not None and value is not None:
            client = scope.get("client")
            address = client[0] if client else "unknown"
            if not await self._fresh(value, session, address):
                await run_in_threadpool(self.sessions.drop, value)
                session = None
        if session is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] not in SAFE_METHODS:
            origin = next((v.decode("latin-1") for k, v in headers if k == b"origin"), None)
            if origin is not None and origin != self.origin:
                await _forbidden(send, "cross-origin request refused")
                return
            if scope["path"].startswith("/iotf/"):
                token = next((v.decode("latin-1") for k, v in headers if k == b"x-csrf-token"), None)
                if not tokens_ok(session, token):
                    await _forbidden(send, "missing or wrong X-CSRF-Token")
                    return
        scope = dict(scope)
        scope["headers"] = [*headers, (b"authorization", b"Bearer " + session.access_token.encode())]
        scope[SESSION_KEY] = session
        scope[COOKIE_KEY] = value
        await self.app(scope, receive, send)


def _cookies_and_authorization(headers: list[tuple[bytes, bytes]]) -> tuple[str, bool]:
    """The request's cookies (its Cookie headers joined) and whether it brings an Authorization
    header, in one pass (most API requests bring no cookie and are done with here)."""
    cookies: list[bytes] = []
    has_authorization = False
    for k, v in headers:
        if k == b"cookie":
            cookies.append(v)
        elif k == b"authorization":
            has_authorization = True
    return b"; ".join(cookies).decode("latin-1"), has_authorization


async def _forbidden(send: Send, detail: str) -> None:
    body = json.dumps({"type": "about:blank", "title": "Forbidden", "status": 403, "detail": detail}).encode()
    start: Message = {
        "type": "http.response.start",
        "status": 403,
        "headers": [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body})
