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

from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, delete, or_, select, update

from iotvault.identity.tables.clients import ClientTable
from iotvault.identity.tables.device_codes import DeviceCodeTable
from iotvault.identity.tables.events import IdentityEventTable
from iotvault.identity.tables.grants import GrantTable, revoke_grants
from iotvault.identity.tables.sessions import SessionTable
from iotvault.storage.schema import (
    identity_events,
    oidc_auth_requests,
    oidc_codes,
    oidc_device_codes,
    oidc_grants,
    oidc_refresh_tokens,
    oidc_sessions,
    oidc_signing_keys,
)

# identity_events rows are kept this long (and then deleted by the housekeeping)
EVENT_RETENTION_US = 90 * 86_400 * 1_000_000
# used or expired codes, requests and device codes are kept a day for inspection
SPENT_RETENTION_US = 86_400 * 1_000_000


class IdentityStore(ClientTable, SessionTable, GrantTable, DeviceCodeTable, IdentityEventTable):
    """The provider's tables on one SQLAlchemy engine (the one the other stores use); each
    aggregate is a store of its own in :mod:`iotvault.identity.tables`."""

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
            revoke_grants(conn, oidc_grants.c.user_name.in_(names), at_us, reason)
        self.access_changed()
        return int(ended)
