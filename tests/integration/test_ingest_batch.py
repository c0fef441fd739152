"""One ingest batch, in process, on a real database: every message's own outcome, in order.

The writer works a topic out once per batch (device, type, format, data key) and then checks
each later message on it only for what is its own (size, JSON); these tests hold it to the
same answers message by message, and to nothing kept from one batch to the next.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

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
