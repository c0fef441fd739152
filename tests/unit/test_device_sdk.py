"""The device SDK without a broker: verification, replay protection across restarts, answers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from iotvault.crypto.signing import CommandSigningKey, b64url
from iotvault.device import Command, CommandProcessor, CommandRejectedError, CommandVerifier, ReplayGuard
from iotvault.domain.commands import (
    Ack,
    CommandDocument,
    command_message,
    parse_command_ack,
    read_command_message,
)
from iotvault.errors import ValidationError

KEY = CommandSigningKey.from_seed(b"\x07" * 32)
NOW_MS = 1_800_000_000_000
TOPIC = "iot-2/type/thermo/id/dev-1/cmd/open/fmt/json"


def make(
    seq: int = 1,
    *,
    command: str = "open",
    device: str = "dev-1",
    issued: int = NOW_MS,
    lifetime_ms: int = 60_000,
    nonce: str | None = None,
    key: CommandSigningKey = KEY,
    **overrides: Any,
) -> tuple[str, bytes]:
    doc = CommandDocument(
        command_id=str(uuid.uuid4()),
        device_id=device,
        type_id="thermo",
        command=command,
        payload={"door": seq},
        issued_ms=issued,
        expires_ms=issued + lifetime_ms,
        nonce=nonce or b64url(uuid.uuid4().bytes),
        seq=seq,
    ).to_json()
    doc.update(overrides)
    return str(doc["commandId"]), command_message(key.sign(doc))


def verifier(clock_ms: int = NOW_MS) -> CommandVerifier:
    return CommandVerifier(KEY.public, "dev-1", type_id="thermo", clock=lambda: clock_ms / 1000)


def reason_of(fn: Callable[[], object]) -> str:
    with pytest.raises(CommandRejectedError) as info:
        fn()
    return info.value.reason


def test_a_genuine_command_verifies() -> None:
    cid, msg = make(seq=7)
    cmd = verifier().verify(TOPIC, msg)
    assert (cmd.command_id, cmd.name, dict(cmd.payload), cmd.seq) == (cid, "open", {"door": 7}, 7)


def test_what_the_verifier_refuses() -> None:
    v = verifier()
    _cid, good = make()
    other = CommandSigningKey.generate()
    assert reason_of(lambda: v.verify(TOPIC, b'{"command": "open"}')) == "unsigned"
    assert reason_of(lambda: v.verify(TOPIC, b"not json")) == "unsigned"
    assert reason_of(lambda: v.verify(TOPIC, make(key=other)[1])) == "unknown_key"
    jws = json.loads(good)["jws"]
    head, body, sig = jws.split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    assert reason_of(lambda: v.verify(TOPIC, command_message(f"{head}.{body}.{flipped}"))) == "bad_signature"
    assert reason_of(lambda: v.verify(TOPIC, make(device="dev-2")[1])) == "wrong_device"
    assert reason_of(lambda: v.verify(TOPIC.replace("open", "close"), good)) == "wrong_topic"
    assert reason_of(lambda: v.verify("iot-2/type/thermo/id/dev-2/cmd/open/fmt/json", good)) == "wrong_topic"
    assert reason_of(lambda: v.verify(TOPIC.replace("fmt/json", "fmt/text"), good)) == "wrong_topic"
    expired = make(issued=NOW_MS - 120_000, lifetime_ms=60_000)[1]
    assert reason_of(lambda: v.verify(TOPIC, expired)) == "expired"
    future = make(issued=NOW_MS + 600_000)[1]
    assert reason_of(lambda: v.verify(TOPIC, future)) == "not_yet_valid"
    assert v.verify(TOPIC, make(issued=NOW_MS + 60_000)[1]).seq == 1  # within the clock skew
    for bad in (
        {"v": 2},
        {"seq": 0},
        {"payload": [1]},
        {"commandId": "x"},
        {"nonce": "short"},
        {"deviceId": "a/b"},
    ):
        assert reason_of(lambda bad=bad: v.verify(None, make(**bad)[1])) == "malformed", bad  # type: ignore[misc]
    # the refusal names the claimed command, unverified, so the platform can report it
    with pytest.raises(CommandRejectedError) as info:
        v.verify(TOPIC, make(key=other)[1])
    assert info.value.command_id is not None


def test_two_trusted_keys_while_the_platform_key_is_replaced() -> None:
    new = CommandSigningKey.generate()
    v = CommandVerifier([KEY.public, new.public], "dev-1", clock=lambda: NOW_MS / 1000)
    assert v.verify(None, make(key=new)[1]).seq == 1
    assert v.verify(None, make()[1]).seq == 1


def cmd(seq: int, nonce: str | None = None, expires: int = NOW_MS + 60_000) -> Command:
    return Command(
        str(uuid.uuid4()), "open", {}, "dev-1", "thermo", NOW_MS, expires, seq, nonce or uuid.uuid4().hex
    )


def test_replay_window_and_nonces(tmp_path: Path) -> None:
    guard = ReplayGuard(tmp_path / "state.json", "dev-1", window=4)
    guard.accept(cmd(5), NOW_MS)
    assert reason_of(lambda: guard.accept(cmd(5), NOW_MS)) == "replayed"  # same seq
    guard.accept(cmd(3), NOW_MS)  # late, but inside the window and unseen
    assert reason_of(lambda: guard.accept(cmd(3), NOW_MS)) == "replayed"
    assert reason_of(lambda: guard.accept(cmd(1), NOW_MS)) == "replayed"  # below the window
    n = "same-nonce"
    guard.accept(cmd(6, n), NOW_MS)
    assert reason_of(lambda: guard.accept(cmd(7, n), NOW_MS)) == "replayed"
    guard.accept(cmd(100), NOW_MS)
    assert reason_of(lambda: guard.accept(cmd(96), NOW_MS)) == "replayed"
    guard.accept(cmd(97), NOW_MS)

    # a restart: a new guard on the same file remembers all of it
    again = ReplayGuard(tmp_path / "state.json", "dev-1", window=4)
    assert again.max_seq == 100
    for seq in (100, 97, 5):
        assert reason_of(lambda seq=seq: again.accept(cmd(seq), NOW_MS)) == "replayed"  # type: ignore[misc]
    assert reason_of(lambda: again.accept(cmd(8, n), NOW_MS)) == "replayed"
    again.accept(cmd(101), NOW_MS)
    assert (tmp_path / "state.json").stat().st_mode & 0o777 == 0o600


def test_state_file_belongs_to_one_device_and_must_be_readable(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    ReplayGuard(path, "dev-1").accept(cmd(1), NOW_MS)
    with pytest.raises(ValidationError, match="belongs to device 'dev-1'"):
        ReplayGuard(path, "dev-2")
    path.write_text("{broken")
    with pytest.raises(ValidationError, match="cannot be read"):
        ReplayGuard(path, "dev-1")


def test_an_unwritable_state_refuses_rather_than_risking_a_second_run(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    guard = ReplayGuard(blocker / "state.json", "dev-1")
    blocker.write_text("")  # the state's directory is now a file: nothing can be saved
    assert reason_of(lambda: guard.accept(cmd(1), NOW_MS)) == "state_unavailable"
    assert guard.max_seq == 0  # nothing remembered that was not saved


async def test_processor_answers_everything() -> None:
    ran: list[str] = []

    async def handler(command: Command) -> dict[str, Any] | None:
        if command.payload.get("door") == 2:
            raise CommandRejectedError("door_jammed")
        if command.payload.get("door") == 3:
            raise RuntimeError("secret internals")
        ran.append(command.command_id)
        return {"opened": True}

    p = CommandProcessor(verifier(), ReplayGuard(None, "dev-1"), handler)
    cid, msg = make(seq=1)
    ack = await p.process(TOPIC, msg)
    assert ack == Ack(cid, True, result={"opened": True})
    assert (await p.process(TOPIC, msg)).reason == "replayed"
    assert (await p.process(TOPIC, make(seq=2)[1])).reason == "door_jammed"
    failed = await p.process(TOPIC, make(seq=3)[1])
    assert failed.reason == "handler_failed"
    assert "secret" not in json.dumps(failed.to_json())
    forged = await p.process(TOPIC, make(seq=4, key=CommandSigningKey.generate())[1])
    assert forged.to_json()["verified"] is False
    assert forged.reason == "unknown_key"
    assert ran == [cid]
    assert (p.accepted, p.rejected) == (1, 4)
    unsupported = CommandProcessor(verifier(), ReplayGuard(None, "dev-1"), None)
    assert (await unsupported.process(TOPIC, make()[1])).reason == "unsupported"
    with pytest.raises(ValueError, match="different devices"):
        CommandProcessor(verifier(), ReplayGuard(None, "dev-2"))


def test_acks_as_the_platform_reads_them() -> None:
    cid = str(uuid.uuid4())

    def parse(doc: object) -> Any:
        return parse_command_ack(json.dumps(doc).encode())

    assert parse(Ack(cid, True, result={"a": 1}).to_json()).status == "acknowledged"
    rejected = parse(Ack(cid, False, "door_jammed").to_json())
    assert (rejected.status, rejected.reason, rejected.verified) == ("rejected", "door_jammed", True)
    assert parse(Ack(cid, False, "expired").to_json()).status == "expired"
    forged = parse(Ack(cid, False, "bad_signature", verified=False).to_json())
    assert forged.verified is False
    anonymous = parse(Ack(None, False, "unsigned", verified=False).to_json())
    assert (anonymous.command_id, anonymous.verified) == ("", False)
    assert parse(Ack(cid, False, "<script>\n").to_json()).reason == "unspecified"
    for bad in ({"status": "maybe"}, {"status": "accepted", "commandId": "not-a-uuid"}, [1], "x"):
        assert parse(bad) is None
    assert parse_command_ack(b"{not json") is None


def test_reading_a_command_message_never_trusts_it() -> None:
    cid, msg = make()
    assert read_command_message(msg) == (json.loads(msg)["jws"], cid)
    assert read_command_message(b'{"commandId": "nope"}') == (None, None)
    assert read_command_message(b"[]") == (None, None)
