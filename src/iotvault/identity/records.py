"""The provider's records and their rows: what :mod:`iotvault.identity.tables` read and write."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from sqlalchemy.engine import Row

_R = TypeVar("_R")


def from_row(cls: type[_R], row: Row[Any]) -> _R:
    """A record whose fields are columns of the same name and type, from its row."""
    mapping = row._mapping
    return cls(**{f.name: mapping[f.name] for f in fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ClientRecord:
    client_id: str
    display_name: str
    public: bool  # no secret: PKCE is mandatory
    redirect_uris: tuple[str, ...]
    post_logout_redirect_uris: tuple[str, ...]
    grant_types: tuple[str, ...]
    allow_anonymous: bool
    created_by: str
    created_us: int


@dataclass(frozen=True, slots=True)
class SigningKeyRecord:
    kid: str
    alg: str
    public_jwk: str
    wrapped: bytes
    created_us: int
    retired_us: int | None
    publish_until_us: int | None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    session_id: str
    user_name: str
    user_stamp: int
    amr: str
    auth_time_us: int
    created_us: int
    expires_us: int
    ended_us: int | None


@dataclass(frozen=True, slots=True)
class AuthRequestRecord:
    request_id: str
    kind: str  # "authorize" or "device"
    params: dict[str, Any]
    created_us: int
    expires_us: int
    completed_us: int | None


@dataclass(frozen=True, slots=True)
class Authentication:
    """Who logged in, as a code, a device code or a grant carries it."""

    subject: str
    user_name: str | None  # None: anonymous
    user_stamp: int | None
    anonymous: bool
    amr: str  # space-separated: "pwd" or "anon"
    auth_time_us: int
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class CodeRecord:
    client_id: str
    redirect_uri: str
    code_challenge: str | None
    nonce: str | None
    scope: str
    who: Authentication
    expires_us: int
    used_us: int | None
    grant_id: str | None


@dataclass(frozen=True, slots=True)
class GrantRecord:
    grant_id: str
    client_id: str
    scope: str
    who: Authentication
    created_us: int
    expires_us: int
    revoked_us: int | None
    revoke_reason: str | None


@dataclass(frozen=True, slots=True)
class DeviceCodeRecord:
    device_code_hash: str
    client_id: str
    scope: str
    created_us: int
    expires_us: int
    interval_s: int
    last_poll_us: int | None
    status: str  # pending, approved, denied, consumed
    user_name: str | None
    user_stamp: int | None
    auth_time_us: int | None


@dataclass(frozen=True, slots=True)
class IdentityEvent:
    at_us: int
    kind: str
    user_name: str | None
    client_id: str | None
    address: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class UserState:
    """What decides whether a login still stands: the row's stamp and the disabled flag."""

    updated_us: int
    created_us: int
    disabled: bool


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def client_record(row: Row[Any]) -> ClientRecord:
    return ClientRecord(
        client_id=row.client_id,
        display_name=row.display_name,
        public=row.secret_hash is None,
        redirect_uris=tuple(json.loads(row.redirect_uris or "[]")),
        post_logout_redirect_uris=tuple(json.loads(row.post_logout_redirect_uris or "[]")),
        grant_types=tuple(json.loads(row.grant_types or "[]")),
        allow_anonymous=bool(row.allow_anonymous),
        created_by=row.created_by,
        created_us=row.created_us,
    )


def authentication(row: Row[Any]) -> Authentication:
    return from_row(Authentication, row)


def authentication_values(who: Authentication) -> dict[str, Any]:
    return {
        "subject": who.subject,
        "user_name": who.user_name,
        "user_stamp": who.user_stamp,
        "anonymous": who.anonymous,
        "amr": who.amr,
        "auth_time_us": who.auth_time_us,
        "session_id": who.session_id,
    }


def grant_record(row: Row[Any]) -> GrantRecord:
    return GrantRecord(
        grant_id=row.grant_id,
        client_id=row.client_id,
        scope=row.scope,
        who=authentication(row),
        created_us=row.created_us,
        expires_us=row.expires_us,
        revoked_us=row.revoked_us,
        revoke_reason=row.revoke_reason,
    )


def device_code_record(row: Row[Any]) -> DeviceCodeRecord:
    return from_row(DeviceCodeRecord, row)


def session_record(row: Row[Any]) -> SessionRecord:
    return from_row(SessionRecord, row)
