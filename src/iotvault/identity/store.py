"""Storage of the OpenID Connect provider, for SQLite and PostgreSQL (SQLAlchemy Core).

The one place where the provider touches SQL; the protocol modules call it with plain values.
Everything secret arrives here already hashed (refresh tokens, codes, session cookies) or
wrapped by the master key (signing keys).

The single-use rules rest on one statement each: ``UPDATE … SET used_us = :now WHERE … AND
used_us IS NULL``. Of two concurrent requests presenting the same code or refresh token, the
database lets exactly one update the row; the other sees a row already used and is treated as
a replay. That holds on PostgreSQL (the second UPDATE waits for the first and re-checks its
condition) and on SQLite (one writer at a time).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from iotvault.errors import ClientExistsError
from iotvault.storage.db import EngineStore
from iotvault.storage.schema import (
    identity_events,
    oidc_auth_requests,
    oidc_clients,
    oidc_codes,
    oidc_device_codes,
    oidc_grants,
    oidc_refresh_tokens,
    oidc_sessions,
    oidc_signing_keys,
    users,
)

# identity_events rows are kept this long (and then deleted by the housekeeping)
EVENT_RETENTION_US = 90 * 86_400 * 1_000_000
# used or expired codes, requests and device codes are kept a day for inspection
SPENT_RETENTION_US = 86_400 * 1_000_000


# ---- records --------------------------------------------------------------------------------
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


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _client(row: Row[Any]) -> ClientRecord:
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


def _who(row: Row[Any]) -> Authentication:
    return Authentication(
        subject=row.subject,
        user_name=row.user_name,
        user_stamp=row.user_stamp,
        anonymous=bool(row.anonymous),
        amr=row.amr,
        auth_time_us=row.auth_time_us,
        session_id=row.session_id,
    )


def _who_values(who: Authentication) -> dict[str, Any]:
    return {
        "subject": who.subject,
        "user_name": who.user_name,
        "user_stamp": who.user_stamp,
        "anonymous": who.anonymous,
        "amr": who.amr,
        "auth_time_us": who.auth_time_us,
        "session_id": who.session_id,
    }


def _grant(row: Row[Any]) -> GrantRecord:
    return GrantRecord(
        grant_id=row.grant_id,
        client_id=row.client_id,
        scope=row.scope,
        who=_who(row),
        created_us=row.created_us,
        expires_us=row.expires_us,
        revoked_us=row.revoked_us,
        revoke_reason=row.revoke_reason,
    )


def _device(row: Row[Any]) -> DeviceCodeRecord:
    return DeviceCodeRecord(
        device_code_hash=row.device_code_hash,
        client_id=row.client_id,
        scope=row.scope,
        created_us=row.created_us,
        expires_us=row.expires_us,
        interval_s=row.interval_s,
        last_poll_us=row.last_poll_us,
        status=row.status,
        user_name=row.user_name,
        user_stamp=row.user_stamp,
        auth_time_us=row.auth_time_us,
    )


class IdentityStore(EngineStore):
    """The provider's tables on one SQLAlchemy engine (the one the other stores use)."""

    # ---- clients -----------------------------------------------------------------------
    def add_client(self, record: ClientRecord, secret_hash: str | None) -> None:
        try:
            with self.begin() as conn:
                conn.execute(
                    insert(oidc_clients).values(
                        client_id=record.client_id,
                        display_name=record.display_name,
                        secret_hash=secret_hash,
                        redirect_uris=_dumps(list(record.redirect_uris)),
                        post_logout_redirect_uris=_dumps(list(record.post_logout_redirect_uris)),
                        grant_types=_dumps(list(record.grant_types)),
                        allow_anonymous=record.allow_anonymous,
                        created_by=record.created_by,
                        created_us=record.created_us,
                    )
                )
        except IntegrityError:
            raise ClientExistsError(record.client_id) from None

    def get_client(self, client_id: str) -> tuple[ClientRecord, str | None] | None:
        """The client and its secret hash (None for a public client: to check, never to show)."""
        row = self.first(select(oidc_clients).where(oidc_clients.c.client_id == client_id))
        return (_client(row), row.secret_hash) if row is not None else None

    def list_clients(self) -> list[ClientRecord]:
        with self.connect() as conn:
            rows = conn.execute(select(oidc_clients).order_by(oidc_clients.c.client_id)).all()
        return [_client(r) for r in rows]

    def delete_client(self, client_id: str, at_us: int) -> bool:
        """Delete a client and end everything it holds: grants revoked, codes deleted."""
        with self.begin() as conn:
            conn.execute(
                update(oidc_grants)
                .where(oidc_grants.c.client_id == client_id, oidc_grants.c.revoked_us.is_(None))
                .values(revoked_us=at_us, revoke_reason="client_removed")
            )
            conn.execute(delete(oidc_codes).where(oidc_codes.c.client_id == client_id))
            conn.execute(delete(oidc_device_codes).where(oidc_device_codes.c.client_id == client_id))
            return bool(
                conn.execute(delete(oidc_clients).where(oidc_clients.c.client_id == client_id)).rowcount
            )

    # ---- signing keys ------------------------------------------------------------------
    def signing_keys(self) -> list[SigningKeyRecord]:
        """Every stored key, newest first."""
        with self.connect() as conn:
            rows = conn.execute(
                select(oidc_signing_keys).order_by(
                    oidc_signing_keys.c.created_us.desc(), oidc_signing_keys.c.kid.desc()
                )
            ).all()
        return [
            SigningKeyRecord(
                kid=r.kid,
                alg=r.alg,
                public_jwk=r.public_jwk,
                wrapped=bytes(r.wrapped),
                created_us=r.created_us,
                retired_us=r.retired_us,
                publish_until_us=r.publish_until_us,
            )
            for r in rows
        ]

    def add_signing_key(self, record: SigningKeyRecord, *, retire_others_until_us: int | None) -> None:
        """Store a new key; with ``retire_others_until_us``, the keys signing until now stop
        signing and stay published until then (in the same transaction)."""
        with self.begin() as conn:
            if retire_others_until_us is not None:
                conn.execute(
                    update(oidc_signing_keys)
                    .where(oidc_signing_keys.c.retired_us.is_(None))
                    .values(retired_us=record.created_us, publish_until_us=retire_others_until_us)
                )
            conn.execute(
                insert(oidc_signing_keys).values(
                    kid=record.kid,
                    alg=record.alg,
                    public_jwk=record.public_jwk,
                    wrapped=record.wrapped,
                    created_us=record.created_us,
                    retired_us=None,
                    publish_until_us=None,
                )
            )

    # ---- users (read only: the provider never changes an account) ---------------------
    def user_state(self, user_name: str) -> UserState | None:
        row = self.first(
            select(users.c.updated_us, users.c.created_us, users.c.disabled).where(
                users.c.user_name == user_name
            )
        )
        if row is None:
            return None
        return UserState(updated_us=row.updated_us, created_us=row.created_us, disabled=bool(row.disabled))

    # ---- browser sessions --------------------------------------------------------------
    def add_session(self, record: SessionRecord, token_hash: str) -> None:
        with self.begin() as conn:
            conn.execute(
                insert(oidc_sessions).values(
                    session_id=record.session_id,
                    token_hash=token_hash,
                    user_name=record.user_name,
                    user_stamp=record.user_stamp,
                    amr=record.amr,
                    auth_time_us=record.auth_time_us,
                    created_us=record.created_us,
                    expires_us=record.expires_us,
                )
            )

    def session_by_token(self, token_hash: str) -> SessionRecord | None:
        row = self.first(select(oidc_sessions).where(oidc_sessions.c.token_hash == token_hash))
        return _session(row) if row is not None else None

    def get_session(self, session_id: str) -> SessionRecord | None:
        row = self.first(select(oidc_sessions).where(oidc_sessions.c.session_id == session_id))
        return _session(row) if row is not None else None

    def renew_session(self, session_id: str, token_hash: str, record: SessionRecord) -> bool:
        """Give a live session a new cookie and login time (a re-login of the same user)."""
        with self.begin() as conn:
            return bool(
                conn.execute(
                    update(oidc_sessions)
                    .where(oidc_sessions.c.session_id == session_id, oidc_sessions.c.ended_us.is_(None))
                    .values(
                        token_hash=token_hash,
                        user_stamp=record.user_stamp,
                        amr=record.amr,
                        auth_time_us=record.auth_time_us,
                        expires_us=record.expires_us,
                    )
                ).rowcount
            )

    def end_session(self, session_id: str, at_us: int, reason: str) -> None:
        """End a browser session and revoke every grant made in it, in one transaction."""
        with self.begin() as conn:
            conn.execute(
                update(oidc_sessions)
                .where(oidc_sessions.c.session_id == session_id, oidc_sessions.c.ended_us.is_(None))
                .values(ended_us=at_us, end_reason=reason)
            )
            self._revoke_grants(conn, oidc_grants.c.session_id == session_id, at_us, reason)

    # ---- pending authorization requests ------------------------------------------------
    def add_auth_request(self, record: AuthRequestRecord) -> None:
        with self.begin() as conn:
            conn.execute(
                insert(oidc_auth_requests).values(
                    request_id=record.request_id,
                    kind=record.kind,
                    params=_dumps(record.params),
                    created_us=record.created_us,
                    expires_us=record.expires_us,
                )
            )

    def get_auth_request(self, request_id: str) -> AuthRequestRecord | None:
        row = self.first(select(oidc_auth_requests).where(oidc_auth_requests.c.request_id == request_id))
        if row is None:
            return None
        return AuthRequestRecord(
            request_id=row.request_id,
            kind=row.kind,
            params=json.loads(row.params),
            created_us=row.created_us,
            expires_us=row.expires_us,
            completed_us=row.completed_us,
        )

    def complete_auth_request(self, request_id: str, at_us: int) -> bool:
        """Mark a request done; False if it already was (a form posted twice)."""
        with self.begin() as conn:
            return bool(
                conn.execute(
                    update(oidc_auth_requests)
                    .where(
                        oidc_auth_requests.c.request_id == request_id,
                        oidc_auth_requests.c.completed_us.is_(None),
                    )
                    .values(completed_us=at_us)
                ).rowcount
            )

    # ---- authorization codes -----------------------------------------------------------
    def add_code(self, code_hash: str, record: CodeRecord) -> None:
        with self.begin() as conn:
            conn.execute(
                insert(oidc_codes).values(
                    code_hash=code_hash,
                    client_id=record.client_id,
                    redirect_uri=record.redirect_uri,
                    code_challenge=record.code_challenge,
                    nonce=record.nonce,
                    scope=record.scope,
                    expires_us=record.expires_us,
                    **_who_values(record.who),
                )
            )

    def use_code(self, code_hash: str, client_id: str, at_us: int) -> tuple[CodeRecord, bool] | None:
        """The code and whether this call was its first use (which it records), or None when
        there is no such code for ``client_id`` (another client's code is left untouched)."""
        with self.begin() as conn:
            row = conn.execute(select(oidc_codes).where(oidc_codes.c.code_hash == code_hash)).first()
            if row is None or row.client_id != client_id:
                return None
            first = conn.execute(
                update(oidc_codes)
                .where(oidc_codes.c.code_hash == code_hash, oidc_codes.c.used_us.is_(None))
                .values(used_us=at_us)
            ).rowcount
            if not first:  # read again: the grant id its first use recorded
                row = conn.execute(select(oidc_codes).where(oidc_codes.c.code_hash == code_hash)).one()
        record = CodeRecord(
            client_id=row.client_id,
            redirect_uri=row.redirect_uri,
            code_challenge=row.code_challenge,
            nonce=row.nonce,
            scope=row.scope,
            who=_who(row),
            expires_us=row.expires_us,
            used_us=row.used_us,
            grant_id=row.grant_id,
        )
        return record, bool(first)

    # ---- grants and refresh tokens -----------------------------------------------------
    def add_grant(
        self,
        record: GrantRecord,
        *,
        refresh_hash: str | None,
        refresh_expires_us: int | None,
        code_hash: str | None = None,
    ) -> None:
        """Store a grant with its first refresh token; ``code_hash`` records that the code made it."""
        with self.begin() as conn:
            conn.execute(
                insert(oidc_grants).values(
                    grant_id=record.grant_id,
                    client_id=record.client_id,
                    scope=record.scope,
                    created_us=record.created_us,
                    expires_us=record.expires_us,
                    **_who_values(record.who),
                )
            )
            if refresh_hash is not None and refresh_expires_us is not None:
                conn.execute(
                    insert(oidc_refresh_tokens).values(
                        token_hash=refresh_hash,
                        grant_id=record.grant_id,
                        created_us=record.created_us,
                        expires_us=refresh_expires_us,
                    )
                )
            if code_hash is not None:
                conn.execute(
                    update(oidc_codes)
                    .where(oidc_codes.c.code_hash == code_hash)
                    .values(grant_id=record.grant_id)
                )

    def get_grant(self, grant_id: str) -> GrantRecord | None:
        row = self.first(select(oidc_grants).where(oidc_grants.c.grant_id == grant_id))
        return _grant(row) if row is not None else None

    def revoke_grant(self, grant_id: str, at_us: int, reason: str) -> bool:
        """Revoke a grant (its refresh tokens die with it); False if it was already revoked."""
        with self.begin() as conn:
            return self._revoke_grants(conn, oidc_grants.c.grant_id == grant_id, at_us, reason) > 0

    @staticmethod
    def _revoke_grants(conn: Connection, condition: Any, at_us: int, reason: str) -> int:
        return int(
            conn.execute(
                update(oidc_grants)
                .where(condition, oidc_grants.c.revoked_us.is_(None))
                .values(revoked_us=at_us, revoke_reason=reason)
            ).rowcount
        )

    def refresh_token(self, token_hash: str) -> tuple[str, int, int | None] | None:
        """``(grant_id, expires_us, used_us)`` of a refresh token, or None."""
        row = self.first(
            select(
                oidc_refresh_tokens.c.grant_id,
                oidc_refresh_tokens.c.expires_us,
                oidc_refresh_tokens.c.used_us,
            ).where(oidc_refresh_tokens.c.token_hash == token_hash)
        )
        return (row.grant_id, row.expires_us, row.used_us) if row is not None else None

    def rotate_refresh_token(
        self, old_hash: str, new_hash: str, grant_id: str, at_us: int, expires_us: int
    ) -> bool:
        """Spend ``old_hash`` and store its successor; False if it was already spent (a replay)."""
        with self.begin() as conn:
            spent = conn.execute(
                update(oidc_refresh_tokens)
                .where(oidc_refresh_tokens.c.token_hash == old_hash, oidc_refresh_tokens.c.used_us.is_(None))
                .values(used_us=at_us)
            ).rowcount
            if not spent:
                return False
            conn.execute(
                insert(oidc_refresh_tokens).values(
                    token_hash=new_hash, grant_id=grant_id, created_us=at_us, expires_us=expires_us
                )
            )
            return True

    # ---- device codes (RFC 8628) -------------------------------------------------------
    def add_device_code(self, record: DeviceCodeRecord, user_code_hash: str) -> None:
        with self.begin() as conn:
            conn.execute(
                insert(oidc_device_codes).values(
                    device_code_hash=record.device_code_hash,
                    user_code_hash=user_code_hash,
                    client_id=record.client_id,
                    scope=record.scope,
                    created_us=record.created_us,
                    expires_us=record.expires_us,
                    interval_s=record.interval_s,
                    status=record.status,
                )
            )

    def device_code(self, device_code_hash: str) -> DeviceCodeRecord | None:
        row = self.first(
            select(oidc_device_codes).where(oidc_device_codes.c.device_code_hash == device_code_hash)
        )
        return _device(row) if row is not None else None

    def device_code_by_user_code(self, user_code_hash: str) -> DeviceCodeRecord | None:
        row = self.first(
            select(oidc_device_codes).where(oidc_device_codes.c.user_code_hash == user_code_hash)
        )
        return _device(row) if row is not None else None

    def decide_device_code(
        self,
        device_code_hash: str,
        *,
        approved: bool,
        user_name: str,
        user_stamp: int,
        auth_time_us: int,
    ) -> bool:
        """Approve or deny a pending device code; False if it was no longer pending."""
        values: dict[str, Any] = {"status": "approved" if approved else "denied"}
        if approved:
            values.update(user_name=user_name, user_stamp=user_stamp, auth_time_us=auth_time_us)
        with self.begin() as conn:
            return bool(
                conn.execute(
                    update(oidc_device_codes)
                    .where(
                        oidc_device_codes.c.device_code_hash == device_code_hash,
                        oidc_device_codes.c.status == "pending",
                    )
                    .values(values)
                ).rowcount
            )

    def poll_device_code(self, device_code_hash: str, at_us: int, *, slow_down: bool) -> None:
        """Record a poll; ``slow_down`` also adds 5 seconds to the interval (RFC 8628, 3.5)."""
        values: dict[str, Any] = {"last_poll_us": at_us}
        if slow_down:
            values["interval_s"] = oidc_device_codes.c.interval_s + 5
        with self.begin() as conn:
            conn.execute(
                update(oidc_device_codes)
                .where(oidc_device_codes.c.device_code_hash == device_code_hash)
                .values(values)
            )

    def consume_device_code(self, device_code_hash: str) -> bool:
        """Spend an approved device code; False if another poll already did."""
        with self.begin() as conn:
            return bool(
                conn.execute(
                    update(oidc_device_codes)
                    .where(
                        oidc_device_codes.c.device_code_hash == device_code_hash,
                        oidc_device_codes.c.status == "approved",
                    )
                    .values(status="consumed")
                ).rowcount
            )

    # ---- identity events ---------------------------------------------------------------
    def add_event(self, event: IdentityEvent) -> None:
        with self.begin() as conn:
            conn.execute(
                insert(identity_events).values(
                    at_us=event.at_us,
                    kind=event.kind,
                    user_name=event.user_name[:64] if event.user_name else None,
                    client_id=event.client_id[:64] if event.client_id else None,
                    address=event.address[:64] if event.address else None,
                    detail=event.detail[:256],
                )
            )

    def count_events(
        self, kind: str, since_us: int, *, user_name: str | None = None, address: str | None = None
    ) -> tuple[int, int | None]:
        """How many ``kind`` events since ``since_us`` for that user name or address, and the
        time of the latest."""
        q = select(func.count(), func.max(identity_events.c.at_us)).where(
            identity_events.c.kind == kind, identity_events.c.at_us >= since_us
        )
        if user_name is not None:
            q = q.where(identity_events.c.user_name == user_name[:64])
        if address is not None:
            q = q.where(identity_events.c.address == address[:64])
        with self.connect() as conn:
            count, latest = conn.execute(q).one()
        return int(count), latest

    def list_events(self, count: int, kinds: Sequence[str] = ()) -> list[IdentityEvent]:
        q = select(identity_events).order_by(identity_events.c.at_us.desc(), identity_events.c.id.desc())
        if kinds:
            q = q.where(identity_events.c.kind.in_(list(kinds)))
        with self.connect() as conn:
            rows = conn.execute(q.limit(count)).all()
        return [IdentityEvent(r.at_us, r.kind, r.user_name, r.client_id, r.address, r.detail) for r in rows]

    # ---- housekeeping ------------------------------------------------------------------
    def purge(self, now_us: int) -> dict[str, int]:
        """Delete what can no longer be used, and old events; returns the counts per table."""
        spent = now_us - SPENT_RETENTION_US
        removed: dict[str, int] = {}
        with self.begin() as conn:

            def run(name: str, statement: Any) -> None:
                removed[name] = int(conn.execute(statement).rowcount)

            run("codes", delete(oidc_codes).where(oidc_codes.c.expires_us < spent))
            run("auth_requests", delete(oidc_auth_requests).where(oidc_auth_requests.c.expires_us < spent))
            run("device_codes", delete(oidc_device_codes).where(oidc_device_codes.c.expires_us < spent))
            dead_grants = select(oidc_grants.c.grant_id).where(
                or_(oidc_grants.c.expires_us < now_us, oidc_grants.c.revoked_us < spent)
            )
            run(
                "refresh_tokens",
                delete(oidc_refresh_tokens).where(
                    or_(
                        oidc_refresh_tokens.c.expires_us < now_us,
                        oidc_refresh_tokens.c.grant_id.in_(dead_grants),
                    )
                ),
            )
            run(
                "grants",
                delete(oidc_grants).where(
                    or_(oidc_grants.c.expires_us < spent, oidc_grants.c.revoked_us < spent)
                ),
            )
            run(
                "sessions",
                delete(oidc_sessions).where(
                    or_(oidc_sessions.c.expires_us < spent, oidc_sessions.c.ended_us < spent)
                ),
            )
            run(
                "signing_keys",
                delete(oidc_signing_keys).where(
                    and_(
                        oidc_signing_keys.c.publish_until_us.is_not(None),
                        oidc_signing_keys.c.publish_until_us < now_us,
                    )
                ),
            )
            run(
                "events",
                delete(identity_events).where(identity_events.c.at_us < now_us - EVENT_RETENTION_US),
            )
        return removed

    def grants_of(self, *, user_name: str | None = None, client_id: str | None = None) -> list[GrantRecord]:
        """Live grants of a user or a client (for the command line and tests)."""
        q = select(oidc_grants).where(oidc_grants.c.revoked_us.is_(None))
        if user_name is not None:
            q = q.where(oidc_grants.c.user_name == user_name)
        if client_id is not None:
            q = q.where(oidc_grants.c.client_id == client_id)
        with self.connect() as conn:
            rows = conn.execute(q.order_by(oidc_grants.c.created_us)).all()
        return [_grant(r) for r in rows]

    def end_sessions_of(self, user_names: Iterable[str], at_us: int, reason: str) -> int:
        """End every open session of these users and revoke all their grants."""
        names = list(user_names)
        if not names:
            return 0
        with self.begin() as conn:
            ended = conn.execute(
                update(oidc_sessions)
                .where(oidc_sessions.c.user_name.in_(names), oidc_sessions.c.ended_us.is_(None))
                .values(ended_us=at_us, end_reason=reason)
            ).rowcount
            self._revoke_grants(conn, oidc_grants.c.user_name.in_(names), at_us, reason)
        return int(ended)


def _session(row: Row[Any]) -> SessionRecord:
    return SessionRecord(
        session_id=row.session_id,
        user_name=row.user_name,
        user_stamp=row.user_stamp,
        amr=row.amr,
        auth_time_us=row.auth_time_us,
        created_us=row.created_us,
        expires_us=row.expires_us,
        ended_us=row.ended_us,
    )
