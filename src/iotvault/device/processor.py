"""From a command message to the answer a device publishes: verify, refuse replays, run, ack.

One command at a time per device (a lock), so the replay state is never written concurrently
and a handler never runs twice at once. Every message gets an answer, refusals included:
``{"commandId": …, "status": "rejected", "reason": "bad_signature", "verified": false}``
tells the platform that something forged reached the device.

A handler receives a :class:`~iotvault.device.verify.Command` and returns a small JSON object
(the ``result`` of the answer) or None; it refuses a command it understood by raising
:class:`~iotvault.errors.CommandRejectedError` with a short reason. Any other exception answers
``handler_failed`` (logged here, not sent: an exception's text may hold secrets).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from iotvault.device.replay import ReplayGuard
from iotvault.device.verify import Command, CommandVerifier
from iotvault.domain.commands import UNVERIFIED_REASONS, Ack, Reason
from iotvault.errors import CommandRejectedError

log = logging.getLogger(__name__)

HandlerResult = Mapping[str, Any] | None
Handler = Callable[[Command], Awaitable[HandlerResult] | HandlerResult]


class CommandProcessor:
    def __init__(self, verifier: CommandVerifier, guard: ReplayGuard, handler: Handler | None = None) -> None:
        if verifier.device_id != guard.device_id:
            raise ValueError("the verifier and the replay guard are for different devices")
        self.verifier = verifier
        self.guard = guard
        self._handler = handler
        self._lock = asyncio.Lock()
        self.accepted = 0
        self.rejected = 0

    @property
    def device_id(self) -> str:
        return self.verifier.device_id

    async def process(self, topic: str | None, payload: bytes) -> Ack:
        """The answer to one command message (never raises for a bad message)."""
        async with self._lock:
            ack = await self._process(topic, payload)
        if ack.accepted:
            self.accepted += 1
        else:
            self.rejected += 1
            log.warning(
                "device %s refused command %s: %s", self.device_id, ack.command_id or "(unknown)", ack.reason
            )
        return ack

    async def _process(self, topic: str | None, payload: bytes) -> Ack:
        try:
            command = self.verifier.verify(topic, payload)
            self.guard.accept(command, self.verifier.now_ms())
        except CommandRejectedError as exc:
            return Ack(exc.command_id, False, exc.reason, verified=exc.reason not in UNVERIFIED_REASONS)
        if self._handler is None:
            return Ack(command.command_id, False, Reason.UNSUPPORTED)
        try:
            outcome = self._handler(command)
            result: object = await outcome if inspect.isawaitable(outcome) else outcome
        except CommandRejectedError as exc:
            return Ack(command.command_id, False, exc.reason)
        except Exception:
            log.exception("device %s: handler of command %s failed", self.device_id, command.name)
            return Ack(command.command_id, False, Reason.HANDLER_FAILED)
        if result is not None and not isinstance(result, Mapping):
            log.error(
                "device %s: handler of %s returned %s, not a mapping",
                self.device_id,
                command.name,
                type(result).__name__,
            )
            return Ack(command.command_id, False, Reason.HANDLER_FAILED)
        return Ack(command.command_id, True, result=result)
