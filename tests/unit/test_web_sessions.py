"""The web application's sessions in the database: named by a hash, sealed by the cookie, bounded.

On a real SQLite file (the same table PostgreSQL holds for several API nodes; the two-node test
is in ``tests/integration/test_cluster.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from iotvault.crypto.cookie_seal import cookie_id, open_sealed, seal
from iotvault.storage.db import create_db_engine
from iotvault.storage.schema import metadata, web_sessions
from iotvault.storage.web_sessions import WebSessionTable
from iotvault.web import session as module
from iotvault.web.session import HOST_NAME, PLAIN_NAME, SessionStore, WebSession


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'web.db'}"
    engine = create_db_engine(url)
    metadata.create_all(engine, tables=[web_sessions])
    yield engine
    engine.dispose()


def _store(engine: Engine, *, https: bool = False) -> SessionStore:
    return SessionStore(WebSessionTable(engine, str(engine.url)), https=https)


def _session() -> WebSession:
    return WebSession(
        "access-token-value-1234", "refresh-token-value-5678", "id-token-x", 0.0, "alice", False
    )


def _rows(engine: Engine) -> list[tuple[str, bytes]]:
    with engine.connect() as conn:
        return [
            (r.id, bytes(r.sealed)) for r in conn.execute(select(web_sessions.c.id, web_sessions.c.sealed))
        ]


def test_cookie_names_and_attributes(engine: Engine) -> None:
    https, http = _store(engine, https=True), _store(engine)
    assert https.cookie == HOST_NAME
    assert http.cookie == PLAIN_NAME  # browsers refuse __Host- without Secure
    header = https.set_cookie_header(https.cookie, "v")
    assert header == "__Host-iotvault-web=v; Path=/; HttpOnly; SameSite=Strict; Secure"
    assert "Secure" not in http.set_cookie_header(http.cookie, "v")
    assert "Domain" not in header


def test_a_session_is_found_by_its_cookie_only_by_any_store_and_ends_on_drop(engine: Engine) -> None:
    a, b = _store(engine), _store(engine)  # two nodes on one database
    value = a.create(_session())
    found = b.get(value)
    assert found is not None
    assert (found.user, found.access_token, found.refresh_token) == (
        "alice",
        "access-token-value-1234",
        "refresh-token-value-5678",
    )
    assert b.get(value + "x") is None
    assert b.get("x" * 500) is None
    assert b.get(None) is None
    dropped = b.drop(value)
    assert dropped is not None
    assert dropped.refresh_token == "refresh-token-value-5678"  # to be revoked by the caller
    assert a.get(value) is None
    assert a.drop(value) is None


def test_the_database_holds_neither_the_cookie_nor_a_token(engine: Engine) -> None:
    store = _store(engine)
    value = store.create(_session())
    ((row_id, sealed),) = _rows(engine)
    assert row_id == cookie_id(value)
    assert value not in row_id
    for secret in (value, "access-token-value-1234", "refresh-token-value-5678", "alice"):
        assert secret.encode() not in sealed


def test_an_altered_or_moved_record_does_not_open(engine: Engine) -> None:
    store = _store(engine)
    value = store.create(_session())
    other = store.create(_session())
    (_, sealed) = next(r for r in _rows(engine) if r[0] == cookie_id(value))
    with engine.begin() as conn:  # a database writer copies one session's record onto another's
        conn.execute(update(web_sessions).where(web_sessions.c.id == cookie_id(other)).values(sealed=sealed))
    assert store.get(other) is None
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    assert open_sealed(value, flipped) is None
    assert open_sealed(value, seal(value, b"x")) == b"x"
    assert open_sealed(other, seal(value, b"x")) is None


def test_expired_sessions_are_refused(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(engine)
    value = store.create(_session())
    now = module.time.time()
    monkeypatch.setattr(module.time, "time", lambda: now + module.IDLE_S + 1)
    assert store.get(value) is None


def test_use_moves_the_idle_deadline_but_not_the_absolute_one(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(engine)
    start = module.time.time()
    value = store.create(_session())
    clock = [start]
    monkeypatch.setattr(module.time, "time", lambda: clock[0])
    step = module.IDLE_S - 60
    while clock[0] + step < start + module.ABSOLUTE_S:
        clock[0] += step
        assert store.get(value) is not None, "an active session must stay"
    clock[0] = start + module.ABSOLUTE_S + 1
    assert store.get(value) is None


def test_a_pending_login_is_used_once_on_any_node(engine: Engine) -> None:
    a, b = _store(engine), _store(engine)
    value, pending = a.start_login()
    assert b.finish_login(value) == pending
    assert a.finish_login(value) is None
    assert b.finish_login(None) is None


def test_one_refresh_claim_wins_and_a_stale_version_cannot_overwrite(engine: Engine) -> None:
    a, b = _store(engine), _store(engine)
    value = a.create(_session())
    on_a, on_b = a.get(value), b.get(value)
    assert on_a is not None
    assert on_b is not None
    assert a.claim_refresh(value, on_a)
    assert not b.claim_refresh(value, on_b)  # B waits for A's tokens
    on_a.access_token = "new-access-token-999999"
    assert a.save_refreshed(value, on_a)
    assert not b.save_refreshed(value, on_b)  # the version B read is gone
    again = b.get(value)
    assert again is not None
    assert again.access_token == "new-access-token-999999"
    assert again.version == on_a.version


def test_sessions_and_pending_logins_stay_bounded_under_a_flood(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(module, "MAX_SESSIONS", 50)
    monkeypatch.setattr(module, "MAX_PENDING", 50)
    store = _store(engine)
    first = store.create(_session())
    for _ in range(300):
        store.create(_session())
        store.start_login()
    assert len(store) == 50
    assert store.pending_count() == 50
    assert store.get(first) is None  # the oldest went
