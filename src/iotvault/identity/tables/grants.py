"""Authorization codes, grants (token families) and refresh tokens."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from iotvault.identity.records import (
    CodeRecord,
    GrantRecord,
    authentication,
    authentication_values,
    grant_record,
)
from iotvault.storage.db import EngineStore
from iotvault.storage.schema import (
    oidc_codes,
    oidc_grants,
    oidc_refresh_tokens,
)


def revoke_grants(conn: Connection, condition: Any, at_us: int, reason: str) -> int:
    return int(
        conn.execute(
            update(oidc_grants)
            .where(condition, oidc_grants.c.revoked_us.is_(None))
            .values(revoked_us=at_us, revoke_reason=reason)
        ).rowcount
    )


class GrantTable(EngineStore):
    """Codes, grants and refresh tokens."""

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
                    **authentication_values(record.who),
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
            who=authentication(row),
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
                    **authentication_values(record.who),
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
        return grant_record(row) if row is not None else None

    def revoke_grant(self, grant_id: str, at_us: int, reason: str) -> bool:
        """Revoke a grant (its refresh tokens die with it); False if it was already revoked."""
        with self.begin() as conn:
            revoked = revoke_grants(conn, oidc_grants.c.grant_id == grant_id, at_us, reason) > 0
        if revoked:
            self.access_changed()  # its access tokens, cached as accepted, are refused at once
        return revoked

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

    def grants_of(self, *, user_name: str | None = None, client_id: str | None = None) -> list[GrantRecord]:
        """Live grants of a user or a client (for the command line and tests)."""
        q = select(oidc_grants).where(oidc_grants.c.revoked_us.is_(None))
        if user_name is not None:
            q = q.where(oidc_grants.c.user_name == user_name)
        if client_id is not None:
            q = q.where(oidc_grants.c.client_id == client_id)
        with self.connect() as conn:
            rows = conn.execute(q.order_by(oidc_grants.c.created_us)).all()
        return [grant_record(r) for r in rows]
