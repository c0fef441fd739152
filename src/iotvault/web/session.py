"""Server-side sessions of the web application (backend-for-frontend), shared by every API node.

The browser holds one cookie: a random 256-bit value that names a :class:`WebSession`. The
session holds the OAuth tokens, which therefore never reach the browser, and the session's
CSRF token, which every state-changing request must echo.

Sessions live in the database (table ``web_sessions``), so that behind a proxy without sticky
sessions a sign-in made through one API node works on every other, and a sign-out (or a session
ended because the provider refused its refresh) ends it on all of them at once: every request
reads its session's row, and the row is gone. The database never holds what would let a reader
use a session (:mod:`iotvault.crypto.cookie_seal`): a row is named by a hash of the cookie value
and sealed with a key derived from it, so opening one takes the browser's cookie. Both kinds of
row (sessions and the sign-ins in flight, which may start on one node and come back to another)
are bounded in number and expire: an idle session after :data:`IDLE_S`, any session after
:data:`ABSOLUTE_S`, a sign-in in flight after :data:`PENDING_TTL_S`. The last use of a session is
written at most every :data:`TOUCH_S`, not on every request.

Refreshing the access token is claimed in the row first (:meth:`SessionStore.claim_refresh`):
two nodes, or two requests, that find it stale at once must not both spend the refresh token
(the provider treats a second use as theft and revokes the grant); the one that loses the claim
waits for the winner's new tokens.

The cookie is ``HttpOnly``, ``SameSite=Strict``, ``Path=/``; under an ``https://`` public URL
also ``Secure`` with the ``__Host-`` prefix (no ``Domain``, so a sibling subdomain cannot set
it). Browsers accept ``__Host-`` only with ``Secure``, which plain ``http://127.0.0.1`` cannot
have, so there the cookie is named without the prefix (:data:`PLAIN_NAME`).

The store's methods do blocking database calls: async code runs them in a worker thread.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from iotvault.crypto.cookie_seal import cookie_id, open_sealed, seal
from iotvault.storage.web_sessions import WebSessionTable

PLAIN_NAME: Final = "iotvault-web"
HOST_NAME: Final = "__Host-iotvault-web"
PENDING_SUFFIX: Final = "-login"
IDLE_S: Final = 8 * 3600
ABSOLUTE_S: Final = 7 * 24 * 3600
PENDING_TTL_S: Final = 600
TOUCH_S: Final = 60
REFRESH_CLAIM_S: Final = 15
MAX_SESSIONS: Final = 20_000
MAX_PENDING: Final = 20_000
MAX_COOKIE: Final = 128
SESSION: Final = "session"
PENDING: Final = "pending"


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


@dataclass
class WebSession:
    access_token: str
    refresh_token: str | None
    id_token: str | None
    expires_at: float  # wall clock seconds when the access token expires
    user: str  # what the page shows: the user name, or "anonymous"
    anonymous: bool
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    created: float = field(default_factory=time.time)  # wall clock: every node must agree
    used: float = field(default_factory=time.time)
    version: int = 0  # the row's version when read: a refresh replaces exactly that one

    def sealed_fields(self) -> dict[str, Any]:
        doc = asdict(self)
        for kept_in_columns in ("created", "used", "version"):
            del doc[kept_in_columns]
        return doc


@dataclass(frozen=True, slots=True)
class PendingLogin:
    """An authorization request in flight: what the callback must match."""

    state: str
    nonce: str
    verifier: str
    started: float


def _expiry_us(created: float, used: float) -> int:
    return _us(min(used + IDLE_S, created + ABSOLUTE_S))


def _usable(value: str | None) -> bool:
    return bool(value) and len(value or "") <= MAX_COOKIE


class SessionStore:
    def __init__(self, table: WebSessionTable, *, https: bool) -> None:
        self.table = table
        self.https = https
        self.cookie = HOST_NAME if https else PLAIN_NAME
        self.pending_cookie = self.cookie + PENDING_SUFFIX

    # ---- sessions --------------------------------------------------------------------------
    def create(self, session: WebSession) -> str:
        """Keep ``session``; the cookie value that names it (never stored)."""
        value = secrets.token_urlsafe(32)
        now = time.time()
        session.created = session.used = now
        self.table.add(
            cookie_id(value),
            SESSION,
            now_us=_us(now),
            expires_us=_expiry_us(now, now),
            sealed=seal(value, json.dumps(session.sealed_fields()).encode()),
            bound=MAX_SESSIONS,
        )
        return value

    def get(self, value: str | None) -> WebSession | None:
        """The live session ``value`` names, or None (unknown, expired, ended, or altered)."""
        if value is None or not _usable(value):
            return None
        row_id = cookie_id(value)
        now = time.time()
        row = self.table.get(row_id, SESSION, now_us=_us(now))
        if row is None:
            return None
        plain = open_sealed(value, row.sealed)
        if plain is None:
            return None
        session = WebSession(
            **json.loads(plain), created=row.created_us / 1e6, used=row.used_us / 1e6, version=row.version
        )
        if now - session.used > TOUCH_S:
            session.used = now
            self.table.touch(row_id, used_us=_us(now), expires_us=_expiry_us(session.created, now))
        return session

    def drop(self, value: str | None) -> WebSession | None:
        """End the session on every node; what it held (its tokens are to be revoked)."""
        if value is None or not _usable(value):
            return None
        session = self.get(value)
        return session if self.table.remove(cookie_id(value), SESSION) else None

    def claim_refresh(self, value: str, session: WebSession) -> bool:
        """Whether this caller, alone, may spend the session's refresh token now."""
        now = time.time()
        return self.table.claim(
            cookie_id(value), session.version, now_us=_us(now), until_us=_us(now + REFRESH_CLAIM_S)
        )

    def save_refreshed(self, value: str, session: WebSession) -> bool:
        """Store the tokens a claimed refresh brought (False: the session ended meanwhile)."""
        sealed = seal(value, json.dumps(session.sealed_fields()).encode())
        if not self.table.replace(cookie_id(value), session.version, sealed):
            return False
        session.version += 1
        return True

    def __len__(self) -> int:
        return self.table.count(SESSION)

    # ---- logins in flight ------------------------------------------------------------------
    def start_login(self) -> tuple[str, PendingLogin]:
        value = secrets.token_urlsafe(32)
        now = time.time()
        pending = PendingLogin(
            secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48), now
        )
        self.table.add(
            cookie_id(value),
            PENDING,
            now_us=_us(now),
            expires_us=_us(now + PENDING_TTL_S),
            sealed=seal(value, json.dumps(asdict(pending)).encode()),
            bound=MAX_PENDING,
        )
        return value, pending

    def finish_login(self, value: str | None) -> PendingLogin | None:
        """The pending login this browser started (once, on whichever node), if still fresh."""
        if value is None or not _usable(value):
            return None
        row_id = cookie_id(value)
        row = self.table.get(row_id, PENDING, now_us=_us(time.time()))
        if row is None or not self.table.remove(row_id, PENDING):  # used once: one remover wins
            return None
        plain = open_sealed(value, row.sealed)
        return PendingLogin(**json.loads(plain)) if plain is not None else None

    def pending_count(self) -> int:
        return self.table.count(PENDING)

    def set_cookie_header(
        self, name: str, value: str, *, max_age: int | None = None, lax: bool = False
    ) -> str:
        parts = [f"{name}={value}", "Path=/", "HttpOnly", f"SameSite={'Lax' if lax else 'Strict'}"]
        if self.https:
            parts.append("Secure")
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        return "; ".join(parts)
