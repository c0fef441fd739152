"""Commands and security events in the database (SQLite and PostgreSQL), and ``cmdack`` ingest."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from iotvault.clock import now_us
from iotvault.commands.service import CommandService, effective_status
from iotvault.config import load_settings
from iotvault.context import Context, context
from iotvault.devices import delete_device, register_device
from iotvault.domain.commands import Ack
from iotvault.ingest.pipeline import Inbound, IngestPipeline, Outcome
from iotvault.metrics import Metrics
from iotvault.storage.repository import SecurityEvent

pytestmark = pytest.mark.integration


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> Iterator[Context]:
    settings = load_settings(
        environ={"IOTVAULT_DATA_DIR": str(tmp_path / "data"), "IOTVAULT_DATABASE_URL": database_url}
    )
    with context(settings) as c:
        yield c


def test_commands_are_numbered_per_device_and_survive_the_device(ctx: Context) -> None:
    register_device(ctx, "thermo", "a")
    register_device(ctx, "thermo", "b")
    service = CommandService(ctx)
    seqs: list[int] = []
    lock = threading.Lock()

    def send(device: str) -> None:
        out = service.prepare(device, "ping", {}, sent_by="test")
        if device == "a":
            with lock:
                seqs.append(out.record.seq)

    threads = [threading.Thread(target=send, args=("a",)) for _ in range(16)]
    threads += [threading.Thread(target=send, args=("b",))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(1, 17))  # concurrent senders never share a number
    delete_device(ctx, "a")
    register_device(ctx, "thermo", "a")  # the same id again: its counter goes on rising
    assert service.prepare("a", "ping", {}, sent_by="test").record.seq == 17


async def test_cmdack_updates_its_command_in_the_batch_and_nothing_else(ctx: Context) -> None:
    register_device(ctx, "thermo", "a")
    register_device(ctx, "thermo", "b")
    service = CommandService(ctx)
    first = service.prepare("a", "open", {"x": 1}, sent_by="user:bob").record
    second = service.prepare("a", "open", {"x": 2}, sent_by="user:bob").record
    expired = service.prepare("a", "open", {"x": 3}, sent_by="user:bob", expires_in_s=1).record

    def ack(device: str, body: Ack | bytes) -> Inbound:
        payload = body if isinstance(body, bytes) else json.dumps(body.to_json()).encode()
        return Inbound(f"iot-2/type/thermo/id/{device}/evt/cmdack/fmt/json", payload, 1, False, None, device)

    async with IngestPipeline(ctx.store, ctx.keyring, Metrics(), batch_ms=50) as pipeline:
        outcomes = await asyncio.gather(
            pipeline.submit(ack("b", Ack(first.command_id, True))),  # another device: not applied
            pipeline.submit(ack("a", Ack(first.command_id, True, result={"ok": 1}))),
            pipeline.submit(ack("a", Ack(first.command_id, False, "replayed"))),  # a second answer
            pipeline.submit(ack("a", Ack(second.command_id, False, "bad_signature", verified=False))),
            pipeline.submit(ack("a", Ack(None, False, "unsigned", verified=False))),
            pipeline.submit(ack("a", b'{"status": "done"}')),
            pipeline.submit(
                Inbound("iot-2/type/thermo/id/a/evt/reading/fmt/json", b'{"t": 1}', 1, False, None, "a")
            ),
        )
    assert outcomes == [Outcome.COMMAND_ACK] * 5 + [Outcome.REJECTED, Outcome.STORED]
    assert ctx.store.get_command("a", first.command_id).status == "acknowledged"  # type: ignore[union-attr]
    # an unverified refusal does not touch the command it names
    assert ctx.store.get_command("a", second.command_id).status == "sent"  # type: ignore[union-attr]
    assert ctx.store.get_command("b", first.command_id) is None
    assert ctx.store.count_events("a") == 1  # answers are not events
    assert ctx.store.rejected_counts() == {"bad_command_ack": 1}
    events = [e for e in ctx.store.list_security_events() if e.kind != "command"]
    summary = sorted((e.kind, e.subject, e.detail["reason"], e.detail["matched"]) for e in events)
    assert summary == sorted(
        [
            ("command_ack_unmatched", "b", None, False),
            ("command_rejected", "a", "replayed", False),
            ("command_rejected", "a", "bad_signature", False),
            ("command_rejected", "a", "unsigned", False),
        ]
    )
    audit = ctx.store.list_security_events(kinds=["command"])
    assert {e.subject for e in audit} == {"user:bob"}
    assert len(audit) == 3
    record = ctx.store.get_command("a", expired.command_id)
    assert record is not None
    assert effective_status(record, now_us()) == "sent"
    assert effective_status(record, record.expires_us + 1) == "expired"


def test_security_events_round_trip(ctx: Context) -> None:
    ctx.store.add_security_events(
        [SecurityEvent(now_us(), "login_failed", "x" * 500, {"address": "10.0.0.1:1", "n": 1})]
    )
    (e,) = ctx.store.list_security_events(kinds=["login_failed"])
    assert e.subject == "x" * 128
    assert e.detail == {"address": "10.0.0.1:1", "n": 1}
    assert ctx.store.list_security_events(kinds=["nothing"]) == []
    assert isinstance(e.id, int)


async def test_send_message_follows_the_devices_delivery_setting(ctx: Context) -> None:
    """The path an MQTT application client takes (bytes in a format): unsigned devices get the
    bytes as they are, on the format's topic; signed ones only a JSON object, signed."""
    from iotvault.devices import set_command_delivery  # noqa: PLC0415
    from iotvault.domain.commands import Delivery  # noqa: PLC0415
    from iotvault.errors import ValidationError  # noqa: PLC0415

    register_device(ctx, "rpi", "raw-1")
    register_device(ctx, "rpi", "sig-1")
    set_command_delivery(ctx, "raw-1", Delivery.UNSIGNED)
    published: list[tuple[str, bytes]] = []

    async def publish(topic: str, payload: bytes) -> None:
        published.append((topic, payload))

    service = CommandService(ctx, publish)
    record = await service.send_message("raw-1", "reboot", "text", b"now \xff", sent_by="app:a1")
    assert published[-1] == ("iot-2/type/rpi/id/raw-1/cmd/reboot/fmt/text", b"now \xff")
    assert (record.status, record.delivery) == ("delivered", "unsigned")
    stored = ctx.store.get_command("raw-1", record.command_id)
    assert stored is not None
    assert (stored.status, stored.delivery) == ("delivered", "unsigned")

    record = await service.send_message("sig-1", "setInterval", "json", b'{"s": 5}', sent_by="app:a1")
    topic, payload = published[-1]
    assert topic == "iot-2/type/rpi/id/sig-1/cmd/setInterval/fmt/json"
    assert set(json.loads(payload)) == {"jws"}
    assert (record.status, record.delivery) == ("sent", "signed")
    for fmt, body in (("text", b"now"), ("json", b"[1]"), ("json", b"{not json"), ("bad/fmt", b"{}")):
        with pytest.raises(ValidationError):
            await service.send_message("sig-1", "x", fmt, body, sent_by="app:a1")
    with pytest.raises(ValidationError):  # a format must be a topic level
        await service.send_message("raw-1", "x", "a/b", b"1", sent_by="app:a1")
    with pytest.raises(ValidationError):  # the same size limit as signed commands
        await service.send_message("raw-1", "x", "bin", b"x" * (16 * 1024 + 1), sent_by="app:a1")
    assert len(published) == 2
