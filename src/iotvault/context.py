"""Opening iotvault's resources from settings: the composition root the node and the CLI share.

The services (:mod:`iotvault.accounts`, :mod:`iotvault.devices`, commands, identity) never
import this module: each names, as a protocol, the few resources it uses, and a
:class:`Context` is one of them.

:func:`open_context` connects to the database, creates or checks the schema, loads (or on first
start creates) the master key and checks that it is the key this database was made with, so a
wrong ``IOTVAULT_MASTER_KEY_FILE`` fails at start with one message instead of as a thousand
decryption errors later.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine

from iotvault.audit.log import AuditLog, AuditSettings
from iotvault.audit.sources import NameHasher, entry_of_security_event
from iotvault.clock import now_us
from iotvault.commands.keys import stored_secret
from iotvault.config import Settings
from iotvault.crypto.audit_signing import CheckpointSigner
from iotvault.crypto.keyring import FINGERPRINT_META, KeyRing
from iotvault.crypto.master_key import MasterKey
from iotvault.devices import DeviceAccounts
from iotvault.errors import MasterKeyError
from iotvault.storage import migrate
from iotvault.storage.accounts import AccountStore
from iotvault.storage.audit import AuditStore
from iotvault.storage.db import check_connection, create_db_engine, redact
from iotvault.storage.repository import SecurityEvent
from iotvault.storage.sql import SqlStore


@dataclass
class Context:
    settings: Settings
    engine: Engine
    store: SqlStore
    accounts: AccountStore
    keyring: KeyRing
    master: MasterKey
    device_accounts: DeviceAccounts | None = None  # None: the embedded broker reads the registry
    _audit: AuditLog | None = field(default=None, repr=False)
    _org_id: str | None = field(default=None, repr=False)

    @property
    def audit(self) -> AuditLog:
        """The audit log, made on first use (its signing key is made on first use too, so a
        command that only reads writes nothing until it records something)."""
        if self._audit is None:
            seed = stored_secret(self.store, self.master, AUDIT_SIGNING_KEY)
            s = self.settings
            export = Path(s.audit_export_file) if s.audit_export_file else None
            self._audit = AuditLog(
                AuditStore(self.engine, s.effective_database_url),
                CheckpointSigner(seed),
                now_us,
                AuditSettings(checkpoint_interval=s.audit_checkpoint_interval_s, export_path=export),
            )
            hash_name = NameHasher(seed)

            def record_security_events(rows: Sequence[SecurityEvent]) -> None:
                for row in rows:
                    self.audit.record(entry_of_security_event(row, hash_name))

            self.store.on_security_events(record_security_events)
        return self._audit

    @property
    def org_id(self) -> str:
        """The Watson IoT organization id: the ``org_id`` setting, or one made once and kept in
        the database, so every node and every later start names the same organization."""
        if self.settings.org_id:
            return self.settings.org_id
        if self._org_id is None:
            made = "".join(secrets.choice(ORG_ID_ALPHABET) for _ in range(6))
            self._org_id = self.store.add_meta_if_absent(ORG_ID_META, made)
        return self._org_id

    def close(self) -> None:
        if self._audit is not None:
            if self._audit.running:
                self._audit.close()  # the node's writer: last flush and checkpoint
            else:
                self._audit.flush()  # a command's records
        self.engine.dispose()


AUDIT_SIGNING_KEY = "audit_signing_key"
ORG_ID_META = "org_id"
ORG_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def open_context(
    settings: Settings, *, auto_migrate_empty: bool = True, create: bool = True, pool_size: int = 2
) -> Context:
    """``create`` false: open an existing installation only, never make a schema or a master key.

    ``pool_size``: database connections kept open (a command needs one or two; a node sizes it
    for its role). ``IOTVAULT_DATABASE_POOL_SIZE`` overrides it when set.
    """
    url = settings.effective_database_url
    engine = create_db_engine(
        url,
        sqlite_synchronous=settings.sqlite_synchronous,
        pool_size=settings.database_pool_size or pool_size,
        max_overflow=settings.database_pool_overflow,
    )
    try:
        check_connection(engine, url)
        migrate.ensure_schema(engine, auto_upgrade_empty=auto_migrate_empty and create)
        store = SqlStore(engine, url)
        key_path = settings.effective_master_key_file
        master = MasterKey.load_or_create(key_path, create=create)
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
            password=settings.broker_admin_password.get_secret_value(),
            ssl_context=client_context(settings.broker_ca_file) if b.tls else None,
        )
    )


@contextmanager
def context(settings: Settings, *, auto_migrate_empty: bool = True, create: bool = True) -> Iterator[Context]:
    ctx = open_context(settings, auto_migrate_empty=auto_migrate_empty, create=create)
    try:
        yield ctx
    finally:
        ctx.close()
