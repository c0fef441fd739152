"""Sending commands to devices, and what became of them.

``send`` numbers the command (the device's next ``seq``), signs it with the platform key,
records it (status ``sent``, who sent it, a digest of the payload) and an audit entry (a
security event of kind ``command``), and only then publishes it, QoS 1, on the device's
command topic. Recording first means a device's answer can never arrive before the row it
updates; if the broker does not take the message, the row says ``failed`` and the caller gets a
503. The device's ``cmdack`` moves the row to ``acknowledged``, ``rejected`` or ``expired``
(:mod:`iotvault.ingest.pipeline`, in the transaction of the batch that holds it); a command
still ``sent`` after its expiry reads as ``expired``.

The transport is a function ``publish(topic, payload)``: the embedded broker's
:meth:`~iotvault.broker.embedded.EmbeddedBroker.publish`, or an MQTT client with iotvault's own
broker account (:class:`iotvault.broker.publisher.CommandPublisher`).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from iotvault.clock import now_us
from iotvault.commands.keys import command_signing_key
from iotvault.crypto.master_key import MasterKey
from iotvault.crypto.signing import CommandPublicKey, CommandSigningKey
from iotvault.domain.commands import MAX_PAYLOAD_BYTES, CommandDocument, command_message
from iotvault.domain.encoding import b64url, canonical_json
from iotvault.domain.ids import check_identifier
from iotvault.domain.topics import CommandTopic
from iotvault.errors import (
    BrokerError,
    BrokerUnavailableError,
    CommandNotFoundError,
    DeviceNotFoundError,
    ValidationError,
)
from iotvault.storage.repository import CommandRecord, SecurityEvent
from iotvault.storage.sql import SqlStore

Publish = Callable[[str, bytes], Awaitable[None]]

MAX_EXPIRY_S = 7 * 86_400


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A recorded, signed command ready to publish."""

    record: CommandRecord
    topic: str
    message: bytes


def effective_status(record: CommandRecord, at_us: int) -> str:
    """The status to show: ``sent`` turns into ``expired`` once the command's time is up."""
    if record.status == "sent" and at_us > record.expires_us:
        return "expired"
    return record.status


class CommandResources(Protocol):
    """What the service uses (:class:`iotvault.context.Context` is one)."""

    @property
    def store(self) -> SqlStore: ...
    @property
    def master(self) -> MasterKey: ...


class CommandService:
    def __init__(
        self,
        ctx: CommandResources,
        publish: Publish | None = None,
        *,
        default_expiry_s: int = 300,
        publish_timeout_s: float = 10.0,
    ) -> None:
        self._ctx = ctx
        self._publish = publish
        self._default_expiry_s = default_expiry_s
        self._publish_timeout_s = publish_timeout_s
        self._key: CommandSigningKey | None = None
        self._key_lock = threading.Lock()

    @property
    def can_send(self) -> bool:
        return self._publish is not None

    def signing_key(self) -> CommandSigningKey:
        with self._key_lock:
            if self._key is None:
                self._key = command_signing_key(self._ctx.store, self._ctx.master)
            return self._key

    def public_key(self) -> CommandPublicKey:
        return self.signing_key().public

    # ---- sending ---------------------------------------------------------------------------
    def validate(
        self, command: str, payload: Mapping[str, Any], expires_in_s: int | None
    ) -> tuple[int, bytes]:
        """``(lifetime, canonical payload)``, or :class:`ValidationError` naming the field."""
        check_identifier("command", command)
        lifetime = self._default_expiry_s if expires_in_s is None else expires_in_s
        if not 1 <= lifetime <= MAX_EXPIRY_S:
            raise ValidationError("expiresInSeconds", f"must be between 1 and {MAX_EXPIRY_S}")
        if not isinstance(payload, Mapping):
            raise ValidationError("payload", "must be a JSON object")
        try:
            body = canonical_json(dict(payload))
        except ValueError as exc:
            raise ValidationError("payload", str(exc)) from None
        if len(body) > MAX_PAYLOAD_BYTES:
            raise ValidationError("payload", f"larger than {MAX_PAYLOAD_BYTES} bytes as JSON")
        return lifetime, body

    def prepare(
        self,
        device_id: str,
        command: str,
        payload: Mapping[str, Any],
        *,
        sent_by: str,
        expires_in_s: int | None = None,
    ) -> Outgoing:
        """Number, sign and record a command (blocking: database and signature)."""
        lifetime, body = self.validate(command, payload, expires_in_s)
        store = self._ctx.store
        device = store.get_device(device_id)
        if device is None:
            raise DeviceNotFoundError(device_id)
        key = self.signing_key()
        now = now_us()
        issued_ms = now // 1000
        expires_ms = issued_ms + lifetime * 1000
        record = store.add_command(
            CommandRecord(
                command_id=str(uuid.uuid4()),
                device_id=device.device_id,
                type_id=device.type_id,
                command=command,
                seq=0,  # numbered by the store
                status="sent",
                reason=None,
                payload_sha256=hashlib.sha256(body).hexdigest(),
                issued_us=issued_ms * 1000,
                expires_us=expires_ms * 1000,
                updated_us=now,
                sent_by=sent_by,
            )
        )
        document = CommandDocument(
            command_id=record.command_id,
            device_id=record.device_id,
            type_id=record.type_id,
            command=command,
            payload=payload,
            issued_ms=issued_ms,
            expires_ms=expires_ms,
            nonce=b64url(secrets.token_bytes(16)),
            seq=record.seq,
        )
        jws = key.sign(document.to_json())
        store.add_security_events(
            [
                SecurityEvent(
                    now,
                    "command",
                    sent_by,
                    {
                        "deviceId": record.device_id,
                        "commandId": record.command_id,
                        "command": command,
                        "seq": record.seq,
                        "payloadSha256": record.payload_sha256,
                    },
                )
            ]
        )
        topic = str(CommandTopic(record.type_id, record.device_id, command))
        return Outgoing(record, topic, command_message(jws))

    async def send(
        self,
        device_id: str,
        command: str,
        payload: Mapping[str, Any],
        *,
        sent_by: str,
        expires_in_s: int | None = None,
    ) -> CommandRecord:
        """Record and publish a command; return once the broker has taken it (QoS 1)."""
        self.validate(command, payload, expires_in_s)  # a bad request is a 422 in any case
        publish = self._publish
        if publish is None:
            raise BrokerUnavailableError("(none)", "this node has no broker connection to send commands")
        outgoing = await asyncio.to_thread(
            self.prepare, device_id, command, payload, sent_by=sent_by, expires_in_s=expires_in_s
        )
        try:
            async with asyncio.timeout(self._publish_timeout_s):
                await publish(outgoing.topic, outgoing.message)
        except (BrokerError, OSError, TimeoutError, RuntimeError) as exc:
            await asyncio.to_thread(
                self._ctx.store.set_command_status,
                outgoing.record.command_id,
                "failed",
                "broker_unavailable",
                now_us(),
            )
            raise BrokerUnavailableError(
                "(commands)", f"the command was not delivered ({exc!s:.120})"
            ) from exc
        return outgoing.record

    # ---- reading ---------------------------------------------------------------------------
    def get(self, device_id: str, command_id: str) -> CommandRecord:
        record = self._ctx.store.get_command(device_id, command_id)
        if record is None:
            raise CommandNotFoundError(device_id, command_id)
        return record
