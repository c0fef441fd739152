"""Readiness: what ``/readyz`` answers, from what this node actually depends on right now.

``/healthz`` is liveness (the process answers); ``/readyz`` says whether this node can do its
work, so that a load balancer or an orchestrator routes around it while it cannot. A node is
not ready while it is starting or stopping, and while any of these fails:

* ``database``: a ``SELECT 1`` (every :data:`PROBE_INTERVAL_S`, bounded by
  :data:`PROBE_TIMEOUT_S`) fails; for SQLite also when the file system holding the database
  is read-only or has less than :data:`MIN_FREE_BYTES` free — a query would still answer
  there, but nothing could be stored;
* ``ingest``: the ingest pipeline's commits are failing (it is paused, retrying a batch);
* ``broker …``: the connection to an external broker that feeds ingest is down.

The reasons are short and carry no secrets (database URLs are never shown). Recovery is seen
at the next probe, within :data:`PROBE_INTERVAL_S`, or at ingest's next successful commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

from sqlalchemy.engine import Engine

from iotvault.errors import DatabaseUnavailableError
from iotvault.ingest.pipeline import IngestPipeline
from iotvault.storage.db import check_connection, is_sqlite

log = logging.getLogger(__name__)

PROBE_INTERVAL_S: Final = 2.0
PROBE_TIMEOUT_S: Final = 5.0
MIN_FREE_BYTES: Final = 1024 * 1024  # below this, SQLite cannot be trusted to commit a batch
RETRY_AFTER_S: Final = 5  # what a 503 caused by a dependency tells the client


class Phase(StrEnum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


@dataclass(frozen=True, slots=True)
class Failing:
    """One dependency that keeps the node from being ready, and why (safe to show)."""

    dependency: str
    reason: str


def sqlite_space_problem(path: Path, min_free: int = MIN_FREE_BYTES) -> str | None:
    """Why a SQLite database at ``path`` cannot be written, judged from its file system."""
    try:
        st = os.statvfs(path.parent)
    except OSError as exc:
        return f"its directory is not reachable ({exc.strerror})"
    if st.f_flag & os.ST_RDONLY:
        return "read-only file system"
    free = st.f_bavail * st.f_frsize
    if free < min_free:
        return f"disk full ({free // 1024} KiB free)"
    return None


class Readiness:
    """The node's phase plus a periodic probe of the database; read by ``/readyz``."""

    def __init__(
        self,
        engine: Engine,
        url: str,
        *,
        pipeline: IngestPipeline | None = None,
        interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        self.phase = Phase.STARTING
        self._engine = engine
        self._url = url
        self._pipeline = pipeline
        self._interval_s = interval_s
        self._sqlite_path = Path(engine.url.database or "") if is_sqlite(engine) else None
        self._database: str | None = None  # the probe's last finding
        self._task: asyncio.Task[None] | None = None
        self._probing: asyncio.Future[str | None] | None = None

    def failing(self) -> list[Failing]:
        """Every dependency that fails now: empty means ready (in the ``ready`` phase)."""
        found: list[Failing] = []
        if self.phase is not Phase.READY:
            found.append(Failing("node", self.phase.value))
        if self._database is not None:
            found.append(Failing("database", self._database))
        p = self._pipeline
        if p is not None:
            if p.trouble is not None:
                found.append(Failing("ingest", f"paused: commits are failing ({p.trouble})"))
            found.extend(Failing(name, "disconnected") for name, up in p.feeds.items() if not up())
        return found

    def _probe(self) -> str | None:
        try:
            check_connection(self._engine, self._url)
        except DatabaseUnavailableError as exc:
            return f"unreachable ({exc.reason})"
        if self._sqlite_path is not None:
            return sqlite_space_problem(self._sqlite_path)
        return None

    async def probe_once(self) -> None:
        if self._probing is None or self._probing.done():  # a stuck probe is not started twice
            self._probing = asyncio.ensure_future(asyncio.to_thread(self._probe))
        try:
            self._database = await asyncio.wait_for(asyncio.shield(self._probing), PROBE_TIMEOUT_S)
        except TimeoutError:
            self._database = f"not answering within {PROBE_TIMEOUT_S:.0f}s"
        except Exception as exc:  # noqa: BLE001 - a probe that fails says so; it never ends the loop
            self._database = f"probe failed ({type(exc).__name__})"

    async def _run(self) -> None:
        was: list[Failing] = []
        while True:
            await self.probe_once()
            now = [f for f in self.failing() if f.dependency != "node"]
            if now != was:
                if now:
                    log.warning("not ready: %s", "; ".join(f"{f.dependency}: {f.reason}" for f in now))
                else:
                    log.info("ready again: every dependency answers")
                was = now
            await asyncio.sleep(self._interval_s)

    async def __aenter__(self) -> Readiness:
        await self.probe_once()
        self._task = asyncio.create_task(self._run(), name="iotvault-readiness")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.phase = Phase.STOPPING
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


ReadyCheck = Callable[[], list[Failing]]
