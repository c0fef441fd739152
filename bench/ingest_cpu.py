"""CPU per event of ingest's own work, in process: the pipeline and its writer, no broker.

``python -m bench.ingest_cpu [--db sqlite|postgres] [--events N] [--devices D]`` registers D
devices in a fresh database, then feeds N QoS 1 event messages (~140-byte JSON, as
``bench/publisher.py`` sends) to :meth:`IngestPipeline.enqueue` the way the gmqtt subscriber
does — a callback per message, a window of messages in flight — and prints the process's CPU
time (every thread: the event loop and the writer) per event, and the writer's ``_commit``
alone. What the ack-only baseline does not do is exactly this work, so its CPU per event is
the gap between iotvault and the baseline in ``python -m bench``, without the broker,
publishers and scheduler noise of a shared machine. Each run is repeated (``--repeat``) and
the best and the median are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from iotvault.config import load_settings
from iotvault.context import context
from iotvault.devices import register_device
from iotvault.ingest.pipeline import Inbound, IngestPipeline
from iotvault.metrics import Metrics
from iotvault.node import loop_factory, tune_gc_for_serving

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _messages(devices: list[str], n: int) -> list[Inbound]:
    out = []
    for i in range(n):
        d = devices[i % len(devices)]
        reading = {"temp": 20.5 + i % 10, "humidity": 40 + i % 7, "seq": i, "status": "ok"}
        payload = json.dumps({"d": reading, "ts": 1_700_000_000 + i}).encode()
        topic = f"iot-2/type/bench/id/{d}/evt/reading/fmt/json"
        out.append(Inbound(topic, payload, 1, False, i % 65535 + 1, "sub"))
    return out


async def _feed(pipeline: IngestPipeline, msgs: list[Inbound], window: int) -> None:
    """Feed ``msgs`` with at most ``window`` unanswered, and wait for every answer."""
    done = asyncio.Event()
    state = {"open": 0, "answered": 0}
    it = iter(msgs)
    slot = asyncio.Event()

    def answered(_fut: asyncio.Future[Any]) -> None:
        state["open"] -= 1
        state["answered"] += 1
        slot.set()
        if state["answered"] == len(msgs):
            done.set()

    for m in it:
        while state["open"] >= window:
            slot.clear()
            await slot.wait()
        state["open"] += 1
        pipeline.enqueue(m).add_done_callback(answered)
        if state["open"] % 64 == 0:
            await asyncio.sleep(0)  # let the loop run, as gmqtt's reads do
    await done.wait()


def _run_once(url: str, data_dir: Path, args: argparse.Namespace) -> tuple[float, float]:
    """One run on a fresh database: (process CPU, ``_commit`` CPU) per measured event, in µs."""
    n, devices, window = args.events, args.devices, args.window
    settings = load_settings(environ={"IOTVAULT_DATA_DIR": str(data_dir), "IOTVAULT_DATABASE_URL": url})
    with context(settings) as ctx:
        ids = [f"dev-{i:04d}" for i in range(devices)]
        for d in ids:
            register_device(ctx, "bench", d)
        msgs = _messages(ids, n)
        pipeline = IngestPipeline(ctx.store, ctx.keyring, Metrics(), batch_size=args.batch_size, batch_ms=5.0)
        commit_cpu = [0.0]
        inner = pipeline._commit

        def timed(batch: list[Any], retry: bool = False) -> list[Any]:
            t = time.thread_time()
            try:
                return inner(batch, retry)
            finally:
                commit_cpu[0] += time.thread_time() - t

        pipeline._commit = timed  # type: ignore[method-assign]

        async def main() -> float:
            async with pipeline:  # the process's CPU time of the measured part
                # warm the caches (device types, keys, topics) as a running node has them
                await _feed(pipeline, msgs[: devices * 2], window)
                commit_cpu[0] = 0.0
                t0 = time.process_time()
                await _feed(pipeline, msgs[devices * 2 :], window)
                return time.process_time() - t0

        tune_gc_for_serving()  # as `iotvault serve` does, with its event loop
        with asyncio.Runner(loop_factory=loop_factory(settings)) as runner:
            total = runner.run(main())
        measured = n - devices * 2
        if ctx.store.count_events() != n:
            raise SystemExit("not every event was stored")
    return total / measured * 1e6, commit_cpu[0] / measured * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--window", type=int, default=5000, help="messages in flight (the receive maximum)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=500, help="the setting ingest_batch_size")
    args = ap.parse_args()
    totals, commits = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            if args.db == "sqlite":
                url = f"sqlite:///{tmp}/iotvault.db"
                total, commit = _run_once(url, Path(tmp), args)
            else:
                name = f"iotvault_cpu_{uuid.uuid4().hex[:10]}"
                with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')
                try:
                    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
                    total, commit = _run_once(url, Path(tmp), args)
                finally:
                    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        totals.append(total)
        commits.append(commit)
        print(f"{args.db}: {total:.1f} µs CPU per event (process), _commit {commit:.1f} µs", flush=True)
    print(
        f"{args.db}: best {min(totals):.1f} µs, median {statistics.median(totals):.1f} µs per event; "
        f"_commit best {min(commits):.1f}, median {statistics.median(commits):.1f} µs"
    )


if __name__ == "__main__":
    main()
