"""The repository for SQLite and PostgreSQL, written once in SQLAlchemy Core: one store per
aggregate, and :class:`SqlStore` that is all of them on one engine.

=======================================  =====================================================
:mod:`iotvault.storage.devices`          devices, credentials, wrapped data keys
:mod:`iotvault.storage.events`           events, rejected messages, ingest's in-flight records
:mod:`iotvault.storage.commands`         commands and the devices' answers
:mod:`iotvault.storage.security_events`  security events
this module                              ``meta`` (named values such as the key fingerprint)
=======================================  =====================================================

A service that needs one aggregate can name that store's type; the node opens one
:class:`SqlStore` and hands it to all of them.
"""

from __future__ import annotations

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from iotvault.errors import StorageError
from iotvault.storage.commands import CommandTable
from iotvault.storage.devices import DeviceTable
from iotvault.storage.events import EventTable
from iotvault.storage.schema import meta
from iotvault.storage.security_events import SecurityEventTable


class SqlStore(DeviceTable, EventTable, CommandTable, SecurityEventTable):
    """Every aggregate's store on one SQLAlchemy engine, plus ``meta``."""

    def get_meta(self, name: str) -> str | None:
        with self.connect() as conn:
            return conn.execute(select(meta.c.value).where(meta.c.name == name)).scalar_one_or_none()

    def set_meta(self, name: str, value: str) -> None:
        with self.begin() as conn:
            updated = conn.execute(update(meta).where(meta.c.name == name).values(value=value)).rowcount
            if not updated:
                conn.execute(insert(meta).values(name=name, value=value))

    def add_meta_if_absent(self, name: str, value: str) -> str:
        """Store ``value`` under ``name`` unless a value is there already; return the one kept.

        Several nodes starting at once on one database agree on a single value this way.
        """
        try:
            with self.begin() as conn:
                conn.execute(insert(meta).values(name=name, value=value))
        except IntegrityError:
            pass
        kept = self.get_meta(name)
        if kept is None:  # pragma: no cover - deleted between the two statements
            raise StorageError(f"the setting {name!r} disappeared while it was being made")
        return kept
