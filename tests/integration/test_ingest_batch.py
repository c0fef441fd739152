"""One ingest batch, in process, on a real database: every message's own outcome, in order.

The writer works a topic out once per batch (device, type, format, data key) and then checks
each later message on it only for what is its own (size, JSON); these tests hold it to the
same answers message by message, and to nothing kept from one batch to the next.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iotvault.config import load_settings
from iotvault.context import Context, context
from iotvault.crypto.cipher import record_key_version
from iotvault.devices import delete_device, register_device
from iotvault.domain.ids import event_id_millis
from iotvault.ingest.pipeline import Inbound, IngestPipeline, Outcome
from iotvault.metrics import Metrics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOPIC = "iot-2/type/thermo/id/{}/evt/reading/fmt/json"


def _msg(device: str, payload: bytes, packet_id: int, *, dup: bool = False, topic: str = TOPIC) -> Inbound:
    return Inbound(topic.format(device), payload, 1, dup, packet_id, "sub-1")


async def _one_batch(pipeline: IngestPipeline, msgs: list[Inbound]) -> list[Outcome]:
    """Submit together: with a long batch_ms they are one batch (the writer's one pass)."""
    return list(await asyncio.gather(*(pipeline.submit(m) for m in msgs)))


def _decrypted(ctx: Context, device: str) -> list[dict[str, object]]:
    page = ctx.store.events_page(device, count=1000, after="0")
    return [json.loads(ctx.keyring.decrypt(device, e.event_id, e.payload)) for e in page]


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> Context:
    settings = load_settings(
        environ={"IOTVAULT_DATA_DIR": str(tmp_path / "data"), "IOTVAULT_DATABASE_URL": database_url}
    )
    with context(settings) as c:
        register_device(c, "thermo", "d1")
        register_device(c, "thermo", "d2")
        yield c


async def test_each_message_of_a_topic_is_judged_on_its_own_in_one_batch(ctx: Context) -> None:
    big = b'{"v": "' + b"x" * 70_000 + b'"}'
    msgs = [
        _msg("d1", b'{"n": 1}', 1),
        _msg("d1", b"{not json", 2),  # same topic, after it was found good
        _msg("d1", big, 3),  # too large, same topic
        _msg("d2", b'{"n": 2}', 4),
        _msg("d1", b'{"n": 3}', 5),
        _msg("nobody", b'{"n": 4}', 6),  # unknown device
        _msg("d1", b"[1, 2", 7),
        _msg("d2", b'{"n": 5}', 8, topic="iot-2/type/other/id/{}/evt/reading/fmt/json"),  # wrong type
        _msg("d1", b'{"n": 6}', 9),
        _msg("d2", b"[]", 10),
    ]
    async with IngestPipeline(ctx.store, ctx.keyring, Metrics(), batch_ms=300) as pipeline:
        outcomes = await _one_batch(pipeline, msgs)
        # a redelivery of a stored message in the next batch is recognised, a new one is not
        again = await _one_batch(
            pipeline, [_msg("d1", b'{"n": 3}', 5, dup=True), _msg("d1", b'{"n": 7}', 11)]
        )
    s, r = Outcome.STORED, Outcome.REJECTED
    assert outcomes == [s, r, r, s, s, r, r, r, s, s]
    assert again == [Outcome.DUPLICATE, s]
    assert _decrypted(ctx, "d1") == [{"n": 1}, {"n": 3}, {"n": 6}, {"n": 7}]
    assert _decrypted(ctx, "d2") == [{"n": 2}, []]
    reasons = sorted(r.reason for r in ctx.store.list_rejected())
    assert reasons == ["invalid_json", "invalid_json", "too_large", "type_mismatch", "unknown_device"]
    # ids in arrival order, each carrying the stored receive time
    page = ctx.store.events_page("d1", count=1000, after="0")
    assert [e.event_id for e in page] == sorted(e.event_id for e in page)
    assert all(e.received_us == event_id_millis(e.event_id) * 1000 for e in page)


async def test_nothing_of_a_batch_outlives_it_rotation_and_deletion(ctx: Context) -> None:
    async with IngestPipeline(ctx.store, ctx.keyring, Metrics(), batch_ms=100) as pipeline:
        first = await _one_batch(pipeline, [_msg("d1", b'{"n": 1}', 1), _msg("d2", b'{"n": 1}', 2)])
        ctx.keyring.rotate("d1")
        second = await _one_batch(pipeline, [_msg("d1", b'{"n": 2}', 3), _msg("d2", b'{"n": 2}', 4)])
        delete_device(ctx, "d2")
        pipeline.forget_devices(["d2"])  # what the node does on a deletion
        third = await _one_batch(pipeline, [_msg("d1", b'{"n": 3}', 5), _msg("d2", b'{"n": 3}', 6)])
    assert first == second == [Outcome.STORED, Outcome.STORED]
    assert third == [Outcome.STORED, Outcome.REJECTED]
    versions = [record_key_version(e.payload) for e in ctx.store.events_page("d1", count=10, after="0")]
    assert versions == [1, 2, 2]
    assert _decrypted(ctx, "d1") == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert ctx.store.count_events("d2") == 0


class Reads:
    """How often ingest asked the store for devices and keys, one by one and in bulk."""

    def __init__(self, ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: dict[str, int] = {}
        for name in ("get_device", "latest_data_key", "types_of", "latest_data_keys"):
            real = getattr(ctx.store, name)
            monkeypatch.setattr(ctx.store, name, self._counting(name, real))

    def _counting(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return real(*args, **kwargs)

        return call

    def take(self) -> dict[str, int]:
        calls, self.calls = self.calls, {}
        return calls


async def test_a_batchs_devices_and_keys_are_read_together_not_one_by_one(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each device's type and key used to be read on its own when its cache entry ran out: on
    PostgreSQL three round trips each, ~60 a second for 200 devices, most of the writer's wait."""
    many = [f"m{i:02d}" for i in range(40)]
    for d in many:
        register_device(ctx, "thermo", d)
    ctx.keyring.rotate("m07")  # a device with two keys is sealed with its newest
    reads = Reads(ctx, monkeypatch)
    msgs = [_msg(d, b'{"n": 1}', i + 1) for i, d in enumerate(many)] + [_msg("nobody", b"{}", 99)]
    async with IngestPipeline(ctx.store, ctx.keyring, Metrics(), batch_ms=300) as pipeline:
        first = await _one_batch(pipeline, msgs)
        calls = reads.take()
        again = await _one_batch(pipeline, [_msg(d, b'{"n": 2}', 100 + i) for i, d in enumerate(many)])
        calls_again = reads.take()
    assert first == [Outcome.STORED] * len(many) + [Outcome.REJECTED]
    assert again == [Outcome.STORED] * len(many)
    assert calls == {"types_of": 1, "latest_data_keys": 1}  # "nobody" has no key to ask for
    assert calls_again == {}  # all cached for their life
    versions = {d: record_key_version(ctx.store.events_page(d, count=1)[0].payload) for d in ("m06", "m07")}
    assert versions == {"m06": 1, "m07": 2}
    assert _decrypted(ctx, "m07") == [{"n": 1}, {"n": 2}]


def test_bulk_reads_of_types_and_keys_answer_as_the_single_reads(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    from iotvault.storage import devices as device_table  # noqa: PLC0415 - its chunk size, made small

    monkeypatch.setattr(device_table, "BULK_READ", 2)
    ctx.keyring.rotate("d2")
    ctx.keyring.rotate("d2")
    register_device(ctx, "valve", "d3")
    ids = ["d1", "d2", "d3", "ghost", "d1"]
    assert ctx.store.types_of(ids) == {"d1": "thermo", "d2": "thermo", "d3": "valve"}
    bulk = ctx.store.latest_data_keys(ids)
    assert set(bulk) == {"d1", "d2", "d3"}
    for d in ("d1", "d2", "d3"):
        assert bulk[d] == ctx.store.latest_data_key(d)
    assert bulk["d2"][0] == 3
    assert ctx.store.types_of([]) == {} == ctx.store.latest_data_keys([])


async def test_ids_no_one_registered_cannot_grow_the_device_cache_without_bound(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker without topic ACLs lets anyone publish for made-up device ids: each is refused,
    remembered for its life (no query per message), and the cache stays within its bound."""
    bound = 200  # of 100,000: made small

    def flood(round_: int) -> list[Inbound]:
        made_up = [_msg(f"ghost-{round_}-{i}", b'{"n": 0}', 1 + i) for i in range(150)]
        return [*made_up, _msg("d1", b'{"n": %d}' % round_, 1000 + round_)]

    async with IngestPipeline(ctx.store, ctx.keyring, Metrics(), batch_ms=300) as pipeline:
        pipeline._devices.max_entries = bound
        assert await _one_batch(pipeline, flood(0)) == [Outcome.REJECTED] * 150 + [Outcome.STORED]
        # the same made-up ids again, within their life: refused from the cache, no query
        reads = Reads(ctx, monkeypatch)
        again = await _one_batch(pipeline, [_msg(f"ghost-0-{i}", b"{}", 2000 + i) for i in range(150)])
        assert reads.take() == {}
        assert again == [Outcome.REJECTED] * 150
        sizes = [len(pipeline._devices.entries)]
        for round_ in range(1, 8):
            assert await _one_batch(pipeline, flood(round_)) == [Outcome.REJECTED] * 150 + [Outcome.STORED]
            sizes.append(len(pipeline._devices.entries))
    assert sizes[0] == 151  # nothing dropped below the bound
    assert max(sizes) <= bound  # 1,200 ids named, at most the bound held
    assert _decrypted(ctx, "d1") == [{"n": n} for n in range(8)]
