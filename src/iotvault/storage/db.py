"""Engine construction and the translation of driver errors into the error tree.

SQLite is opened in WAL mode with ``synchronous=FULL`` by default: a commit is on disk before
an event is acknowledged, which is the promise the ingest path makes (``normal`` is allowed by
setting ``sqlite_synchronous``: it survives a process crash but not a power cut).
``secure_delete`` makes deleted rows, such as the wrapped data key of a deleted device, be
overwritten in the file rather than left in free pages.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, Row, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from iotvault.errors import ConfigError, DatabaseUnavailableError, DatabaseUnwritableError

log = logging.getLogger(__name__)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def _driver_url(url: str) -> URL:
    try:
        u = make_url(url)
    except ArgumentError:
        raise ConfigError("database_url", "not a valid database URL") from None
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    elif u.drivername == "sqlite":
        u = u.set(drivername="sqlite+pysqlite")
    return u


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def create_db_engine(
    url: str, *, sqlite_synchronous: str = "full", pool_size: int = 5, max_overflow: int = 5
) -> Engine:
    """An engine whose pool keeps ``pool_size`` connections and opens up to ``max_overflow``
    more at busy times (a node sizes them for its role: :func:`iotvault.node.pool_size`)."""
    u = _driver_url(url)
    if u.get_backend_name() == "sqlite":
        if not u.database or u.database == ":memory:":
            raise ConfigError(
                "database_url", "an in-memory SQLite database cannot be shared; give a file path"
            )
        path = Path(u.database)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():  # the file holds device metadata and wrapped keys: owner only
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        engine = create_engine(
            u,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=max_overflow,
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={'FULL' if sqlite_synchronous == 'full' else 'NORMAL'}")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA secure_delete=ON")
            cur.close()

        return engine
    if u.get_backend_name() != "postgresql":
        raise ConfigError("database_url", f"unsupported database {u.get_backend_name()!r}")
    try:
        return create_engine(u, pool_pre_ping=True, pool_size=pool_size, max_overflow=max_overflow)
    except ImportError:
        raise ConfigError(
            "database_url", "PostgreSQL needs the psycopg driver: pip install 'iotvault[postgres]'"
        ) from None


# Driver messages that mean "cannot write" rather than "cannot reach": SQLite's disk-full and
# read-only-database errors, PostgreSQL's no-space-left and read-only-transaction errors.
_UNWRITABLE = re.compile(r"disk is full|no space left|readonly database|read-only", re.IGNORECASE)


@contextmanager
def mapped_errors(url: str) -> Iterator[None]:
    """Translate connection failures into :class:`DatabaseUnavailableError` (one place)."""
    try:
        yield
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else "operational error"
        if _UNWRITABLE.search(reason):
            raise DatabaseUnwritableError(redact(url), reason) from exc
        raise DatabaseUnavailableError(redact(url), reason) from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise DatabaseUnavailableError(redact(url), "connection lost") from exc
        raise


@contextmanager
def driver_connection(conn: Connection, statement: str) -> Iterator[Any]:
    """The driver's own connection under ``conn``, for the hot paths where SQLAlchemy's
    statement machinery costs more than the statement (an ingest batch's ``COPY``, the one-row
    check of a cached page: BENCHMARKS.md). Its errors come out as SQLAlchemy's, as they would
    from ``conn.execute``: a dead connection is dropped from the pool, and :func:`mapped_errors`
    turns them into :class:`DatabaseUnavailableError` (``statement`` is what they quote)."""
    dialect = conn.dialect
    raw: Any = conn.connection.driver_connection
    dbapi_error = dialect.loaded_dbapi.Error
    try:
        yield raw
    except dbapi_error as exc:
        gone = dialect.is_disconnect(exc, raw, None)
        if gone:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            statement, None, exc, dbapi_error, connection_invalidated=gone, dialect=dialect
        ) from exc


_DATA_VERSION = {"qmark": "PRAGMA data_version", "format": "PRAGMA data_version"}


class PinnedReader:
    """One driver connection per thread, out of the pool, for one-row reads that must be cheap.

    The check of a kept page (:meth:`iotvault.storage.events.EventTable.page_news`) is one
    small query. Through the pool it cost more than itself: on SQLite the checkout and check-in
    were a fifth of a cached last-50 read; on PostgreSQL the pool's ping before it and the
    rollback after it were two more round trips (BENCHMARKS.md, issue 17). Here a thread keeps
    one connection for these reads, in autocommit: a SELECT holds no snapshot between reads, so
    it keeps no writer, vacuum or checkpoint waiting. Each is made by the engine's pool (with
    its pragmas and settings), then detached from it. A connection the server dropped (a
    restart) is replaced and the read tried once more, as the pool's ping would have; any other
    failure closes it and is raised as :func:`mapped_errors` raises it. A thread that ends
    leaves its connection to be closed when the next one is made; all are closed when the
    engine is disposed. At most one per live thread that reads: the API's loop on SQLite, its
    few read threads on PostgreSQL.
    """

    def __init__(self, engine: Engine, url: str) -> None:
        self._engine = engine
        self._url = url
        self._style = "qmark" if engine.dialect.paramstyle == "qmark" else "format"
        self._local = threading.local()
        self._open: list[tuple[threading.Thread, Any]] = []
        self._lock = threading.Lock()
        self._made = 0  # connections made so far: each one's serial (stamp)
        event.listen(engine, "engine_disposed", lambda _engine: self.close())

    @property
    def connections(self) -> int:
        return len(self._open)

    def _mine(self) -> Any:
        mine: Any = getattr(self._local, "conn", None)
        if mine is not None:
            return mine
        dialect = self._engine.dialect
        try:
            proxied = self._engine.raw_connection()
        except dialect.loaded_dbapi.Error as exc:  # the pool passes the driver's own error on
            with mapped_errors(self._url):
                raise DBAPIError.instance(
                    None, None, exc, dialect.loaded_dbapi.Error, dialect=dialect
                ) from exc
        raw: Any = proxied.driver_connection
        proxied.detach()  # the pool forgets it: closed here, never handed to anyone else
        if dialect.name == "postgresql":
            raw.rollback()  # the pool's ping began a transaction
            raw.autocommit = True
        self._local.conn = raw
        with self._lock:
            self._made += 1
            self._local.serial = self._made
            ended = [c for t, c in self._open if not t.is_alive()]
            self._open = [(t, c) for t, c in self._open if t.is_alive()]
            self._open.append((threading.current_thread(), raw))
        for conn in ended:
            conn.close()
        return raw

    def one(self, statement: dict[str, str], params: tuple[Any, ...]) -> Any:
        """The first row of ``statement`` (made by :func:`by_paramstyle`)."""
        return self._run(statement, params, many=False)

    def stamp(self) -> tuple[int, int]:
        """SQLite: which of this thread's connections, and its ``PRAGMA data_version``.

        The same stamp twice means no connection (of this process or another) committed to the
        database in between: SQLite changes the version a connection reads for every commit
        made by any other, and these connections never write. A replaced connection has a
        new serial, so stamps of different connections never match.
        """
        version = self._run(_DATA_VERSION, (), many=False)[0]
        return self._local.serial, version

    def rows(self, statement: dict[str, str], params: tuple[Any, ...]) -> list[Any]:
        """Every row of ``statement`` (made by :func:`by_paramstyle`)."""
        return list(self._run(statement, params, many=True))

    def _run(self, statement: dict[str, str], params: tuple[Any, ...], *, many: bool) -> Any:
        sql = statement[self._style]
        dialect = self._engine.dialect
        dbapi_error = dialect.loaded_dbapi.Error
        for attempt in (1, 2):
            raw = self._mine()
            try:
                cur = raw.cursor()
                try:
                    cur.execute(sql, params)
                    return cur.fetchall() if many else cur.fetchone()
                finally:
                    cur.close()
            except dbapi_error as exc:
                gone = dialect.is_disconnect(exc, raw, None)
                self._forget(raw)
                if gone and attempt == 1:
                    continue
                with mapped_errors(self._url):
                    raise DBAPIError.instance(
                        sql, params, exc, dbapi_error, connection_invalidated=gone, dialect=dialect
                    ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _forget(self, raw: Any) -> None:
        self._local.conn = None
        with self._lock:
            self._open = [(t, c) for t, c in self._open if c is not raw]
        try:
            raw.close()
        except Exception:  # a connection that cannot even close is gone anyway
            log.debug("a broken pinned connection did not close cleanly", exc_info=True)

    def close(self) -> None:
        with self._lock:
            gone, self._open = self._open, []
        for _thread, raw in gone:
            raw.close()


class LoopReader:
    """PostgreSQL: one connection per event loop, in autocommit, for one-row reads awaited on it.

    The check of a kept page is one round trip. In a worker thread it cost the read more than
    the round trip itself (handing the request to the thread and back: ~270 µs of CPU a read,
    BENCHMARKS.md, issue 17); run blocking on the loop, a server that stopped answering would
    stall every request and ingest with it. Awaited, it costs neither: the loop serves others
    while the answer travels, and ``timeout_s`` bounds the wait
    (:class:`~iotvault.errors.DatabaseUnavailableError` then, as for a refused connection). The
    reads of one loop take turns on its connection (each is one indexed row). A connection the
    server dropped is replaced and the read tried once more; one that timed out or failed is
    closed. Closed with the engine (:meth:`close`, synchronous: it only drops the socket).
    """

    def __init__(self, engine: Engine, url: str, *, timeout_s: float = 5.0) -> None:
        self._conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._url = url
        self.timeout_s = timeout_s
        self._conn: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._turn = asyncio.Lock()
        event.listen(engine, "engine_disposed", lambda _engine: self.close())

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def _unavailable(self, reason: str) -> DatabaseUnavailableError:
        return DatabaseUnavailableError(redact(self._url), reason)

    async def _mine(self) -> Any:
        import psycopg  # noqa: PLC0415 - PostgreSQL's driver is an optional dependency

        if self._conn is None:
            try:
                self._conn = await asyncio.wait_for(
                    psycopg.AsyncConnection.connect(self._conninfo, autocommit=True), self.timeout_s
                )
            except TimeoutError:
                raise self._unavailable(f"no connection within {self.timeout_s:g}s") from None
            except psycopg.OperationalError as exc:
                raise self._unavailable(str(exc).strip().splitlines()[0]) from exc
        return self._conn

    async def one(self, statement: dict[str, str], params: tuple[Any, ...]) -> Any:
        """The first row of ``statement`` (made by :func:`by_paramstyle`)."""
        return await self._run(statement, params, many=False)

    async def rows(self, statement: dict[str, str], params: tuple[Any, ...]) -> list[Any]:
        """Every row of ``statement`` (made by :func:`by_paramstyle`)."""
        return list(await self._run(statement, params, many=True))

    async def _run(self, statement: dict[str, str], params: tuple[Any, ...], *, many: bool) -> Any:
        import psycopg  # noqa: PLC0415 - PostgreSQL's driver is an optional dependency

        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a connection (and a lock) belong to the loop that made them
            self.close()
            self._loop, self._turn = loop, asyncio.Lock()
        async with self._turn:
            for attempt in (1, 2):
                fresh = self._conn is None
                conn = await self._mine()
                try:
                    async with asyncio.timeout(self.timeout_s):  # no task of its own, as wait_for makes
                        cur = await conn.execute(statement["format"], params)
                        return await (cur.fetchall() if many else cur.fetchone())
                except TimeoutError:
                    self.close()
                    raise self._unavailable(f"no answer within {self.timeout_s:g}s") from None
                except psycopg.OperationalError as exc:
                    self.close()
                    if attempt == 1 and not fresh:  # dropped by the server (a restart): once more
                        continue
                    raise self._unavailable(str(exc).strip().splitlines()[0]) from exc
                except BaseException:
                    self.close()
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.pgconn.finish()  # libpq's close: the socket goes now, from any thread or loop


K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


class Coalesced(Generic[K, V]):
    """Asks of one event loop answered together: those made while an answer is on its way wait
    for the next one, which takes all of them (up to ``most``) in one call of ``answer``.

    For one-row reads of the database awaited on the loop (:class:`LoopReader`): ten requests
    checking ten kept pages cost ten round trips one after another on the loop's connection,
    each with the driver's work around it; asked together they cost one. Every ask is answered
    by a read that began after it was made (never by one already under way), so it sees every
    change committed before it was asked, as a read of its own would. The answers are made by
    a task of this object's own, so a caller that goes away (a client that hung up) takes no
    one else's answer with it. ``answer`` returns an answer for each key it was given; what it
    raises is raised to every caller of that turn.
    """

    def __init__(self, answer: Callable[[list[K]], Awaitable[Mapping[K, V]]], *, most: int = 64) -> None:
        self._answer = answer
        self.most = most
        self._waiting: dict[K, list[asyncio.Future[V]]] = {}
        self._runner: asyncio.Task[None] | None = None
        self.turns = 0  # calls of answer so far (for tests and measurements)

    async def ask(self, key: K) -> V:
        loop = asyncio.get_running_loop()
        runner = self._runner
        if runner is not None and runner.get_loop() is not loop:  # another loop's: start afresh
            self._waiting, runner = {}, None
        waiter: asyncio.Future[V] = loop.create_future()
        self._waiting.setdefault(key, []).append(waiter)
        if runner is None or runner.done():
            self._runner = loop.create_task(self._run())
        return await waiter

    async def _run(self) -> None:
        while self._waiting:
            keys = list(self._waiting)[: self.most]
            turn = {key: self._waiting.pop(key) for key in keys}
            self.turns += 1
            try:
                answers = await self._answer(keys)
            except Exception as exc:  # noqa: BLE001 - raised to every caller of the turn
                for waiters in turn.values():
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(exc)
                continue
            except BaseException:  # cancelled (the loop is closing): so are the callers
                for waiters in (*turn.values(), *self._waiting.values()):
                    for waiter in waiters:
                        waiter.cancel()
                self._waiting = {}
                raise
            for key, waiters in turn.items():
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(answers[key])


SQLITE_ROWS_PER_INSERT = (64, 16, 4, 1)
"""Rows per multi-row INSERT (:func:`insert_rows`): 64 rows of up to 15 columns stay under
the 999 parameters of SQLite builds older than 3.32; at most a dozen statements a batch."""


@functools.cache
def _values_sql(into: str, columns: int, rows: int) -> str:
    one = "(" + ",".join("?" * columns) + ")"
    return f"{into} VALUES {','.join([one] * rows)}"


def insert_rows(cursor: Any, into: str, rows: Sequence[Sequence[Any]]) -> None:
    """SQLite: ``rows`` inserted with ``cursor`` by ``into`` (``INSERT INTO t (a, b)``) in a few
    multi-row statements instead of ``executemany``'s one step per row.

    sqlite3 lets go of the interpreter lock around every step and must get it back after;
    while the event loop was busy (an API serving reads in the same process), each row of an
    ingest batch or of the audit log's flush waited up to the interpreter's switch interval
    (5 ms) for it: 465 rows took seconds, ingest fell from 5,000 to 372 events/s and the
    audit writer held SQLite's one write lock as long (BENCHMARKS.md, issue 17, round 5). A
    statement of 64 rows is one step.
    """
    if not rows:
        return
    columns = len(rows[0])
    for chunk in sqlite_chunks(rows):
        cursor.execute(_values_sql(into, columns, len(chunk)), [value for row in chunk for value in row])


def sqlite_chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """``items`` in runs of :data:`SQLITE_ROWS_PER_INSERT` sizes, largest first: a statement per
    run, and at most four statement texts per table (each compiled once)."""
    at = 0
    for size in SQLITE_ROWS_PER_INSERT:
        while len(items) - at >= size:
            yield items[at : at + size]
            at += size


def by_paramstyle(qmark_sql: str) -> dict[str, str]:
    """One statement in the two placeholder styles of the drivers (sqlite3 ``?``, psycopg ``%s``)."""
    return {"qmark": qmark_sql, "format": qmark_sql.replace("?", "%s")}


def for_driver(statement: dict[str, str], conn: Connection) -> str:
    """The statement of :func:`by_paramstyle` in the placeholders of ``conn``'s driver."""
    return statement["qmark" if conn.dialect.paramstyle == "qmark" else "format"]


class EngineStore:
    """A store on a node's one engine, whose connections speak the error tree.

    :class:`~iotvault.storage.sql.SqlStore`, :class:`~iotvault.storage.accounts.AccountStore`
    and :class:`~iotvault.identity.store.IdentityStore` share the engine and this set-up: every
    statement runs inside :meth:`connect` (reads) or :meth:`begin` (one transaction), so a lost
    database surfaces as :class:`DatabaseUnavailableError` naming the URL without its password.
    """

    on_change: Callable[[], None] | None = None
    """Called after each committed change to who may do what (users, groups, API keys, grants).

    The node sets it (node.py) to empty the caches of authentication results, on this node
    at once and on the others through the fan-out; None elsewhere.
    """

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = redact(url)

    def access_changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection for reads; whatever it began is rolled back when the block ends."""
        with mapped_errors(self.url), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with mapped_errors(self.url), self.engine.begin() as conn:
            yield conn

    def first(self, statement: Select[Any]) -> Row[Any] | None:
        """The first row a query finds, or None: the one-row read most lookups are."""
        with self.connect() as conn:
            return conn.execute(statement).first()


def check_connection(engine: Engine, url: str) -> None:
    with mapped_errors(url), engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")


def connection_for(engine: Engine) -> Connection:
    return engine.connect()
