"""The writer takes the next batch itself, and a failed batch still holds the later ones back.

A batch cut while the writer commits the one before waits in a hand-over slot; the writer takes
it the moment that commit ends, without the event loop (which, busy with incoming messages,
had taken milliseconds to start each commit). These tests block the event loop to prove the
hand-over does not need it, and check that commits stay in order and that a failed batch (an
outage, retried; a bug, failed) neither loses nor reorders the batches behind it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iotvault.config import load_settings
from iotvault.context import Context, context
from iotvault.devices import register_device
from iotvault.errors import DatabaseUnavailableError
from iotvault.ingest.pipeline import Inbound, IngestFailedError, IngestPipeline, Outcome
from iotvault.metrics import Metrics
from iotvault.storage.repository import BatchWrite

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOPIC = "iot-2/type/thermo/id/d1/evt/reading/fmt/json"
BATCH = 5


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> Iterator[Context]:
    settings = load_settings(
        environ={"IOTVAULT_DATA_DIR": str(tmp_path / "data"), "IOTVAULT_DATABASE_URL": database_url}
    )
    with context(settings) as c:
        register_device(c, "thermo", "d1")
        yield c


class _Writes:
    """Wraps the store's ``write_batch``: when each started, and what the first attempts do."""

    def __init__(self, ctx: Context, first: list[str]) -> None:
        self.started: list[float] = []
        self.began = threading.Event()
        self.sizes: list[int] = []
        self.firsts: list[str] = []  # each write's first event id: which batch it was
        self.first = list(first)  # per attempt, in order: "slow", "outage", "bug"; then plain
        self._write = ctx.store.write_batch

    def __call__(self, batch: BatchWrite) -> None:
        self.started.append(time.monotonic())
        self.began.set()
        self.sizes.append(len(batch.events))
        self.firsts.append(batch.events[0].event_id if batch.events else "")
        what = self.first.pop(0) if self.first else ""
        if what == "slow":
            time.sleep(0.4)  # the writer thread busy: the next batch is cut meanwhile
        elif what == "outage":
            time.sleep(0.2)
            raise DatabaseUnavailableError("db", "gone for a moment")
        elif what == "bug":
            time.sleep(0.2)
            raise ValueError("a bug in the write")
        self._write(batch)


def _msgs(start: int, n: int = BATCH) -> list[Inbound]:
    return [Inbound(TOPIC, b'{"n": %d}' % i, 1, False, i, "sub-1") for i in range(start, start + n)]


async def _handed_over(pipeline: IngestPipeline) -> None:
    """Until a cut batch waits for the busy writer (a loaded machine can take a while)."""
    for _ in range(1000):
        if pipeline._ready:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the second batch was never handed over")


async def _two_batches(
    ctx: Context, monkeypatch: pytest.MonkeyPatch, first: list[str]
) -> tuple[_Writes, list[Any], list[Any], float]:
    """Batch A (its commit held up as ``first`` says), then batch B cut while A commits.

    The event loop is then blocked for 0.6 s; returns the writes, both batches' results and
    when the block ended.
    """
    writes = _Writes(ctx, first)
    monkeypatch.setattr(ctx.store, "write_batch", writes)
    async with IngestPipeline(ctx.store, ctx.keyring, Metrics(), batch_size=BATCH, batch_ms=1.0) as pipeline:
        a = [pipeline.enqueue(m) for m in _msgs(1)]
        assert await asyncio.to_thread(writes.began.wait, 10)  # A is in the writer
        b = [pipeline.enqueue(m) for m in _msgs(100)]
        await _handed_over(pipeline)  # B is cut and waits for the writer while A commits
        time.sleep(0.6)  # noqa: ASYNC251 - the event loop blocked on purpose
        unblocked = time.monotonic()
        results_a = await asyncio.gather(*a, return_exceptions=True)
        results_b = await asyncio.gather(*b, return_exceptions=True)
    return writes, results_a, results_b, unblocked


async def test_the_writer_takes_the_next_batch_without_the_event_loop(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes, results_a, results_b, unblocked = await _two_batches(ctx, monkeypatch, ["slow"])
    assert writes.sizes == [BATCH, BATCH]
    # B's commit began while the event loop was still blocked: the writer took it itself
    assert writes.started[1] < unblocked
    assert results_a == [Outcome.STORED] * BATCH
    assert results_b == [Outcome.STORED] * BATCH
    assert len(ctx.store.events_page("d1", count=100, after="0")) == 2 * BATCH


async def test_an_outage_retries_its_batch_before_the_next_one_is_written(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes, results_a, results_b, _ = await _two_batches(ctx, monkeypatch, ["outage"])
    # A failed, A again (with the ids of its first attempt), then B: never B before A's retry
    assert writes.sizes == [BATCH, BATCH, BATCH]
    assert writes.firsts[0] == writes.firsts[1] < writes.firsts[2]
    assert results_a == [Outcome.STORED] * BATCH
    assert results_b == [Outcome.STORED] * BATCH
    page = ctx.store.events_page("d1", count=100, after="0")
    assert len(page) == 2 * BATCH  # each once, A's before B's
    assert [e.event_id for e in page] == sorted(e.event_id for e in page)


async def test_a_failed_batch_is_not_acknowledged_and_the_next_one_still_commits(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes, results_a, results_b, _ = await _two_batches(ctx, monkeypatch, ["bug"])
    assert writes.sizes == [BATCH, BATCH]
    assert all(isinstance(r, IngestFailedError) for r in results_a)  # not acknowledged
    assert results_b == [Outcome.STORED] * BATCH
    assert len(ctx.store.events_page("d1", count=100, after="0")) == BATCH


async def test_a_shutdown_leaves_no_message_unanswered_even_one_waiting_for_room(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches B and C wait for the busy writer, D waits for room behind them: at shutdown
    every message not committed gets its answer (cancelled: not acknowledged), none hangs."""
    writes = _Writes(ctx, ["slow"])
    monkeypatch.setattr(ctx.store, "write_batch", writes)
    futures = []
    async with IngestPipeline(ctx.store, ctx.keyring, Metrics(), batch_size=BATCH, batch_ms=1.0) as pipeline:
        futures += [pipeline.enqueue(m) for m in _msgs(1)]
        assert await asyncio.to_thread(writes.began.wait, 10)  # A is in the writer
        for start in (100, 200, 300):  # B, C and D
            futures += [pipeline.enqueue(m) for m in _msgs(start)]
            await asyncio.sleep(0.02)
        for _ in range(200):
            if not pipeline._pending:  # D is cut too
                break
            await asyncio.sleep(0.005)
        assert len(pipeline._ready) == 2  # B and C; D waits for room
    assert all(f.done() for f in futures)
    # A was being committed: answered if its commit ended before the shutdown, else cancelled
    assert all(f.cancelled() or f.result() == Outcome.STORED for f in futures[:BATCH])
    assert all(f.cancelled() for f in futures[BATCH:])
