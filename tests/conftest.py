"""Shared fixtures: real services, started or found, and skipped loudly when absent.

Under CI (``CI=true``) a missing service is a failure, never a skip.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.private_pg import PrivatePostgres, PrivatePostgresError
from helpers import (
    PG_ADMIN_URL,
    Mosquitto,
    ServerProcess,
    free_port,
    pg_admin_connect,
    require_mosquitto,
    unavailable,
)

from iotvault.storage.audit import AuditStore
from iotvault.storage.db import create_db_engine
from iotvault.storage.migrate import ensure_schema

# the suite-wide secret-leak scan (issue 15): collects the run's secrets and iotvault's logs and
# audit exports, and fails the session if one holds one (tests/leakscan.py)
from leakscan import (  # noqa: F401 - hooks of this conftest
    pytest_configure,
    pytest_sessionfinish,
    pytest_terminal_summary,
)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    require_mosquitto()
    m = Mosquitto(free_port(), tmp_path_factory.mktemp("mosquitto"))
    m.start()
    yield m
    m.stop()


# ---- PostgreSQL ---------------------------------------------------------------------
@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    name = f"iotvault_t_{uuid.uuid4().hex[:12]}"
    with pg_admin_connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with pg_admin_connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of the tests' own, which they may stop, start and lock (bench.private_pg)."""
    try:
        pg = PrivatePostgres()
    except PrivatePostgresError as exc:
        unavailable(str(exc))
    with pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'iotvault.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def audit_store(database_url: str) -> Iterator[AuditStore]:
    """The audit tables on a fresh database (SQLite and PostgreSQL), schema made."""
    engine = create_db_engine(database_url)
    ensure_schema(engine)
    yield AuditStore(engine, database_url)
    engine.dispose()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    servers: list[ServerProcess] = []
    yield servers
    for s in servers:
        s.stop()
