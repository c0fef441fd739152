"""Database pools are sized for the node's role, and the settings override that."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotvault.api.routes.devices import READ_THREADS
from iotvault.config import load_settings
from iotvault.context import context
from iotvault.node import POOL_SIZES, Role, pool_size
from iotvault.storage.db import create_db_engine


def test_each_role_has_a_pool_and_the_api_one_covers_its_read_threads() -> None:
    assert pool_size(Role.API) > READ_THREADS  # reads, plus authentication and the audit writer
    assert pool_size(Role.INGEST) < pool_size(Role.API) <= pool_size(Role.ALL)
    assert set(POOL_SIZES) == set(Role)


@pytest.mark.parametrize("url", ["postgresql://u@127.0.0.1:1/db", "sqlite:///{tmp}/x.db"])
def test_the_engine_keeps_the_pool_it_is_given(tmp_path: Path, url: str) -> None:
    engine = create_db_engine(url.format(tmp=tmp_path), pool_size=7, max_overflow=3)  # no connection yet
    try:
        assert engine.pool.size() == 7  # type: ignore[attr-defined]
        assert engine.pool._max_overflow == 3  # type: ignore[attr-defined]
    finally:
        engine.dispose()


def test_the_setting_overrides_the_role_and_a_command_keeps_a_small_pool(tmp_path: Path) -> None:
    base = {"IOTVAULT_DATA_DIR": str(tmp_path / "data")}
    with context(load_settings(environ=base)) as ctx:
        assert ctx.engine.pool.size() == 2  # type: ignore[attr-defined]
    s = load_settings(
        environ={**base, "IOTVAULT_DATABASE_POOL_SIZE": "25", "IOTVAULT_DATABASE_POOL_OVERFLOW": "0"}
    )
    with context(s) as ctx:
        assert ctx.engine.pool.size() == 25  # type: ignore[attr-defined]
        assert ctx.engine.pool._max_overflow == 0  # type: ignore[attr-defined]
