"""Schema migrations (Alembic), run programmatically: no ``alembic.ini`` is needed or shipped.

``iotvault db upgrade`` runs them explicitly; ``iotvault serve`` runs them on an empty
database only, and refuses to start on a database at an older revision, so that an upgrade of
a shared PostgreSQL database is always a deliberate step.
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

from iotvault.errors import SchemaError


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "iotvault.storage:migrations")
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None  # noqa: S101 - the package always ships at least one revision
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    cfg = _config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def is_empty(engine: Engine) -> bool:
    return not inspect(engine).get_table_names()


def ensure_schema(engine: Engine, *, auto_upgrade_empty: bool = True) -> None:
    """Create the schema on an empty database; refuse a database at another revision."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if current is None and auto_upgrade_empty and is_empty(engine):
        upgrade(engine)
        return
    raise SchemaError(
        f"the database schema is at revision {current or 'none'}, this iotvault needs {head}: "
        "run 'iotvault db upgrade' (back up the database first)"
    )
