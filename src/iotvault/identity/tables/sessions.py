"""Browser sessions, pending authorization requests, and what the provider reads of users."""

from __future__ import annotations

import json

from sqlalchemy import insert, select, update

from iotvault.identity.records import (
    AuthRequestRecord,
    SessionRecord,
    UserState,
    dumps,
    session_record,
)
from iotvault.identity.tables.grants import revoke_grants
from iotvault.storage.db import EngineStore
from iotvault.storage.schema import (
    oidc_auth_requests,
    oidc_grants,
    oidc_sessions,
    users,
)


class SessionTable(EngineStore):
    """Sessions and authorization requests."""

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
        return session_record(row) if row is not None else None

    def get_session(self, session_id: str) -> SessionRecord | None:
        row = self.first(select(oidc_sessions).where(oidc_sessions.c.session_id == session_id))
        return session_record(row) if row is not None else None

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
            revoke_grants(conn, oidc_grants.c.session_id == session_id, at_us, reason)
        self.access_changed()

    # ---- pending authorization requests ------------------------------------------------
    def add_auth_request(self, record: AuthRequestRecord) -> None:
        with self.begin() as conn:
            conn.execute(
                insert(oidc_auth_requests).values(
                    request_id=record.request_id,
                    kind=record.kind,
                    params=dumps(record.params),
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
