"""The provider's HTTP vocabulary, without a web framework: a request in, an answer out.

The protocol code (:mod:`iotvault.identity.browser`, :mod:`iotvault.identity.grants`) takes a
:class:`Call` and returns an :class:`Answer`; the FastAPI adapter
(:mod:`iotvault.api.routes.oidc`) only copies one from the request and the other into a
response. So every rule is testable without HTTP, and no rule hides in the adapter.

Cookies and CSRF:

* the **session cookie** holds a random 256-bit token; the database keeps only its SHA-256;
* the **browser cookie** holds another random value that no page ever shows. Each form's CSRF
  token is an HMAC of the form's purpose (and its pending request) keyed with that value: a
  page from another site can neither read the cookie nor compute the token, and a token made
  for one form or request is worthless for another.

Both are ``HttpOnly`` and ``SameSite=Lax`` (a cross-site POST carries neither), ``Path=/``,
and under an ``https://`` public URL ``Secure`` with the ``__Host-`` name prefix, which forbids a
``Domain`` attribute, so a sibling subdomain cannot plant them either.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit


@dataclass(frozen=True, slots=True)
class Call:
    """One request as the provider sees it."""

    params: Mapping[str, str]  # the query (GET) or the form body (POST), one value each
    repeated: frozenset[str] = frozenset()  # names that came more than once (RFC 6749, 3.1)
    method: str = "GET"
    authorization: str | None = None
    cookies: Mapping[str, str] = field(default_factory=dict)
    address: str = "unknown"

    def get(self, name: str) -> str | None:
        value = self.params.get(name)
        return value if value else None


@dataclass(frozen=True, slots=True)
class SetCookie:
    name: str
    value: str
    secure: bool
    max_age: int | None = None  # None: until the browser closes; 0: delete


@dataclass(slots=True)
class Answer:
    status: int
    body: bytes = b""
    media_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    cookies: list[SetCookie] = field(default_factory=list)


def json_answer(
    doc: Any, status: int = 200, headers: Mapping[str, str] | None = None, *, cache: str | None = None
) -> Answer:
    """A JSON answer that no cache keeps (RFC 6749, 5.1), unless ``cache`` says otherwise."""
    caching = {"Cache-Control": cache} if cache else {"Cache-Control": "no-store", "Pragma": "no-cache"}
    return Answer(
        status,
        json.dumps(doc, separators=(",", ":")).encode(),
        "application/json",
        {**caching, **(headers or {})},
    )


def redirect(url: str, status: int = 302) -> Answer:
    return Answer(status, media_type="", headers={"Location": url, "Cache-Control": "no-store"})


def with_query(url: str, params: Mapping[str, str | None]) -> str:
    """``url`` with ``params`` added to its query (a registered URI may already have one)."""
    parts = urlsplit(url)
    extra = urlencode({k: v for k, v in params.items() if v is not None})
    query = f"{parts.query}&{extra}" if parts.query and extra else (parts.query or extra)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sha256_hex(value: str) -> str:
    """How a bearer secret (refresh token, code, cookie) is stored: 256 random bits need no
    slow hash."""
    return hashlib.sha256(value.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


class Cookies:
    """The names and attributes of the provider's cookies for one public URL."""

    def __init__(self, https: bool) -> None:
        self.secure = https
        prefix = "__Host-" if https else ""
        self.session = f"{prefix}iotvault-session"
        self.browser = f"{prefix}iotvault-browser"

    def set_session(self, token: str) -> SetCookie:
        return SetCookie(self.session, token, self.secure)

    def clear_session(self) -> SetCookie:
        return SetCookie(self.session, "", self.secure, max_age=0)

    def browser_secret(self, call: Call, answer_cookies: list[SetCookie]) -> str:
        """The browser's CSRF secret: the cookie's, or a new one set with the answer."""
        current = call.cookies.get(self.browser)
        if current and len(current) <= 128:
            return current
        fresh = new_token()
        answer_cookies.append(SetCookie(self.browser, fresh, self.secure))
        return fresh


def csrf_token(secret: str, *purpose: str) -> str:
    return b64url(hmac.new(secret.encode(), "\0".join(("csrf", *purpose)).encode(), hashlib.sha256).digest())


def csrf_ok(secret: str | None, token: str | None, *purpose: str) -> bool:
    if not secret or not token:
        return False
    return hmac.compare_digest(csrf_token(secret, *purpose), token)
