"""What the embedded broker hands to iotvault, and the hooks iotvault gives it.

Kept apart from :mod:`iotvault.broker.embedded` so that the code that implements the hooks
(:mod:`iotvault.broker.authority`, the ingest wiring) needs none of the broker's machinery.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "NOT_FORWARDED",
    "Authenticator",
    "ConnectionHook",
    "Denial",
    "DenialHook",
    "InboundPublish",
    "PublishHook",
    "Refused",
    "TopicAction",
    "TopicAuthorizer",
]


@dataclass(frozen=True, slots=True)
class InboundPublish:
    """A PUBLISH a client sent, as handed to the publish hook before it is acknowledged."""

    client_id: str
    username: str | None
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None


TopicAction = Literal["publish", "subscribe", "receive"]

NOT_FORWARDED: Final = "not forwarded"
"""A publish hook's result that says: taken, acknowledge it, but deliver it to no subscriber
(a command a Watson application sent, which iotvault re-issues signed). QoS 0 and 1 only: a
QoS 2 or retained message with this result is not acknowledged and its connection is dropped."""


@dataclass(frozen=True, slots=True)
class Refused:
    """A publish hook's result that says: refused for good — stored nowhere, forwarded to nobody,
    and yet answered, so that the sender does not send it again and again.

    For a message that can never be taken (an application's command that is not what the device
    accepts): dropping the connection unacknowledged would only make a QoS 1 client resend it
    forever. An MQTT 5 client gets ``reason_code`` (0x80 or above) in its PUBACK or PUBREC; an
    MQTT 3.1.1 client's PUBACK cannot say no, so the hook records why (a security event). A
    3.1.1 QoS 2 message cannot be refused and answered: its connection is dropped.
    """

    reason_code: int
    reason: str


PublishHook = Callable[[InboundPublish], Awaitable[object]]
"""Stores the message; its awaitable completes once it is committed (the result is ignored,
unless it is :data:`NOT_FORWARDED` or :class:`Refused`).

Raising, or an awaitable that fails, withholds the acknowledgement. An ``asyncio.Future`` is
used as it is (iotvault's hook returns the ingest pipeline's); a coroutine runs as a task.
"""

Authenticator = Callable[[str, str | None, str | None], Awaitable[bool]]
"""``(client_id, username, password) -> allowed``."""

TopicAuthorizer = Callable[[str, str | None, str, TopicAction], Awaitable[bool]]
"""``(client_id, username, topic or filter, action) -> allowed``."""

ConnectionHook = Callable[[str, str | None, bool], Awaitable[None]]
"""``(client_id, username, connected)``."""


@dataclass(frozen=True, slots=True)
class Denial:
    """Something the broker refused: a login, a PUBLISH, a SUBSCRIBE, a packet or a connection."""

    action: Literal["connect", "publish", "subscribe", "protocol", "limit"]
    client_id: str
    username: str | None
    peer: str  # host:port of the client, or "-" when not known
    reason: str  # "bad credentials", "throttled", "will topic", "not allowed", a protocol error...
    topic: str | None = None


DenialHook = Callable[[Denial], None]
"""Told of every refusal; must return at once (it runs on the broker's path)."""
