"""Checking a command message: signature, addressee, topic and time. No state, no I/O.

Order matters: nothing in the message is believed before the signature verifies, and the
signature is checked before the document is parsed (:meth:`CommandPublicKey.verify`).
Freshness against replays needs state and lives in :mod:`iotvault.device.replay`.

Time: a device needs a clock good to within ``max_skew_s`` (5 minutes by default). A command
whose ``expiresAt`` has passed is refused as ``expired``; one issued more than ``max_skew_s``
in the future as ``not_yet_valid``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from iotvault.crypto.signing import CommandPublicKey
from iotvault.domain.commands import CommandDocument, Reason, read_command_message
from iotvault.domain.topics import JSON_FORMAT, CommandTopic, parse_topic
from iotvault.errors import CommandRejectedError, SignatureError, TopicError


@dataclass(frozen=True, slots=True)
class Command:
    """A verified command, as a handler receives it."""

    command_id: str
    name: str
    payload: Mapping[str, Any]
    device_id: str
    type_id: str
    issued_ms: int
    expires_ms: int
    seq: int
    nonce: str


class CommandVerifier:
    """Verifies command messages addressed to one device.

    ``keys`` are the platform public keys the device trusts (one, or two while the platform
    key is being replaced); the JWS header's ``kid`` selects one.
    """

    def __init__(
        self,
        keys: CommandPublicKey | Iterable[CommandPublicKey],
        device_id: str,
        *,
        type_id: str | None = None,
        max_skew_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        trusted = [keys] if isinstance(keys, CommandPublicKey) else list(keys)
        if not trusted:
            raise ValueError("a verifier needs at least one platform public key")
        self._keys = {k.kid: k for k in trusted}
        self.device_id = device_id
        self.type_id = type_id
        self._skew_ms = int(max_skew_s * 1000)
        self._clock = clock

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def verify(self, topic: str | None, payload: bytes) -> Command:
        """Return the command, or raise :class:`CommandRejectedError` saying why not."""
        jws, claimed = read_command_message(payload)
        if jws is None:
            raise CommandRejectedError(Reason.UNSIGNED, claimed)
        try:
            document = self._check_signature(jws)
        except SignatureError as exc:
            raise CommandRejectedError(exc.reason, claimed) from None
        try:
            doc = CommandDocument.from_json(document)
        except ValueError as exc:
            raise CommandRejectedError(Reason.MALFORMED, claimed, str(exc)) from None
        cid = doc.command_id
        if doc.device_id != self.device_id or (self.type_id is not None and doc.type_id != self.type_id):
            raise CommandRejectedError(Reason.WRONG_DEVICE, cid)
        if topic is not None:
            try:
                parsed = parse_topic(topic)
            except TopicError:
                raise CommandRejectedError(Reason.WRONG_TOPIC, cid) from None
            if (
                not isinstance(parsed, CommandTopic)
                or parsed.fmt != JSON_FORMAT  # iotvault signs JSON documents only
                or parsed.device_id != doc.device_id
                or parsed.type_id != doc.type_id
                or parsed.command != doc.command
            ):
                raise CommandRejectedError(Reason.WRONG_TOPIC, cid)
        now = self.now_ms()
        if now > doc.expires_ms:
            raise CommandRejectedError(Reason.EXPIRED, cid)
        if doc.issued_ms > now + self._skew_ms:
            raise CommandRejectedError(Reason.NOT_YET_VALID, cid)
        return Command(
            command_id=cid,
            name=doc.command,
            payload=doc.payload,
            device_id=doc.device_id,
            type_id=doc.type_id,
            issued_ms=doc.issued_ms,
            expires_ms=doc.expires_ms,
            seq=doc.seq,
            nonce=doc.nonce,
        )

    def _check_signature(self, jws: str) -> dict[str, Any]:
        # The header names the key; try that one (verify() re-checks the kid and everything else).
        last: SignatureError = SignatureError("unknown_key")
        for key in self._keys.values():
            try:
                return key.verify(jws)
            except SignatureError as exc:
                if exc.reason != "unknown_key":
                    raise
                last = exc
        raise last
