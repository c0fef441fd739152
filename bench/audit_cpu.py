"""CPU per audited request of the audit record itself, in process: the loop's side and the writer's.

``python -m bench.audit_cpu [--db sqlite|postgres] [--requests N] [--batch B] [--repeat R] [--profile]``

(a) **The loop's side.** :class:`~iotvault.api.audit.AuditTrail` around a trivial ASGI app that
does what the cached last-50 read leaves in the scope (the route, the path's ``deviceId``, an
API key principal, ``request.state.audit = {"events": 50}``) and answers 200, called N times for
``GET /iotf/devices/d1?count=50`` with the audit log's ``record`` and the alert monitor as its
observer, as in a node; minus the same calls of the trivial app alone. That difference is what
each request pays on the event loop for its record.

(b) **The writer's side.** :meth:`AuditLog.flush` of batches of B of those records (what the
writer thread does every ``flush_interval``: hash chain, rows, one transaction) on a fresh
database (SQLite in a temporary directory, or a scratch PostgreSQL database created and dropped
on 127.0.0.1:5432, or where ``IOTVAULT_BENCH_PG_ADMIN`` says), per record. That runs in the
writer thread of a node, holding the interpreter lock the event loop waits for.

CPU is ``time.process_time`` (this process, every thread; the database server's is not in it).
Each measure is repeated R times; the best and the median are printed. ``--profile`` prints
cProfile's top functions of one more run of each side instead.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg

from bench.services import PG_ADMIN_URL
from iotvault.api.audit import AuditTrail
from iotvault.audit.log import AuditLog, verify_log
from iotvault.audit.monitor import AlertMonitor
from iotvault.auth.policy import Principal
from iotvault.clock import now_us
from iotvault.crypto.audit_signing import CheckpointSigner
from iotvault.domain.audit import AuditEntry
from iotvault.storage.audit import AuditStore
from iotvault.storage.db import create_db_engine
from iotvault.storage.migrate import ensure_schema

PG_ADMIN = PG_ADMIN_URL  # IOTVAULT_BENCH_PG_ADMIN, else IOTVAULT_TEST_PG_ADMIN, else postgres@127.0.0.1:5432
ROUTE = SimpleNamespace(path="/iotf/devices/{deviceId}")
PRINCIPAL = Principal("api_key", "k_benchreader01", False, frozenset({"d1"}), frozenset())
HEADERS = [
    (b"host", b"127.0.0.1:8080"),
    (b"authorization", b"Basic YS1rX2JlbmNocmVhZGVyMDE6cGFzc3dvcmQ="),
    (b"accept", b"application/json"),
    (b"user-agent", b"bench/1"),
]
SKIP = frozenset({("POST", "/oidc/token"), ("GET", "/oidc/authorize"), ("POST", "/oidc/authorize")})


def _scope() -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": "/iotf/devices/d1",
        "query_string": b"count=50",
        "headers": list(HEADERS),
        "client": ("127.0.0.1", 51234),
        "state": {"principal": PRINCIPAL},
    }


async def _read(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """What the cached last-50 read leaves in the scope, and a 200."""
    scope["route"] = ROUTE
    scope["path_params"] = {"deviceId": "d1"}
    scope["state"]["audit"] = {"events": 50}
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": b"[]"})


async def _receive() -> dict[str, Any]:  # pragma: no cover - the trivial app reads no body
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: dict[str, Any]) -> None:
    return None


async def _calls(app: Any, n: int, prof: cProfile.Profile | None = None) -> float:
    """CPU of ``n`` requests through ``app``, in seconds (profiled by ``prof`` if given)."""
    if prof is not None:
        prof.enable()
    t0 = time.process_time()
    for _ in range(n):
        await app(_scope(), _receive, _send)
    spent = time.process_time() - t0
    if prof is not None:
        prof.disable()
    return spent


@contextmanager
def _database(kind: str) -> Iterator[str]:
    """A fresh, empty database's URL (a temporary SQLite file, or a scratch PostgreSQL database)."""
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "sqlite":
            yield f"sqlite:///{Path(tmp) / 'audit.db'}"
            return
        name = f"iotvault_audit_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
        finally:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def _audit_log(kind: str) -> Iterator[tuple[AuditLog, AuditStore]]:
    with _database(kind) as url:
        engine = create_db_engine(url)
        try:
            ensure_schema(engine)
            store = AuditStore(engine, url)
            audit = AuditLog(store, CheckpointSigner(b"\x05" * 32), now_us)
            audit.observers.append(AlertMonitor(store).observe_entry)  # as a node has it
            yield audit, store
        finally:
            engine.dispose()


def _trail(record: Callable[[AuditEntry], None]) -> AuditTrail:
    return AuditTrail(_read, record=record, describe=lambda r: r, skip=SKIP)


def loop_side(audit: AuditLog, n: int, prof: cProfile.Profile | None = None) -> float:
    """µs of CPU per request that the audit trail adds on the event loop."""
    trail = _trail(audit.record)

    async def run() -> tuple[float, float]:
        await _calls(trail, 2000)  # warm
        audit.flush()
        chunk, with_trail, bare = 5000, 0.0, 0.0
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            bare += await _calls(_read, k)
            with_trail += await _calls(trail, k, prof)
            audit.flush()  # not timed: the writer's part is (b)
        return with_trail, bare

    with_trail, bare = asyncio.run(run())
    return (with_trail - bare) / n * 1e6


def entries(n: int) -> list[AuditEntry]:
    """``n`` records exactly as the audit trail makes them for the last-50 read."""
    made: list[AuditEntry] = []
    trail = _trail(made.append)

    async def run() -> None:
        for _ in range(n):
            await trail(_scope(), _receive, _send)

    asyncio.run(run())
    return made


def writer_side(
    audit: AuditLog,
    made: list[AuditEntry],
    batch: int,
    prof: cProfile.Profile | None = None,
) -> float:
    """µs of CPU per record of :meth:`AuditLog.flush` in batches of ``batch``."""
    observers, audit.observers = audit.observers, []  # seen on the loop's side, not here
    try:
        for e in made[:batch]:  # warm: the connection, the statement cache
            audit.record(e)
        audit.flush()
        spent, written = 0.0, 0
        for start in range(0, len(made), batch):
            for e in made[start : start + batch]:
                audit.record(e)
            if prof is not None:
                prof.enable()
            t0 = time.process_time()
            written += audit.flush()
            spent += time.process_time() - t0
            if prof is not None:
                prof.disable()
    finally:
        audit.observers = observers
    if written != len(made):
        raise SystemExit(f"{written} records written of {len(made)}")
    return spent / written * 1e6


def _profile(label: str, work: Callable[[cProfile.Profile], object]) -> None:
    """cProfile's top functions (by CPU, not wall time: a commit's fsync is not ours) of ``work``'s
    timed sections."""
    prof = cProfile.Profile(time.process_time)
    work(prof)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    print(f"--- cProfile, {label} (CPU, sorted by own time) ---")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--requests", type=int, default=40_000, help="requests (and records) per run")
    ap.add_argument("--batch", type=int, default=1000, help="records per flush (~0.2 s of reads at 5,000/s)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="print cProfile's top functions of each side")
    args = ap.parse_args()
    made = entries(args.requests)
    if args.profile:
        with _audit_log(args.db) as (audit, store):
            _profile("the loop's side (trail and trivial app)", lambda p: loop_side(audit, args.requests, p))
            _profile(f"the writer's side, {args.db}", lambda p: writer_side(audit, made, args.batch, p))
        return
    loops, writers = [], []
    for _ in range(args.repeat):
        with _audit_log(args.db) as (audit, store):
            loops.append(loop_side(audit, args.requests))
            writers.append(writer_side(audit, made, args.batch))
            verdict = verify_log(store, audit.public_key)
            if not verdict.ok:
                raise SystemExit(f"the chain does not verify: {verdict.reason}")
        print(
            f"{args.db}: loop {loops[-1]:.2f} µs per request, writer {writers[-1]:.2f} µs per record",
            flush=True,
        )
    print(
        f"{args.db}: loop best {min(loops):.2f}, median {statistics.median(loops):.2f} µs per request; "
        f"writer best {min(writers):.2f}, median {statistics.median(writers):.2f} µs per record "
        f"(batches of {args.batch})"
    )


if __name__ == "__main__":
    main()
