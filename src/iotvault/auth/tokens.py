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

import base64
import binascii
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from joserfc import jws
from joserfc.errors import InvalidKeyCurveError, JoseError
from joserfc.jwa import JWSAlgModel
from joserfc.jwk import Key, KeySet, OKPKey
from joserfc.jws import JWSRegistry

from iotvault.auth.claims import InvalidTokenError, TokenClaims
from iotvault.auth.keys import KeySource, pinned_algorithm
from iotvault.errors import ConfigError

__all__ = [
    "MAX_TOKEN_LENGTH",
    "IssuerConfig",
    "TokenVerifier",
]

log = logging.getLogger(__name__)

MAX_TOKEN_LENGTH: Final = 8 * 1024
_MAX_HEADER_SEGMENT: Final = 1024  # base64url characters; real headers are under 300
_MAX_KID_LENGTH: Final = 256
_MAX_SUBJECT_LENGTH: Final = 255  # OpenID Connect Core 1.0, section 2
_ACCEPTED_TYPES: Final = frozenset({"jwt", "application/jwt", "at+jwt", "application/at+jwt"})
_KEY_HEADERS: Final = ("jwk", "jku", "x5c", "x5u")  # a token never chooses its own key
_UNSUPPORTED_HEADERS: Final = ("crit", "b64", "enc", "zip")
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*")
_PRINTABLE_ASCII: Final = re.compile(r"[\x21-\x7e]+")


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
