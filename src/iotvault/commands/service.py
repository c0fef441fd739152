"""Sending commands to devices, and what became of them.

``send`` numbers the command (the device's next ``seq``), signs it with the platform key,
records it (status ``sent``, who sent it, a digest of the payload) and an audit entry (a
security event of kind ``command``), and only then publishes it, QoS 1, on the device's
command topic. Recording first means a device's answer can never arrive before the row it
updates; if the broker does not take the message, the row says ``failed`` and the caller gets a
503. The device's ``cmdack`` moves the row to ``acknowledged``, ``rejected`` or ``expired``
(:mod:`iotvault.ingest.pipeline`, in the transaction of the batch that holds it); a command
still ``sent`` after its expiry reads as ``expired``.

A device whose ``command_delivery`` is ``unsigned`` (an admin's choice:
:class:`~iotvault.domain.commands.Delivery`) gets the payload as sent instead of the JWS, and
its command is ``delivered`` once the broker took it, with an audit record per command. Every
path that issues commands goes through :meth:`CommandService.prepare`, so none can skip that.

The transport is a function ``publish(topic, payload)``: the embedded broker's
:meth:`~iotvault.broker.embedded.EmbeddedBroker.publish`, or an MQTT client with iotvault's own
broker account (:class:`iotvault.broker.publisher.CommandPublisher`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol

from iotvault.audit.changes import changed
from iotvault.clock import now_us
from iotvault.commands.keys import command_signing_key
from iotvault.crypto.master_key import MasterKey
from iotvault.crypto.signing import CommandPublicKey, CommandSigningKey
from iotvault.domain.commands import (
    DELIVERED,
    MAX_PAYLOAD_BYTES,
    CommandDocument,
    Delivery,
    command_message,
)
from iotvault.domain.encoding import b64url, canonical_json
from iotvault.domain.ids import check_identifier
from iotvault.domain.topics import JSON_FORMAT, CommandTopic
from iotvault.errors import (
    BrokerError,
    BrokerUnavailableError,
    CommandNotFoundError,
    DeviceNotFoundError,
    ValidationError,
)
from iotvault.storage.repository import CommandRecord, DeviceRecord, SecurityEvent
from iotvault.storage.sql import SqlStore

Publish = Callable[[str, bytes], Awaitable[None]]

MAX_EXPIRY_S = 7 * 86_400


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A recorded, signed command ready to publish."""

    record: CommandRecord
    topic: str
    message: bytes


def _as_sent(payload: Mapping[str, Any]) -> bytes:
    """A JSON payload as the sender gave it (its key order, its characters), compact."""
    try:
        return json.dumps(dict(payload), separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (ValueError, UnicodeEncodeError) as exc:  # a lone surrogate is not UTF-8 text
        raise ValidationError("payload", f"not representable as JSON text: {exc}") from None


def _json(message: bytes) -> Any:
    """The JSON value of ``message``, or None if it is not JSON."""
    try:
        return json.loads(message)
    except (ValueError, RecursionError):
        return None


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
        raw: tuple[str, bytes] | None = None,
    ) -> Outgoing:
        """Number, sign (unless the device takes unsigned commands) and record a command.

        Blocking: database and signature. ``raw`` is ``(format, bytes)`` as an MQTT application
        published them (:meth:`send_message`); then ``payload`` is their JSON object, or empty
        for a non-JSON format (refused for a device that takes only signed commands).
        """
        lifetime, body = self.validate(command, payload, expires_in_s)
        store = self._ctx.store
        device = store.get_device(device_id)
        if device is None:
            raise DeviceNotFoundError(device_id)
        if device.command_delivery == Delivery.UNSIGNED:
            fmt, message = raw if raw is not None else (JSON_FORMAT, _as_sent(payload))
            return self._prepare_unsigned(device, command, fmt, message, lifetime=lifetime, sent_by=sent_by)
        if raw is not None and (raw[0] != JSON_FORMAT or not isinstance(_json(raw[1]), dict)):
            raise ValidationError(
                "payload", "a signed command is a JSON object (fmt/json): this device takes no other"
            )
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

    def _prepare_unsigned(
        self, device: DeviceRecord, command: str, fmt: str, message: bytes, *, lifetime: int, sent_by: str
    ) -> Outgoing:
        """Record a command whose payload goes out as sent; audited, since nothing protects it."""
        if len(message) > MAX_PAYLOAD_BYTES:
            raise ValidationError("payload", f"larger than {MAX_PAYLOAD_BYTES} bytes")
        topic = str(CommandTopic(device.type_id, device.device_id, command, fmt))  # checks fmt
        now = now_us()
        record = self._ctx.store.add_command(
            CommandRecord(
                command_id=str(uuid.uuid4()),
                device_id=device.device_id,
                type_id=device.type_id,
                command=command,
                seq=0,
                status="sent",  # "delivered" once the broker has it
                reason=None,
                payload_sha256=hashlib.sha256(message).hexdigest(),
                issued_us=now // 1000 * 1000,
                expires_us=(now // 1000 + lifetime * 1000) * 1000,
                updated_us=now,
                sent_by=sent_by,
                delivery=Delivery.UNSIGNED,
            )
        )
        detail = {
            "deviceId": record.device_id,
            "commandId": record.command_id,
            "command": command,
            "seq": record.seq,
            "payloadSha256": record.payload_sha256,
            "delivery": Delivery.UNSIGNED.value,
            "format": fmt,
        }
        self._ctx.store.add_security_events([SecurityEvent(now, "command", sent_by, detail)])
        changed(
            "command.unsigned",
            record.device_id,
            commandId=record.command_id,
            command=command,
            format=fmt,
            payloadSha256=record.payload_sha256,
            sentBy=sent_by,
        )
        return Outgoing(record, topic, message)

    async def send_message(
        self, device_id: str, command: str, fmt: str, message: bytes, *, sent_by: str
    ) -> CommandRecord:
        """A command as an MQTT application publishes it: bytes in a format (Watson's ``a:`` clients).

        A device that takes unsigned commands gets the bytes as they are, on
        ``.../cmd/{command}/fmt/{fmt}``; any other gets a signed command, which needs ``fmt``
        ``json`` and a JSON object (else :class:`ValidationError`).
        """
        payload: Mapping[str, Any] = {}
        if fmt == JSON_FORMAT:
            parsed = _json(message)
            if parsed is None:
                raise ValidationError("payload", "not JSON, though the topic says fmt/json")
            if isinstance(parsed, dict):
                payload = parsed
        return await self.send(device_id, command, payload, sent_by=sent_by, raw=(fmt, message))

    async def send(
        self,
        device_id: str,
        command: str,
        payload: Mapping[str, Any],
        *,
        sent_by: str,
        expires_in_s: int | None = None,
        raw: tuple[str, bytes] | None = None,
    ) -> CommandRecord:
        """Record and publish a command; return once the broker has taken it (QoS 1).

        An unsigned command is then ``delivered``: the record returned says so.
        """
        self.validate(command, payload, expires_in_s)  # a bad request is a 422 in any case
        publish = self._publish
        if publish is None:
            raise BrokerUnavailableError("(none)", "this node has no broker connection to send commands")
        outgoing = await asyncio.to_thread(
            partial(
                self.prepare,
                device_id,
                command,
                payload,
                sent_by=sent_by,
                expires_in_s=expires_in_s,
                raw=raw,
            )
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
        record = outgoing.record
        if record.delivery == Delivery.UNSIGNED:  # no cmdack will come: the broker's QoS 1 is all
            at = now_us()
            store = self._ctx.store
            await asyncio.to_thread(store.set_command_status, record.command_id, DELIVERED, None, at)
            record = replace(record, status=DELIVERED, updated_us=at)
        return record

    # ---- reading ---------------------------------------------------------------------------
    def get(self, device_id: str, command_id: str) -> CommandRecord:
        record = self._ctx.store.get_command(device_id, command_id)
        if record is None:
            raise CommandNotFoundError(device_id, command_id)
        return record
