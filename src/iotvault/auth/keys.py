"""The keys a bearer token may be verified with: pinned algorithms, static keys, remote JWKS.

A key verifies with exactly one algorithm, chosen by its type (:func:`pinned_algorithm`); a
remote issuer's keys come from its discovery document over HTTPS (loopback HTTP for tests and
a local issuer), bounded in size and count, refreshed at most once per
``min_refresh_interval_s`` (:class:`RemoteJwks`). :mod:`iotvault.auth.tokens` has the rules
each one defends against.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import httpx
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, JWKRegistry, Key, KeySet, OctKey, OKPKey, RSAKey

from iotvault.auth.claims import InvalidTokenError
from iotvault.errors import ConfigError, ValidationError

log = logging.getLogger(__name__)

_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*")
# a remote JWKS: bounded in size and count, and fetched with a short timeout
_RSA_BITS: Final = (2048, 4096)  # below: too weak; above: costly to verify, and nobody uses it
_MAX_DOCUMENT_BYTES: Final = 256 * 1024
_MAX_JWKS_KEYS: Final = 64
_HTTP_TIMEOUT_S: Final = 5.0
_DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
_LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "::1"})
_PRIVATE_MEMBERS: Final = {
    "RSA": frozenset({"d", "p", "q", "dp", "dq", "qi", "oth"}),
    "EC": frozenset({"d"}),
    "OKP": frozenset({"d"}),
}


def pinned_algorithm(key: Key) -> str | None:
    """The one JWS algorithm ``key`` may verify, or None when iotvault never uses such a key.

    A key whose own ``alg``, ``use`` or ``key_ops`` says something else is not used either.
    """
    alg: str | None = None
    if isinstance(key, RSAKey) and _RSA_BITS[0] <= key.public_key.key_size <= _RSA_BITS[1]:
        alg = "RS256"
    elif isinstance(key, ECKey) and key.curve_name == "P-256":
        alg = "ES256"
    elif isinstance(key, OKPKey) and key.curve_name == "Ed25519":
        alg = "EdDSA"
    if alg is None or key.alg not in (None, alg) or key.get("use") not in (None, "sig"):
        return None
    key_ops = key.get("key_ops")
    if key_ops is not None and "verify" not in key_ops:
        return None
    return alg


def public_keyset(private: KeySet) -> KeySet:
    """The public half of a signing key set, as a JWKS may publish it.

    Every private member is dropped; ``kid``, ``alg`` and ``use`` are kept. A symmetric (oct)
    key has no public half and is refused: publishing it would publish the secret.
    """
    public: list[Key] = []
    for key in private:
        if isinstance(key, OctKey):
            raise ValidationError("keyset", "a symmetric (oct) key has no public part and is never published")
        key.ensure_kid()
        public.append(JWKRegistry.import_key(key.as_dict(private=False)))
    return KeySet(public)


class KeySource(Protocol):
    """Where an issuer's verification keys come from."""

    async def keys(self, *, refresh: bool = False) -> KeySet:
        """The issuer's public keys; ``refresh`` asks for newer ones (a hint, rate-limited)."""
        ...


class StaticKeys:
    """A fixed set of public keys: the built-in provider's, or a test's."""

    def __init__(self, keyset: KeySet) -> None:
        for key in keyset:
            if isinstance(key, OctKey) or key.is_private:
                raise ValidationError("keys", "StaticKeys takes public keys only; pass public_keyset(keys)")
        self._keyset = keyset

    async def keys(self, *, refresh: bool = False) -> KeySet:
        return self._keyset


class _FetchError(Exception):
    """Internal: the issuer's discovery document or JWKS could not be had; never escapes."""


def _is_loopback_http(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS


def _is_https(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "https" and bool(parts.hostname)


class RemoteJwks:
    """An external issuer's keys, found through OpenID Connect discovery and cached.

    ``keys()`` fetches ``{issuer}/.well-known/openid-configuration``, checks that its
    ``issuer`` is the configured one exactly, then fetches its ``jwks_uri`` (HTTPS; plain HTTP
    only for an issuer on the loopback interface, for tests and local development). Keys are
    cached for ``cache_ttl_s``. A refresh happens at most once per ``min_refresh_interval_s``,
    whoever asks and however often. When a refresh fails, the keys already fetched stay in use
    (an issuer's short outage must not lock every user out) and the failure is logged; when
    there are none yet, tokens are refused with ``issuer keys unavailable``.

    ``http`` is the caller's client (and stays open); without it each fetch uses its own.
    """

    def __init__(
        self,
        issuer: str,
        *,
        http: httpx.AsyncClient | None = None,
        min_refresh_interval_s: float = 60.0,
        cache_ttl_s: float = 3600.0,
    ) -> None:
        parts = urlsplit(issuer)
        if not (_is_https(issuer) or _is_loopback_http(issuer)) or parts.query or parts.fragment:
            raise ConfigError(
                "oidc_external_issuer",
                f"expected an https:// URL without query or fragment, got {issuer!r}",
            )
        if min_refresh_interval_s < 0 or cache_ttl_s < 0:
            raise ConfigError("oidc_external_issuer", "refresh interval and cache TTL must not be negative")
        self.issuer = issuer
        self._http = http
        self._min_refresh_interval_s = min_refresh_interval_s
        self._cache_ttl_s = cache_ttl_s
        self._keyset: KeySet | None = None
        self._fetched_at = -math.inf  # time.monotonic() of the last successful fetch
        self._attempted_at = -math.inf  # ... and of the last attempt, failed or not
        self._lock = asyncio.Lock()

    async def keys(self, *, refresh: bool = False) -> KeySet:
        if self._keyset is not None and not refresh and not self._stale():
            return self._keyset
        async with self._lock:
            # whoever held the lock before may have fetched already; the interval decides
            if time.monotonic() - self._attempted_at < self._min_refresh_interval_s:
                return self._current()
            if self._keyset is not None and not refresh and not self._stale():
                return self._keyset
            self._attempted_at = time.monotonic()
            try:
                self._keyset = await self._fetch()
            except _FetchError as exc:
                log.warning("keys of issuer %s unavailable: %s", self.issuer, exc)
                return self._current()
            self._fetched_at = time.monotonic()
            return self._keyset

    def _stale(self) -> bool:
        return time.monotonic() - self._fetched_at >= self._cache_ttl_s

    def _current(self) -> KeySet:
        if self._keyset is None:
            raise InvalidTokenError("issuer keys unavailable")
        return self._keyset

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[httpx.AsyncClient]:
        if self._http is not None:
            yield self._http
            return
        async with httpx.AsyncClient(timeout=_HTTP_TIMEOUT_S, follow_redirects=False) as client:
            yield client

    async def _fetch(self) -> KeySet:
        async with self._client() as client:
            discovery = await _get_json(client, self.issuer.rstrip("/") + _DISCOVERY_PATH)
            if not isinstance(discovery, dict) or discovery.get("issuer") != self.issuer:
                named = discovery.get("issuer") if isinstance(discovery, dict) else None
                raise _FetchError(f"the discovery document names issuer {named!r}")
            jwks_uri = discovery.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not (
                _is_https(jwks_uri) or (_is_loopback_http(self.issuer) and _is_loopback_http(jwks_uri))
            ):
                raise _FetchError(f"jwks_uri {jwks_uri!r} is not an https:// URL")
            jwks = await _get_json(client, jwks_uri)
        keyset = _import_jwks(jwks)
        log.info("fetched %d usable keys of issuer %s", len(keyset.keys), self.issuer)
        return keyset


async def _get_json(client: httpx.AsyncClient, url: str) -> Any:
    try:
        async with client.stream("GET", url, headers={"Accept": "application/json"}) as response:
            if response.status_code != 200:
                raise _FetchError(f"GET {url} answered {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > _MAX_DOCUMENT_BYTES:
                    raise _FetchError(f"GET {url} returned more than {_MAX_DOCUMENT_BYTES} bytes")
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise _FetchError(f"GET {url} failed: {exc!r}") from exc
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _FetchError(f"GET {url} did not return JSON") from exc


def _import_jwks(document: Any) -> KeySet:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise _FetchError("the JWKS is not a JSON object with a list of keys")
    keys = (_import_public_jwk(item) for item in document["keys"][:_MAX_JWKS_KEYS])
    return KeySet([key for key in keys if key is not None])


def _import_public_jwk(item: Any) -> Key | None:
    """A published key as a public key, or None when it is not one iotvault would use."""
    if not isinstance(item, dict) or item.get("kty") not in _PRIVATE_MEMBERS:
        return None  # symmetric and unknown key types are never used
    if item["kty"] == "RSA" and not _rsa_size_acceptable(item.get("n")):
        return None  # checked before import, which would only warn
    public = {name: value for name, value in item.items() if name not in _PRIVATE_MEMBERS[item["kty"]]}
    try:
        key = JWKRegistry.import_key(public)
    except (JoseError, ValueError, TypeError, KeyError):
        return None
    return key if pinned_algorithm(key) is not None else None


def _rsa_size_acceptable(modulus: Any) -> bool:
    if not isinstance(modulus, str) or not _B64URL.fullmatch(modulus) or len(modulus) > 1024:
        return False
    try:
        raw = base64.urlsafe_b64decode(modulus + "=" * (-len(modulus) % 4))
    except (binascii.Error, ValueError):
        return False
    bits = int.from_bytes(raw, "big").bit_length()
    return _RSA_BITS[0] <= bits <= _RSA_BITS[1]
