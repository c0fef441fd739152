"""Authentication: the ``Authorization`` header becomes a :class:`~iotvault.auth.policy.Principal`.

Accepted forms (the contract, and the seed's clients):

* ``Bearer <access_token>`` or ``Bearer <access_token> <id_token>`` (App ID's form): JWTs
  verified by :mod:`iotvault.auth.tokens` against the built-in provider or a configured
  external issuer;
* ``Basic base64(key:password)``: an API key (Cloudant's form).

Failures all answer 401 with ``WWW-Authenticate`` and a short reason, and count against the
caller's address and, for an API key, against the key's id. Past the limit (per address) they
answer 429 instead.

An address over its failure limit is *not* refused outright: everyone behind one NAT, proxy
or carrier gateway shares it, and one of them failing must not lock the others out. Their
credentials are still checked; a valid one is accepted, an invalid one answers 429. What
keeps that from becoming free work for an attacker at a throttled address: bearer tokens are
cheap to check (a signature, and the verifier's cache); an API key's password (argon2) is
checked from a throttled address only while that key id is itself under its failure limit,
and every request still counts against the per-address request limit. SECURITY.md has the
trade-off.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from iotvault.accounts import api_key_grant, check_api_key
from iotvault.api.problems import Problem, unauthorized
from iotvault.api.services import ApiServices
from iotvault.auth.claims import InvalidTokenError, TokenClaims
from iotvault.auth.policy import ANONYMOUS_GROUP, Grant, Principal
from iotvault.clock import now_us

MAX_HEADER = 16 * 1024


class _Failed(Exception):  # noqa: N818 - internal signal, never escapes this module
    def __init__(self, reason: str, identity: str | None = None, *, revoked: str = "") -> None:
        self.reason = reason
        self.identity = identity  # what the credential claimed to be, when it names someone
        self.revoked = revoked  # the revoked credential that was used (``apikey:<id>``, ``token#<hash>``)


def services(request: Request) -> ApiServices:
    svc: ApiServices = request.app.state.services
    return svc


def client_address(request: Request) -> str:
    client = request.scope.get("client")
    return str(client[0]) if client else "unknown"


def _authorization(request: Request) -> str | None:
    """The request's first ``Authorization`` header, as ``request.headers.get`` gives it."""
    for name, value in request.scope["headers"]:
        if name == b"authorization":
            return str(value.decode("latin-1"))
    return None


def _group_grants(
    svc: ApiServices, group_names: list[str] | tuple[str, ...]
) -> tuple[list[Grant], list[str]]:
    grants, found = [], []
    for name in group_names:
        g = svc.ctx.accounts.get_group(name)
        if g is not None:
            grants.append(Grant(g.roles.admin, g.roles.reader, g.roles.writer, frozenset(g.devices)))
            found.append(g.group_name)
    return grants, found


def _principal_for_claims(svc: ApiServices, claims: TokenClaims) -> Principal:
    if claims.anonymous:
        grants, found = _group_grants(svc, [ANONYMOUS_GROUP])
        return Principal.from_grants("anonymous", claims.subject, grants, found)
    if claims.local:
        name = claims.user_name or claims.subject
        user = svc.ctx.accounts.get_user(name)
        if user is None or user.disabled:
            raise _Failed("unknown or disabled user")
        groups = svc.ctx.accounts.groups_of_user(user.user_name)
        grants = [Grant(g.roles.admin, g.roles.reader, g.roles.writer, frozenset(g.devices)) for g in groups]
        return Principal.from_grants("user", user.user_name, grants, [g.group_name for g in groups])
    grants, found = _group_grants(svc, claims.groups)
    return Principal.from_grants("external", f"{claims.issuer}#{claims.subject}", grants, found)


def _principal_for_api_key(svc: ApiServices, key: str, password: str) -> tuple[Principal, int | None]:
    """The key's principal and when the key expires (microseconds), if it does."""
    record, revoked = check_api_key(svc.ctx, key, password, now_us())
    if record is None:
        raise _Failed("invalid, expired or revoked API key", revoked=f"apikey:{key}" if revoked else "")
    grant = api_key_grant(svc.ctx, record.roles, record.devices, record.groups)
    return Principal.from_grants("api_key", record.key, [grant], record.groups), record.expires_us


class Authenticator:
    """Accepted credentials are kept in ``svc.principals`` (:mod:`iotvault.api.readcache`)."""

    async def _bearer(self, svc: ApiServices, value: str) -> Principal:
        parts = value.split(" ")
        if not 1 <= len(parts) <= 2 or not all(parts):
            raise _Failed("expected 'Bearer <access_token>' or 'Bearer <access_token> <id_token>'")
        if svc.verifier is None:
            raise _Failed("bearer tokens are not configured")
        digest = hashlib.sha256(b"bearer " + value.encode()).digest()
        cache = svc.principals
        hit = cache.get(digest)
        if hit is not None:
            return hit
        generation = cache.generation
        try:
            claims = await svc.verifier.verify(parts[0], parts[1] if len(parts) == 2 else None)
        except InvalidTokenError as exc:
            # a revoked token is named by a hash of it (the token itself is a secret)
            revoked = "token#" + digest.hex()[:16] if exc.reason == "revoked" else ""
            raise _Failed(f"invalid token: {exc.reason}", revoked=revoked) from None
        principal = await run_in_threadpool(_principal_for_claims, svc, claims)
        cache.put(digest, principal, generation=generation, expires_in_s=claims.expires_at - time.time())
        return principal

    @staticmethod
    async def _basic(svc: ApiServices, value: str, *, address_blocked: bool) -> Principal:
        # an accepted key is kept by a hash of the whole credential (its password included)
        digest = hashlib.sha256(b"basic " + value.strip().encode()).digest()
        hit = svc.principals.get(digest)
        if hit is not None:
            return hit
        generation = svc.principals.generation
        principal, expires_us = await Authenticator._check_basic(svc, value, address_blocked=address_blocked)
        left = None if expires_us is None else (expires_us - now_us()) / 1e6
        svc.principals.put(digest, principal, generation=generation, expires_in_s=left)
        return principal

    @staticmethod
    async def _check_basic(
        svc: ApiServices, value: str, *, address_blocked: bool
    ) -> tuple[Principal, int | None]:
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _Failed("malformed Basic credentials") from None
        key, sep, password = decoded.partition(":")
        if not sep or not key or not password or len(key) > 64 or len(password) > 256:
            raise _Failed("malformed Basic credentials")
        identity = f"apikey:{key}"
        if address_blocked and svc.limiter is not None:
            retry = await svc.limiter.identity_blocked(identity)
            if retry is not None:  # both throttled: no password hash is computed for this
                raise Problem(429, "too many failed authentications", headers={"Retry-After": str(retry)})
        try:
            return await run_in_threadpool(_principal_for_api_key, svc, key, password)
        except _Failed as exc:
            raise _Failed(exc.reason, identity, revoked=exc.revoked) from None

    async def _credential(self, svc: ApiServices, header: str, *, address_blocked: bool) -> Principal:
        if len(header) > MAX_HEADER:
            raise _Failed("Authorization header too large")
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            return await self._bearer(svc, value.strip())
        if scheme.lower() == "basic":
            return await self._basic(svc, value, address_blocked=address_blocked)
        raise _Failed("unsupported authorization scheme")

    async def __call__(self, request: Request) -> Principal:
        svc = services(request)
        address = client_address(request)
        limiter = svc.limiter
        blocked = await limiter.auth_blocked(address) if limiter is not None else None
        header = _authorization(request)
        counted = svc.metrics.authentications.inc
        if header is None:
            counted(label_value="missing")
            if blocked is not None:
                raise Problem(429, "too many failed authentications", headers={"Retry-After": str(blocked)})
            raise unauthorized()
        try:
            principal = await self._credential(svc, header, address_blocked=blocked is not None)
        except Problem:  # throttled before any password hash was computed
            counted(label_value="throttled")
            raise
        except _Failed as exc:
            counted(label_value="revoked" if exc.revoked else "failure")
            if exc.revoked:  # the audit record says so, and the alert monitor raises an alert
                request.state.audit = {"revoked": True, "credential": exc.revoked}
            if limiter is not None:
                retry = await limiter.auth_failed(address, exc.identity)
                if retry is not None or blocked is not None:
                    wait = str(retry or blocked)
                    raise Problem(
                        429, "too many failed authentications", headers={"Retry-After": wait}
                    ) from None
            raise unauthorized(exc.reason) from None
        counted(label_value="success")
        if limiter is not None:
            retry = await limiter.hit_principal(f"{principal.kind}:{principal.id}")
            if retry is not None:
                raise Problem(429, "rate limit exceeded", headers={"Retry-After": str(retry)})
        request.state.principal = principal
        return principal
