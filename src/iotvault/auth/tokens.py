"""Bearer tokens: verification of JWT access tokens and the seed's optional ID token.

iotvault is an OAuth 2.0 resource server. It accepts access tokens from its own OpenID Connect
provider (the *local* issuer) and from configured external issuers, and turns a verified token
into :class:`TokenClaims`. Nothing here knows HTTP requests: the API layer passes the strings
of ``Authorization: Bearer <access> [<id>]`` to :meth:`TokenVerifier.verify` and answers 401
to :class:`InvalidTokenError`, whose ``reason`` is short and safe to show.

Each rule defeats a known attack on JWT verifiers:

* Only the JWS compact form, at most 8 KiB, parsed here before any cryptography: header and
  payload must be base64url JSON objects without duplicate names. Odd input dies early, and
  always as :class:`InvalidTokenError`.
* The algorithm is pinned per key, by its type: RSA (2048 to 4096 bits) → RS256, EC P-256 →
  ES256, OKP Ed25519 → EdDSA. The header's ``alg`` is only compared with that pin; ``none``,
  HMAC and everything else is refused. This is what defeats the forged "HS256 token whose HMAC
  key is the issuer's *public* key".
* ``kid`` is untrusted: it only selects, by exact match, among keys already configured or
  published by the issuer. Headers that carry or point to a key (``jwk``, ``jku``, ``x5c``,
  ``x5u``) are refused outright, as are ``crit`` and ``b64`` (RFC 7797), which no issuer
  needs for a JWT.
* The unverified ``iss`` only chooses the configured issuer to verify with. The signature is
  checked before any other claim, so the reason given for a forged token never depends on
  what it claims.
* A remote issuer's keys come from its discovery document, whose ``issuer`` must equal the
  configured one exactly, over HTTPS. An unknown ``kid`` refreshes them at most once per
  ``min_refresh_interval_s``: random kids cannot make iotvault hammer the issuer.

The token format the built-in provider (:mod:`iotvault.identity`) issues, so that both sides
agree:

* header ``{"alg": "ES256", "kid": ..., "typ": "at+jwt"}`` for access tokens (RFC 9068) and
  ``"typ": "JWT"`` for ID tokens; the JWKS holds public members only (:func:`public_keyset`);
* ``iss`` = ``IOTVAULT_PUBLIC_URL`` exactly; ``aud`` = the API's audience in access tokens, the
  client id in ID tokens; ``sub`` a stable user id; ``exp``, ``iat``, ``jti``, ``client_id``;
  ``scope`` space separated; ``preferred_username`` = the user's ``userName``; ``amr`` =
  ``["pwd"]``, or ``["anon"]`` after anonymous login. Local users' groups are read from the
  database, so ``groups`` is optional in local tokens.
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
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import httpx
from joserfc import jws
from joserfc.errors import InvalidKeyCurveError, JoseError
from joserfc.jwa import JWSAlgModel
from joserfc.jwk import ECKey, JWKRegistry, Key, KeySet, OctKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

from iotvault.errors import ConfigError, IotVaultError, ValidationError

__all__ = [
    "MAX_TOKEN_LENGTH",
    "InvalidTokenError",
    "IssuerConfig",
    "KeySource",
    "RemoteJwks",
    "StaticKeys",
    "TokenClaims",
    "TokenVerifier",
    "pinned_algorithm",
    "public_keyset",
]

log = logging.getLogger(__name__)

MAX_TOKEN_LENGTH: Final = 8 * 1024
_MAX_HEADER_SEGMENT: Final = 1024  # base64url characters; real headers are under 300
_MAX_KID_LENGTH: Final = 256
_MAX_SUBJECT_LENGTH: Final = 255  # OpenID Connect Core 1.0, section 2
_RSA_BITS: Final = (2048, 4096)  # below: too weak; above: costly to verify, and nobody uses it
_ACCEPTED_TYPES: Final = frozenset({"jwt", "application/jwt", "at+jwt", "application/at+jwt"})
_KEY_HEADERS: Final = ("jwk", "jku", "x5c", "x5u")  # a token never chooses its own key
_UNSUPPORTED_HEADERS: Final = ("crit", "b64", "enc", "zip")
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*")
_PRINTABLE_ASCII: Final = re.compile(r"[\x21-\x7e]+")

# a remote JWKS: bounded in size and count, and fetched with a short timeout
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


class InvalidTokenError(IotVaultError):
    """A bearer token is refused. ``reason`` is short and safe to show to the caller.

    Reasons: ``malformed token``, ``token too large``, ``algorithm not allowed``, ``header
    carries a key``, ``unsupported header``, ``malformed key id``, ``wrong token type``,
    ``unknown issuer``, ``unknown key``, ``algorithm does not match the key``, ``bad
    signature``, ``issuer keys unavailable``, ``malformed claims``, ``missing expiry``,
    ``expired``, ``not yet valid``, ``issued in the future``, ``wrong audience``, ``missing
    subject``, ``ID token from another issuer``, ``ID token subject differs``.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"invalid token: {reason}")


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a verified access token says about its bearer."""

    subject: str
    issuer: str
    audience: tuple[str, ...]
    expires_at: int
    groups: tuple[str, ...]  # from the issuer's groups claim; empty when absent
    anonymous: bool  # "anon" in ``amr``: App ID's anonymous login
    scopes: tuple[str, ...]
    user_name: str | None  # ``preferred_username``
    local: bool  # issued by iotvault's own provider
    claims: Mapping[str, Any] = field(repr=False, compare=False)  # all verified claims, read-only


# ---- keys -----------------------------------------------------------------------------------
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
        bits = int.from_bytes(_b64decode(modulus), "big").bit_length()
    except InvalidTokenError:
        return False
    return _RSA_BITS[0] <= bits <= _RSA_BITS[1]


# ---- the verifier ---------------------------------------------------------------------------
@dataclass(frozen=True)
class IssuerConfig:
    """An issuer whose tokens are accepted, and how to read them."""

    issuer: str
    audience: str
    keys: KeySource
    groups_claim: str = "groups"
    local: bool = False
    leeway_s: int = 30

    def __post_init__(self) -> None:
        prefix = "" if self.local else "oidc_external_"
        if not self.issuer:
            raise ConfigError("public_url" if self.local else "oidc_external_issuer", "must not be empty")
        if not self.audience:
            raise ConfigError(f"{prefix}audience", "must not be empty")
        if not self.groups_claim:
            raise ConfigError(f"{prefix}groups_claim", "must not be empty")
        if not 0 <= self.leeway_s <= 300:
            raise ConfigError(f"{prefix}leeway_s", f"{self.leeway_s} is outside 0..300")


class _EdDSAOnEd25519(JWSAlgModel):
    """The "EdDSA" algorithm on Ed25519 keys only, verified by joserfc's RFC 9864 "Ed25519".

    joserfc warns on every use of its own "EdDSA", which RFC 9864 deprecates because the name
    does not say which curve. The pin per key says it here, so the warning does not apply.
    """

    name = "EdDSA"
    description = "EdDSA with Ed25519 keys only"
    key_type = "OKP"
    _ed25519: Final = JWSRegistry.algorithms["Ed25519"]

    def check_key(self, key: OKPKey) -> None:
        super().check_key(key)  # use, key type and the key's own "alg"
        if key.curve_name != "Ed25519":
            raise InvalidKeyCurveError("EdDSA is accepted with Ed25519 keys only")

    def sign(self, msg: bytes, key: OKPKey) -> bytes:
        return self._ed25519.sign(msg, key)

    def verify(self, msg: bytes, sig: bytes, key: OKPKey) -> bool:
        return self._ed25519.verify(msg, sig, key)


class _PinnedRegistry(JWSRegistry):
    """The only algorithms iotvault verifies, each instance allowing exactly one of them."""

    algorithms: dict[str, JWSAlgModel] = {  # noqa: RUF012 - joserfc's class-level registry
        "RS256": JWSRegistry.algorithms["RS256"],
        "ES256": JWSRegistry.algorithms["ES256"],
        "EdDSA": _EdDSAOnEd25519(),
    }
    recommended: list[str] = []  # noqa: RUF012 - as above; every use names its one algorithm
    max_header_length = _MAX_HEADER_SEGMENT


_REGISTRIES: Final = {
    alg: _PinnedRegistry(algorithms=[alg], strict_check_header=False) for alg in _PinnedRegistry.algorithms
}


@dataclass(frozen=True, slots=True)
class _Token:
    """A token whose structure is sound; nothing in it is verified yet."""

    compact: str
    alg: str
    kid: str | None
    typ: str | None
    claims: dict[str, Any]


def _b64decode(segment: str) -> bytes:
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise InvalidTokenError("malformed token")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise InvalidTokenError("malformed token") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        # parsers disagree on which duplicate wins; a signed token has no reason to carry any
        raise ValueError("duplicate member name")
    return result


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(segment: str) -> dict[str, Any]:
    try:
        value = json.loads(
            _b64decode(segment).decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_refuse_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidTokenError("malformed token") from None
    if not isinstance(value, dict):
        raise InvalidTokenError("malformed token")
    return value


def _parse(compact: object) -> _Token:
    if not isinstance(compact, str):
        raise InvalidTokenError("malformed token")
    if len(compact) > MAX_TOKEN_LENGTH:
        raise InvalidTokenError("token too large")
    segments = compact.split(".")
    if len(segments) != 3 or not all(segments):
        raise InvalidTokenError("malformed token")  # JWE (5 parts), detached or unsigned
    if len(segments[0]) > _MAX_HEADER_SEGMENT:
        raise InvalidTokenError("malformed token")
    header = _json_object(segments[0])
    claims = _json_object(segments[1])

    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in _REGISTRIES:
        raise InvalidTokenError("algorithm not allowed")
    if any(name in header for name in _KEY_HEADERS):
        raise InvalidTokenError("header carries a key")
    if any(name in header for name in _UNSUPPORTED_HEADERS):
        raise InvalidTokenError("unsupported header")
    kid = header.get("kid")
    if "kid" in header and not (
        isinstance(kid, str) and len(kid) <= _MAX_KID_LENGTH and _PRINTABLE_ASCII.fullmatch(kid)
    ):
        raise InvalidTokenError("malformed key id")
    typ = header.get("typ")
    if "typ" in header and not (isinstance(typ, str) and typ.lower() in _ACCEPTED_TYPES):
        raise InvalidTokenError("wrong token type")
    return _Token(compact, alg, kid, typ, claims)


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidTokenError("malformed claims")
    return float(value)


def _strings(value: Any) -> tuple[str, ...]:
    """A claim holding a list of strings, or one space-separated string (as OAuth's ``scope``)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise InvalidTokenError("malformed claims")


def _audience(value: Any) -> tuple[str, ...]:
    """``aud``: one string (taken whole, spaces and all) or a list of strings (RFC 7519)."""
    if isinstance(value, str):
        return (value,)
    if value is None or (isinstance(value, list) and all(isinstance(item, str) for item in value)):
        return tuple(value or ())
    raise InvalidTokenError("malformed claims")


def _check_times(claims: Mapping[str, Any], now: float, leeway_s: int) -> float:
    exp = _number(claims, "exp")
    if exp is None:
        raise InvalidTokenError("missing expiry")
    if now >= exp + leeway_s:
        raise InvalidTokenError("expired")
    nbf = _number(claims, "nbf")
    if nbf is not None and nbf > now + leeway_s:
        raise InvalidTokenError("not yet valid")
    iat = _number(claims, "iat")
    if iat is not None and iat > now + leeway_s:
        raise InvalidTokenError("issued in the future")
    return exp


def _subject(claims: Mapping[str, Any]) -> str:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise InvalidTokenError("missing subject")
    if len(sub) > _MAX_SUBJECT_LENGTH:
        raise InvalidTokenError("malformed claims")
    return sub


class TokenVerifier:
    """Verifies bearer tokens against the configured issuers; one instance per application."""

    def __init__(self, issuers: Sequence[IssuerConfig]) -> None:
        self._issuers: dict[str, IssuerConfig] = {}
        for config in issuers:
            if config.issuer in self._issuers:
                raise ConfigError(
                    "oidc_external_issuer",
                    f"issuer {config.issuer!r} is configured twice (is it the public URL?)",
                )
            self._issuers[config.issuer] = config

    async def verify(self, access_token: str, id_token: str | None = None) -> TokenClaims:
        """Verify an access token, and the ID token beside it if given; refuse with
        :class:`InvalidTokenError`."""
        access = _parse(access_token)
        issuer = access.claims.get("iss")
        config = self._issuers.get(issuer) if isinstance(issuer, str) else None
        if config is None:
            raise InvalidTokenError("unknown issuer")
        await _check_signature(access, config)

        claims = access.claims
        now = time.time()
        exp = _check_times(claims, now, config.leeway_s)
        audience = _audience(claims.get("aud"))
        if config.audience not in audience:
            raise InvalidTokenError("wrong audience")
        subject = _subject(claims)
        groups = _strings(claims.get(config.groups_claim))
        amr = _strings(claims.get("amr"))  # malformed is refused: it decides "anonymous"
        scopes = _strings(claims["scope"] if claims.get("scope") is not None else claims.get("scp"))
        user_name = claims.get("preferred_username")

        if id_token is not None:
            await self._verify_id_token(id_token, config, subject, now)

        return TokenClaims(
            subject=subject,
            issuer=config.issuer,
            audience=audience,
            expires_at=math.floor(exp),
            groups=groups,
            anonymous="anon" in amr,
            scopes=scopes,
            user_name=user_name if isinstance(user_name, str) and user_name else None,
            local=config.local,
            claims=MappingProxyType(claims),
        )

    @staticmethod
    async def _verify_id_token(id_token: str, config: IssuerConfig, subject: str, now: float) -> None:
        """The seed's ``Bearer <access> <id>``: the ID token must come from the same issuer
        and name the same subject. Its audience is the client's id, so it is not checked."""
        token = _parse(id_token)
        if token.typ is not None and token.typ.lower() in ("at+jwt", "application/at+jwt"):
            raise InvalidTokenError("wrong token type")
        if token.claims.get("iss") != config.issuer:
            raise InvalidTokenError("ID token from another issuer")
        await _check_signature(token, config)
        _check_times(token.claims, now, config.leeway_s)
        if _subject(token.claims) != subject:
            raise InvalidTokenError("ID token subject differs")


def _candidates(keyset: KeySet, token: _Token) -> list[Key]:
    """The keys that may have signed ``token``: by exact ``kid``, else every key of its alg."""
    if token.kid is None:
        return [key for key in keyset if pinned_algorithm(key) == token.alg]
    named = [key for key in keyset if key.kid == token.kid]
    usable = [key for key in named if pinned_algorithm(key) == token.alg]
    if named and not usable:
        raise InvalidTokenError("algorithm does not match the key")
    return usable


async def _check_signature(token: _Token, config: IssuerConfig) -> None:
    candidates = _candidates(await config.keys.keys(), token)
    if not candidates:
        # perhaps the issuer rotated its keys; the key source rate-limits this
        candidates = _candidates(await config.keys.keys(refresh=True), token)
    if not candidates:
        raise InvalidTokenError("unknown key")
    registry = _REGISTRIES[token.alg]
    for key in candidates:
        try:
            jws.deserialize_compact(token.compact, key, registry=registry)
        except (JoseError, ValueError):
            continue
        return
    raise InvalidTokenError("bad signature")
