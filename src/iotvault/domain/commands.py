"""The command formats on the wire, shared by the platform, the device SDK and ingest. Pure.

A command travels as one MQTT message (QoS 1, never retained) on
``iot-2/type/{typeId}/id/{deviceId}/cmd/{command}/fmt/json``::

    {"jws": "<header>.<document>.<signature>"}

The JWS (see :mod:`iotvault.crypto.signing`) signs the canonical JSON of this document; times are
integer milliseconds since the Unix epoch (UTC)::

    {"v": 1, "commandId": "<uuid>", "deviceId": "kitchen-1", "typeId": "thermo",
     "command": "setInterval", "payload": {...}, "issuedAt": 1795311554000,
     "expiresAt": 1795311854000, "nonce": "<16 random bytes, base64url>", "seq": 42}

``seq`` counts the commands of one device (1, 2, …); with ``nonce`` it lets a device refuse a
replay even across restarts (:mod:`iotvault.device.replay`). The device answers with an event of
type ``cmdack`` (``iot-2/type/{typeId}/id/{deviceId}/evt/cmdack/fmt/json``)::

    {"commandId": "<uuid>", "status": "accepted" | "rejected", "reason": "expired",
     "verified": true, "result": {...}}

``verified`` says whether the command's signature checked out: a device answers unsigned or
forged messages too (so the platform learns of them), but only a verified answer can change
a command's status.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from iotvault.domain.encoding import b64url_decode, canonical_json
from iotvault.domain.ids import UUID_PATTERN, check_identifier
from iotvault.errors import ValidationError

FORMAT_VERSION: Final = 1
MAX_PAYLOAD_BYTES: Final = 16 * 1024
"""Largest command payload, as canonical JSON; a command must fit any device's packet limit."""
MAX_REASON_CHARS: Final = 200
MAX_LIFETIME_MS: Final = 7 * 86_400_000
_UUID = re.compile(UUID_PATTERN)
_REASON = re.compile(r"[A-Za-z0-9 _.,:;/()'+=-]{1,200}")


class Reason(StrEnum):
    """The words a device uses to refuse a command; a handler may use its own."""

    UNSIGNED = "unsigned"  # no signature at all
    MALFORMED = "malformed"  # not a command document, or fields of the wrong type
    BAD_HEADER = "bad_header"  # not an EdDSA command JWS
    UNKNOWN_KEY = "unknown_key"  # signed, but not with a key the device trusts
    BAD_SIGNATURE = "bad_signature"  # forged or altered
    WRONG_DEVICE = "wrong_device"  # a genuine command for another device
    WRONG_TOPIC = "wrong_topic"  # the topic names another command than the signed one
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"  # issued in the future beyond the allowed clock skew
    REPLAYED = "replayed"  # seen before (nonce or seq), or older than the replay window
    UNSUPPORTED = "unsupported"  # no handler for this command
    HANDLER_FAILED = "handler_failed"
    STATE_UNAVAILABLE = "state_unavailable"  # the replay state cannot be saved: fail closed


class Delivery(StrEnum):
    """How commands reach a device: a device's setting, chosen by an admin.

    ``signed`` (the default, and the recommendation): the JWS message above, which the device
    verifies and answers with ``cmdack``. ``unsigned``: the payload exactly as the sender gave
    it, on ``.../cmd/{command}/fmt/{format}``, as Watson IoT Platform delivered commands — for
    devices that cannot verify a signature. Such a command is ``delivered`` once the broker has
    taken it; no answer is expected, and the device cannot tell it from a forgery.
    """

    SIGNED = "signed"
    UNSIGNED = "unsigned"


DELIVERED: Final = "delivered"
"""The status of an unsigned command once the broker has taken it."""


UNVERIFIED_REASONS: Final = frozenset(
    {Reason.UNSIGNED, Reason.MALFORMED, Reason.BAD_HEADER, Reason.UNKNOWN_KEY, Reason.BAD_SIGNATURE}
)
"""Refusals that come before the signature is known to be good."""


@dataclass(frozen=True, slots=True)
class CommandDocument:
    """The signed fields of a command."""

    command_id: str
    device_id: str
    type_id: str
    command: str
    payload: Mapping[str, Any]
    issued_ms: int
    expires_ms: int
    nonce: str
    seq: int

    def to_json(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "commandId": self.command_id,
            "deviceId": self.device_id,
            "typeId": self.type_id,
            "command": self.command,
            "payload": dict(self.payload),
            "issuedAt": self.issued_ms,
            "expiresAt": self.expires_ms,
            "nonce": self.nonce,
            "seq": self.seq,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> CommandDocument:
        """Validate a verified document's fields; ``ValueError`` names the first bad one."""
        if doc.get("v") != FORMAT_VERSION:
            raise ValueError("v: unsupported format version")
        command_id = _str(doc, "commandId")
        if _UUID.fullmatch(command_id) is None:
            raise ValueError("commandId: not a UUID")
        device_id, type_id, command = _str(doc, "deviceId"), _str(doc, "typeId"), _str(doc, "command")
        for name, value in (("deviceId", device_id), ("typeId", type_id), ("command", command)):
            try:
                check_identifier(name, value)
            except ValidationError as exc:  # one exception type for callers
                raise ValueError(str(exc)) from None
        payload = doc.get("payload")
        if not isinstance(payload, dict):
            raise ValueError("payload: not an object")  # noqa: TRY004 - one exception type for callers
        issued, expires, seq = _int(doc, "issuedAt"), _int(doc, "expiresAt"), _int(doc, "seq")
        if expires < issued or expires - issued > MAX_LIFETIME_MS:
            raise ValueError("expiresAt: before issuedAt or too far after it")
        if seq < 1:
            raise ValueError("seq: must be 1 or more")
        nonce = _str(doc, "nonce")
        try:
            nonce_bytes = b64url_decode(nonce)
        except ValueError as exc:
            raise ValueError(f"nonce: {exc}") from None
        if len(nonce_bytes) < 16:
            raise ValueError("nonce: fewer than 16 bytes")
        return cls(command_id, device_id, type_id, command, payload, issued, expires, nonce, seq)


def _str(doc: Mapping[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}: not a non-empty string")
    return value


def _int(doc: Mapping[str, Any], name: str) -> int:
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: not a non-negative integer")
    return value


def command_message(jws: str) -> bytes:
    """The MQTT payload that carries a signed command."""
    return canonical_json({"jws": jws})


def read_command_message(payload: bytes) -> tuple[str | None, str | None]:
    """``(jws, claimed command id)`` from a command message; either may be None.

    The claimed id is read *without* verification, only so that a refusal can name what it
    refused.
    """
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(doc, dict):
        return None, None
    jws = doc.get("jws")
    claimed = doc.get("commandId")
    if isinstance(jws, str):
        claimed = _peek_command_id(jws)
    return (jws if isinstance(jws, str) else None), (claimed if _is_uuid(claimed) else None)


def _peek_command_id(jws: str) -> str | None:
    parts = jws.split(".")
    if len(parts) != 3 or len(parts[1]) > 200_000:
        return None
    try:
        doc = json.loads(b64url_decode(parts[1]))
    except (ValueError, RecursionError):
        return None
    value = doc.get("commandId") if isinstance(doc, dict) else None
    return value if _is_uuid(value) else None


def _is_uuid(value: object) -> bool:
    return isinstance(value, str) and _UUID.fullmatch(value) is not None


# ---- the device's answer ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ack:
    """A device's answer to one command message."""

    command_id: str | None
    accepted: bool
    reason: str | None = None
    verified: bool = True
    result: Mapping[str, Any] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "commandId": self.command_id,
            "status": "accepted" if self.accepted else "rejected",
            "verified": self.verified,
        }
        if self.reason:
            doc["reason"] = clean_reason(self.reason)
        if self.result is not None:
            doc["result"] = dict(self.result)
        return doc


@dataclass(frozen=True, slots=True)
class AckInfo:
    """A ``cmdack`` as the platform reads it: the status it leads to."""

    command_id: str  # "" when the device could not tell which command it refused
    status: str  # acknowledged | rejected | expired
    reason: str | None
    verified: bool


def clean_reason(reason: object) -> str:
    """A reason safe to store and show: short, printable, from a small alphabet."""
    text = str(reason)[:MAX_REASON_CHARS]
    return text if _REASON.fullmatch(text) else "unspecified"


def parse_command_ack(payload: bytes) -> AckInfo | None:
    """Read a ``cmdack`` event; None if it is not one."""
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    status = doc.get("status")
    if status not in ("accepted", "rejected"):
        return None
    command_id = doc.get("commandId")
    if command_id is not None and not _is_uuid(command_id):
        return None
    verified = doc.get("verified", True) is True
    reason = doc.get("reason")
    reason_text = clean_reason(reason) if reason is not None else None
    if status == "accepted":
        final = "acknowledged"
    else:
        final = "expired" if reason_text == Reason.EXPIRED else "rejected"
    return AckInfo(command_id or "", final, reason_text, verified and command_id is not None)
