"""The tokens the provider issues, in the format :mod:`iotvault.auth.tokens` verifies.

* **Access token** (RFC 9068): a JWT with header ``{"alg": "ES256", "kid", "typ": "at+jwt"}``
  and claims ``iss`` (the public URL, exactly), ``aud`` (the API: ``<public URL>/iotf``),
  ``sub``, ``client_id``, ``scope``, ``iat``, ``exp``, ``jti``, ``auth_time``, ``amr``
  (``["pwd"]`` or ``["anon"]``), ``sid`` (the grant: see below) and, for a person,
  ``preferred_username`` = the ``userName``.
* **ID token** (OpenID Connect Core 1.0): ``typ: JWT``, ``aud`` = the client id, ``nonce`` when
  the authorization request had one, ``at_hash``, ``auth_time``, ``amr``, ``sid``, and the
  profile claims the scopes ask for (``name``, ``preferred_username``, ``locale``, ``email``).
* **Refresh tokens, codes, device codes**: 256 random bits, opaque; stored as SHA-256.

``sid`` names the grant (the token family) that issued the token: revoking the grant — by
logout, the revocation endpoint, a replayed code or refresh token, a disabled or changed user —
makes the API refuse its access tokens too (:mod:`iotvault.identity.verifier`), not only its
refresh tokens.

``sub`` is stable for the life of an account but not its name: a hash of the user name and
the account's creation time, so a user deleted and created again under the same name is
another subject to every client. Anonymous subjects are random (``anon-…``).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping
from typing import Any, Final

from joserfc import jwt

from iotvault.identity.keys import ALG, SigningKeys
from iotvault.identity.records import GrantRecord
from iotvault.identity.web import b64url
from iotvault.storage.accounts import UserRecord

SCOPES: Final = ("openid", "profile", "email", "offline_access")
DEFAULT_SCOPE: Final = "openid"


def subject_for(user_name: str, created_us: int) -> str:
    digest = hashlib.sha256(f"iotvault/subject/v1\0{user_name}\0{created_us}".encode()).digest()
    return "u-" + b64url(digest[:18])


def anonymous_subject() -> str:
    return "anon-" + secrets.token_urlsafe(18)


def parse_scope(requested: str | None) -> str:
    """The known scopes among those requested, in a fixed order; unknown ones are dropped
    (RFC 6749, 3.3: the answer's ``scope`` tells the client what it got)."""
    wanted = set((requested or DEFAULT_SCOPE).split())
    return " ".join(s for s in SCOPES if s in wanted)


def narrower(requested: str, granted: str) -> bool:
    return set(requested.split()) <= set(granted.split())


def profile_claims(user: UserRecord | None, scope: str) -> dict[str, Any]:
    """The OpenID Connect standard claims that ``scope`` asks for."""
    if user is None:
        return {}
    scopes = set(scope.split())
    claims: dict[str, Any] = {}
    if "profile" in scopes:
        claims["name"] = user.display_name
        claims["preferred_username"] = user.user_name
        language = user.attributes.get("Language")
        if language:
            claims["locale"] = language
    if "email" in scopes:
        email = user.attributes.get("emailAddress")
        if email:
            claims["email"] = email
            claims["email_verified"] = False  # iotvault never verified it
    return claims


class Minter:
    def __init__(self, *, issuer: str, audience: str, keys: SigningKeys, ttl_s: int) -> None:
        self.issuer = issuer
        self.audience = audience
        self.keys = keys
        self.ttl_s = ttl_s

    def _sign(self, typ: str, claims: Mapping[str, Any]) -> str:
        signer = self.keys.signer()
        header = {"alg": ALG, "kid": signer.kid, "typ": typ}
        return jwt.encode(header, dict(claims), signer.key, algorithms=[ALG])

    def _common(self, grant: GrantRecord, now: int) -> dict[str, Any]:
        return {
            "iss": self.issuer,
            "sub": grant.who.subject,
            "iat": now,
            "exp": now + self.ttl_s,
            "auth_time": grant.who.auth_time_us // 1_000_000,
            "amr": grant.who.amr.split(),
            "sid": grant.grant_id,
        }

    def access_token(self, grant: GrantRecord, scope: str, now: int | None = None) -> str:
        at = int(time.time()) if now is None else now
        claims = {
            **self._common(grant, at),
            "aud": self.audience,
            "jti": secrets.token_urlsafe(16),
            "client_id": grant.client_id,
            "scope": scope,
        }
        if grant.who.user_name is not None:
            claims["preferred_username"] = grant.who.user_name
        return self._sign("at+jwt", claims)

    def id_token(
        self,
        grant: GrantRecord,
        *,
        scope: str,
        access_token: str,
        nonce: str | None,
        user: UserRecord | None,
        now: int | None = None,
    ) -> str:
        at = int(time.time()) if now is None else now
        digest = hashlib.sha256(access_token.encode("ascii")).digest()
        claims = {
            **self._common(grant, at),
            **profile_claims(user, scope),
            "aud": grant.client_id,
            "azp": grant.client_id,
            "at_hash": b64url(digest[: len(digest) // 2]),
        }
        if nonce is not None:
            claims["nonce"] = nonce
        return self._sign("JWT", claims)
