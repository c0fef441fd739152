"""The OAuth client registry: who may ask the provider for tokens, and where answers may go.

Clients are registered by an administrator (``iotvault clients add``, ``POST /iotf/clients``);
there is no dynamic registration. A client is either

* **public** (a mobile app, a single-page app, a command line): it holds no secret, so every
  authorization code it gets is bound to a PKCE S256 challenge; or
* **confidential** (a server-side web application): it also authenticates at the token
  endpoint with ``client_secret_basic``. Its secret is 256 random bits, shown once and kept
  only as a SHA-256 hash (as API keys are, :mod:`iotvault.crypto.tokens`).

Redirect URIs are compared as exact strings, so they are checked strictly when registered
(RFC 9700, 2.1; RFC 8252 for native apps): ``https://`` with a host; ``http://`` only on the
loopback interface; or a private-use scheme with a dot in it (``com.example.app:/callback``).
Never a fragment, user information or a wildcard.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final, NamedTuple
from urllib.parse import urlsplit

from iotvault.audit.changes import changed
from iotvault.clock import now_us
from iotvault.crypto.tokens import hash_secret, new_secret, verify_secret
from iotvault.domain.accounts import check_text
from iotvault.domain.ids import IDENTIFIER_PATTERN
from iotvault.errors import ClientNotFoundError, ValidationError
from iotvault.identity.records import ClientRecord
from iotvault.identity.store import IdentityStore

AUTHORIZATION_CODE: Final = "authorization_code"
REFRESH_TOKEN: Final = "refresh_token"  # noqa: S105 - the name of a grant type, not a secret
DEVICE_CODE: Final = "urn:ietf:params:oauth:grant-type:device_code"
GRANT_TYPES: Final = (AUTHORIZATION_CODE, REFRESH_TOKEN, DEVICE_CODE)
CLI_CLIENT_ID: Final = "iotvault-cli"  # registered by migration 0004, used by `iotvault login`

# no ':' or '/': a client id can never equal the API's audience URL, so an ID token (aud =
# client id) is never accepted as an access token
_CLIENT_ID_RE: Final = re.compile(IDENTIFIER_PATTERN)
_PRIVATE_SCHEME_RE: Final = re.compile(r"[a-z][a-z0-9+.-]*\.[a-z0-9+.-]+")
_LOOPBACK: Final = frozenset({"127.0.0.1", "::1", "localhost"})
MAX_REDIRECT_URIS: Final = 10
MAX_URI_LENGTH: Final = 512

# checked when a client id is unknown or public, so that it costs what a wrong secret costs
_DUMMY_SECRET_HASH: Final = hash_secret(new_secret())


class NewClient(NamedTuple):
    client: ClientRecord
    secret: str | None  # shown once; None for a public client


def is_client_id(value: object) -> bool:
    return isinstance(value, str) and _CLIENT_ID_RE.fullmatch(value) is not None


def check_client_id(value: object) -> str:
    if not is_client_id(value):
        raise ValidationError("clientId", "must be 1-64 characters of A-Z a-z 0-9 . _ -")
    return str(value)


def check_redirect_uri(value: object, field: str = "redirectUris") -> str:
    """``value`` if it may be registered as a redirect URI, else ValidationError."""
    if not isinstance(value, str) or not value or len(value) > MAX_URI_LENGTH:
        raise ValidationError(field, f"each must be a URI of at most {MAX_URI_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x21 or ord(c) > 0x7E for c in value):
        raise ValidationError(field, f"{value!r} has spaces, control or non-ASCII characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValidationError(field, f"{value!r} is not a valid URI") from None
    del port
    if "#" in value or parts.username is not None or parts.password is not None or "*" in value:
        raise ValidationError(field, f"{value!r} must not have a fragment, user information or wildcard")
    if parts.scheme == "https" and parts.hostname:
        return value
    if parts.scheme == "http" and parts.hostname in _LOOPBACK:
        return value
    if _PRIVATE_SCHEME_RE.fullmatch(parts.scheme) and parts.path.startswith("/") and not parts.netloc:
        return value
    raise ValidationError(
        field,
        f"{value!r}: use https://, http:// on the loopback interface only, or a private-use "
        "scheme with a dot (com.example.app:/callback)",
    )


def _uris(values: Iterable[str], field: str) -> tuple[str, ...]:
    result = tuple(dict.fromkeys(check_redirect_uri(v, field) for v in values))
    if len(result) > MAX_REDIRECT_URIS:
        raise ValidationError(field, f"at most {MAX_REDIRECT_URIS}")
    return result


def _grant_types(values: Iterable[str]) -> tuple[str, ...]:
    result = tuple(dict.fromkeys(values))
    for g in result:
        if g not in GRANT_TYPES:
            raise ValidationError("grantTypes", f"{g!r} is not one of {', '.join(GRANT_TYPES)}")
    if not result or result == (REFRESH_TOKEN,):
        raise ValidationError("grantTypes", f"needs {AUTHORIZATION_CODE} or {DEVICE_CODE}")
    return result


def add_client(
    store: IdentityStore,
    client_id: str,
    *,
    display_name: str = "",
    confidential: bool = False,
    redirect_uris: Iterable[str] = (),
    post_logout_redirect_uris: Iterable[str] = (),
    grant_types: Iterable[str] = (AUTHORIZATION_CODE, REFRESH_TOKEN),
    allow_anonymous: bool = False,
    created_by: str,
) -> NewClient:
    """Register a client; a confidential one gets a secret, returned here and nowhere else."""
    cid = check_client_id(client_id)
    grants = _grant_types(grant_types)
    uris = _uris(redirect_uris, "redirectUris")
    if AUTHORIZATION_CODE in grants and not uris:
        raise ValidationError("redirectUris", f"{AUTHORIZATION_CODE} needs at least one redirect URI")
    record = ClientRecord(
        client_id=cid,
        display_name=check_text("displayName", display_name or cid, max_len=128),
        public=not confidential,
        redirect_uris=uris,
        post_logout_redirect_uris=_uris(post_logout_redirect_uris, "postLogoutRedirectUris"),
        grant_types=grants,
        allow_anonymous=bool(allow_anonymous),
        created_by=check_text("createdBy", created_by, max_len=64),
        created_us=now_us(),
    )
    secret = new_secret() if confidential else None
    store.add_client(record, hash_secret(secret) if secret is not None else None)
    changed("client.create", record.client_id, after=record)
    return NewClient(record, secret)


def get_client(store: IdentityStore, client_id: str) -> ClientRecord:
    found = store.get_client(client_id) if is_client_id(client_id) else None
    if found is None:
        raise ClientNotFoundError(client_id)
    return found[0]


def remove_client(store: IdentityStore, client_id: str) -> None:
    """Delete a client; the grants it holds are revoked with it."""
    found = store.get_client(client_id) if is_client_id(client_id) else None
    if found is None or not store.delete_client(client_id, now_us()):
        raise ClientNotFoundError(client_id)
    changed("client.delete", client_id, before=found[0], grantsRevoked=True)


def authenticate_client(store: IdentityStore, client_id: str, secret: str) -> ClientRecord | None:
    """The confidential client whose secret this is, else None (same cost either way)."""
    found = store.get_client(client_id) if is_client_id(client_id) else None
    stored = found[1] if found is not None else None
    if stored is None:
        verify_secret(secret, _DUMMY_SECRET_HASH)
        return None
    if not verify_secret(secret, stored) or found is None:
        return None
    return found[0]
