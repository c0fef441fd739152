"""Server-side sessions of the web application (backend-for-frontend).

The browser holds one cookie: a random 256-bit value that names a :class:`WebSession` kept
here, in the server's memory, under the value's SHA-256 (a memory dump shows no live cookie).
The session holds the OAuth tokens, which therefore never reach the browser, and the session's
CSRF token, which every state-changing request must echo.

The cookie is ``HttpOnly``, ``SameSite=Strict``, ``Path=/``; under an ``https://`` public URL
also ``Secure`` with the ``__Host-`` prefix (no ``Domain``, so a sibling subdomain cannot set
it). Browsers accept ``__Host-`` only with ``Secure``, which plain ``http://127.0.0.1`` cannot
have, so there the cookie is named without the prefix (:data:`PLAIN_NAME`).

Sessions live in one process: after a restart, or behind a load balancer without sticky
sessions, the browser signs in again (silently while its session at the built-in provider
lasts). An idle session ends after :data:`IDLE_S`, any session after :data:`ABSOLUTE_S`.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Final

PLAIN_NAME: Final = "iotvault-web"
HOST_NAME: Final = "__Host-iotvault-web"
PENDING_SUFFIX: Final = "-login"
IDLE_S: Final = 8 * 3600
ABSOLUTE_S: Final = 7 * 24 * 3600
PENDING_TTL_S: Final = 600
MAX_SESSIONS: Final = 20_000
MAX_PENDING: Final = 20_000


def _key(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass
class WebSession:
    access_token: str
    refresh_token: str | None
    id_token: str | None
    expires_at: float  # wall clock seconds when the access token expires
    user: str  # what the page shows: the user name, or "anonymous"
    anonymous: bool
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    created: float = field(default_factory=time.monotonic)
    used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


@dataclass(frozen=True, slots=True)
class PendingLogin:
    """An authorization request in flight: what the callback must match."""

    state: str
    nonce: str
    verifier: str
    started: float


class SessionStore:
    def __init__(self, *, https: bool) -> None:
        self.https = https
        self.cookie = HOST_NAME if https else PLAIN_NAME
        self.pending_cookie = self.cookie + PENDING_SUFFIX
        self._sessions: dict[str, WebSession] = {}
        self._pending: dict[str, PendingLogin] = {}

    # ---- sessions --------------------------------------------------------------------------
    def create(self, session: WebSession) -> str:
        """Keep ``session``; the cookie value that names it (never stored)."""
        self._expire()
        if len(self._sessions) >= MAX_SESSIONS:  # the oldest goes: memory stays bounded
            oldest = min(self._sessions, key=lambda k: self._sessions[k].used)
            del self._sessions[oldest]
        value = secrets.token_urlsafe(32)
        self._sessions[_key(value)] = session
        return value

    def get(self, value: str | None) -> WebSession | None:
        if not value or len(value) > 128:
            return None
        key = _key(value)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.used > IDLE_S or now - session.created > ABSOLUTE_S:
            del self._sessions[key]
            return None
        session.used = now
        return session

    def drop(self, value: str | None) -> WebSession | None:
        return self._sessions.pop(_key(value), None) if value else None

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [
            k for k, s in self._sessions.items() if now - s.used > IDLE_S or now - s.created > ABSOLUTE_S
        ]:
            del self._sessions[key]

    # ---- logins in flight ------------------------------------------------------------------
    def start_login(self) -> tuple[str, PendingLogin]:
        now = time.monotonic()
        for key in [k for k, p in self._pending.items() if now - p.started > PENDING_TTL_S]:
            del self._pending[key]
        if len(self._pending) >= MAX_PENDING:
            del self._pending[next(iter(self._pending))]
        value = secrets.token_urlsafe(32)
        pending = PendingLogin(
            secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48), now
        )
        self._pending[_key(value)] = pending
        return value, pending

    def finish_login(self, value: str | None) -> PendingLogin | None:
        """The pending login this browser started (once), if it is still fresh."""
        if not value or len(value) > 128:
            return None
        pending = self._pending.pop(_key(value), None)
        if pending is None or time.monotonic() - pending.started > PENDING_TTL_S:
            return None
        return pending

    def set_cookie_header(
        self, name: str, value: str, *, max_age: int | None = None, lax: bool = False
    ) -> str:
        parts = [f"{name}={value}", "Path=/", "HttpOnly", f"SameSite={'Lax' if lax else 'Strict'}"]
        if self.https:
            parts.append("Secure")
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        return "; ".join(parts)
