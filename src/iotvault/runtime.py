"""Opening iotvault's resources from settings, and the small services the CLI and API share.

:func:`open_context` connects to the database, creates or checks the schema, loads (or on first
start creates) the master key and checks that it is the key this database was made with, so a
wrong ``IOTVAULT_MASTER_KEY_FILE`` fails at start with one message instead of as a thousand
decryption errors later.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.engine import Engine

from iotvault.clock import now_us
from iotvault.config import Settings
from iotvault.crypto.keyring import FINGERPRINT_META, KeyRing
from iotvault.crypto.master_key import MasterKey
from iotvault.crypto.tokens import hash_secret, new_secret
from iotvault.domain.ids import DeviceId, TypeId
from iotvault.errors import BrokerError, DeviceNotFoundError, MasterKeyError
from iotvault.storage import migrate
from iotvault.storage.accounts import AccountStore
from iotvault.storage.db import check_connection, create_db_engine, redact
from iotvault.storage.repository import DeviceRecord
from iotvault.storage.sql import SqlStore


class DeviceAccounts(Protocol):
    """Broker-side accounts that follow the registry (Mosquitto: :mod:`iotvault.broker.dynsec`).

    Called with the plaintext credential, the only moment it exists; raising
    :class:`~iotvault.errors.BrokerError` undoes the registry change where that is possible.
    """

    def device_registered(self, device_id: str, type_id: str, credential: str) -> None: ...
    def credential_rotated(self, device_id: str, type_id: str, credential: str) -> None: ...
    def credential_revoked(self, device_id: str) -> None: ...
    def device_deleted(self, device_id: str) -> None: ...


@dataclass
class Context:
    settings: Settings
    engine: Engine
    store: SqlStore
    accounts: AccountStore
    keyring: KeyRing
    master: MasterKey
    device_accounts: DeviceAccounts | None = None  # None: the embedded broker reads the registry

    def close(self) -> None:
        self.engine.dispose()


def open_context(settings: Settings, *, auto_migrate_empty: bool = True) -> Context:
    url = settings.effective_database_url
    engine = create_db_engine(url, sqlite_synchronous=settings.sqlite_synchronous)
    try:
        check_connection(engine, url)
        migrate.ensure_schema(engine, auto_upgrade_empty=auto_migrate_empty)
        store = SqlStore(engine, url)
        key_path = settings.effective_master_key_file
        master = MasterKey.load_or_create(key_path)
        known = store.get_meta(FINGERPRINT_META)
        if known is None:
            store.set_meta(FINGERPRINT_META, master.fingerprint)
        elif known != master.fingerprint:
            raise MasterKeyError(  # noqa: TRY301 - the engine is disposed on any failure below
                str(key_path),
                f"is not the key this database ({redact(url)}) was made with; "
                "point IOTVAULT_MASTER_KEY_FILE at the right key file",
            )
    except BaseException:
        engine.dispose()
        raise
    return Context(
        settings=settings,
        engine=engine,
        store=store,
        accounts=AccountStore(engine, url),
        keyring=KeyRing(master, store, cache_ttl_s=settings.key_cache_ttl_s),
        master=master,
        device_accounts=_device_accounts(settings),
    )


def _device_accounts(settings: Settings) -> DeviceAccounts | None:
    if not settings.broker_admin_username:
        return None
    from iotvault.broker.dynsec import DynsecAccounts, DynsecClient  # noqa: PLC0415 - Mosquitto only
    from iotvault.broker.tls import client_context  # noqa: PLC0415

    b = settings.broker
    return DynsecAccounts(
        DynsecClient(
            b.host,
            b.port,
            username=settings.broker_admin_username,
            password=settings.broker_admin_password,
            ssl_context=client_context(settings.broker_ca_file) if b.tls else None,
        )
    )


@contextmanager
def context(settings: Settings, *, auto_migrate_empty: bool = True) -> Iterator[Context]:
    ctx = open_context(settings, auto_migrate_empty=auto_migrate_empty)
    try:
        yield ctx
    finally:
        ctx.close()


# ---- devices --------------------------------------------------------------------------
@dataclass(frozen=True)
class NewDevice:
    device_id: str
    type_id: str
    credential: str  # shown once, never stored


def register_device(
    ctx: Context, type_id: str, device_id: str, metadata: Mapping[str, Any] | None = None
) -> NewDevice:
    """Create a device with a fresh data key and a fresh credential (returned once)."""
    did, tid = DeviceId(device_id).value, TypeId(type_id).value
    credential = new_secret()
    record = DeviceRecord(did, tid, "offline", None, dict(metadata or {}), now_us())
    ctx.store.add_device(
        record, wrapped_key=ctx.keyring.new_device_key(did), credential_hash=hash_secret(credential)
    )
    if ctx.device_accounts is not None:
        try:
            ctx.device_accounts.device_registered(did, tid, credential)
        except BrokerError:
            ctx.store.delete_device(did)  # a device the broker would refuse is not registered
            ctx.keyring.forget(did)
            raise
    return NewDevice(did, tid, credential)


def rotate_device_credential(ctx: Context, device_id: str, *, grace_s: int = 0) -> str:
    """A new credential (returned once); the old one stays valid ``grace_s`` seconds.

    With Mosquitto the broker learns the new credential first and drops the old one at once
    (its dynamic-security plugin keeps one password per client): no grace there.
    """
    device = ctx.store.get_device(device_id)
    if device is None:
        raise DeviceNotFoundError(device_id)
    credential = new_secret()
    if ctx.device_accounts is not None:
        ctx.device_accounts.credential_rotated(device.device_id, device.type_id, credential)
    until = now_us() + grace_s * 1_000_000 if grace_s > 0 else None
    ctx.store.set_credential(device_id, hash_secret(credential), previous_valid_until_us=until)
    return credential


def revoke_device_credential(ctx: Context, device_id: str) -> None:
    """Refuse every credential of a device (current and in grace) until it gets a new one."""
    ctx.store.revoke_credentials(device_id)
    if ctx.device_accounts is not None:
        ctx.device_accounts.credential_revoked(device_id)


def delete_device(ctx: Context, device_id: str) -> None:
    if not ctx.store.delete_device(device_id):
        raise DeviceNotFoundError(device_id)
    ctx.keyring.forget(device_id)
    ctx.accounts.forget_device(device_id)  # API keys that named it; its group grants are gone
    if ctx.device_accounts is not None:
        # a failure here is repaired at the next start (DynsecAccounts.reconcile)
        ctx.device_accounts.device_deleted(device_id)
