"""OAuth clients and the provider's signing keys."""

from __future__ import annotations

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from iotvault.errors import ClientExistsError
from iotvault.identity.records import (
    ClientRecord,
    SigningKeyRecord,
    client_record,
    dumps,
)
from iotvault.storage.db import EngineStore
from iotvault.storage.schema import (
    oidc_clients,
    oidc_codes,
    oidc_device_codes,
    oidc_grants,
    oidc_signing_keys,
)


class ClientTable(EngineStore):
    """Clients and signing keys."""

    # ---- clients -----------------------------------------------------------------------
    def add_client(self, record: ClientRecord, secret_hash: str | None) -> None:
        try:
            with self.begin() as conn:
                conn.execute(
                    insert(oidc_clients).values(
                        client_id=record.client_id,
                        display_name=record.display_name,
                        secret_hash=secret_hash,
                        redirect_uris=dumps(list(record.redirect_uris)),
                        post_logout_redirect_uris=dumps(list(record.post_logout_redirect_uris)),
                        grant_types=dumps(list(record.grant_types)),
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
        return (client_record(row), row.secret_hash) if row is not None else None

    def list_clients(self) -> list[ClientRecord]:
        with self.connect() as conn:
            rows = conn.execute(select(oidc_clients).order_by(oidc_clients.c.client_id)).all()
        return [client_record(r) for r in rows]

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
            deleted = bool(
                conn.execute(delete(oidc_clients).where(oidc_clients.c.client_id == client_id)).rowcount
            )
        self.access_changed()
        return deleted

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
