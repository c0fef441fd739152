"""Every private touch of gmqtt, in one place: read from gmqtt 0.8, checked at start.

gmqtt's public API cannot (a) hand a QoS 1 message to us with its packet id and let us
acknowledge it later in bulk, (b) let a device choose the packet id of a resend, or (c) stay
off its own reconnect loop. iotvault needs all three (ingest's "acknowledge after commit",
the device's "redeliver with the original packet id", the supervisor's backoff), so it uses
these internals — and only here:

========================  ====================================================================
touch                     what it relies on (gmqtt 0.8)
========================  ====================================================================
:func:`take_qos1`         ``client._package_handler._handle_qos_1_publish_packet(mid, payload,
                          topic, properties)`` is called for every inbound QoS 1 PUBLISH
:func:`write_raw`         ``client._connection._protocol.write_data(bytes)`` writes to the socket
:func:`use_packet_ids`    ``client._package_handler.id_generator`` is the allocator handed to
                          the connection's protocol at ``connect``; ``next_id()`` draws an id
:class:`PinnedIds`        ``IdGenerator._used_ids``, the set of ids in flight
:class:`OneConnectionClient`  ``Client.reconnect(delay)`` is what gmqtt calls on a lost
                          connection or a refusing CONNACK
:data:`NO_RECONNECT`      ``reconnect_retries`` below zero (but not -1, "unlimited") never
                          allows a reconnect: ``failed_connections <= reconnect_retries``
:class:`InflightStore`    ``persistent_storage``: ``push_message(mid, packet)`` inside
                          ``publish``, ``remove_message_by_mid(mid)`` on PUBACK, ``get_all``,
                          ``is_empty``, ``wait_empty`` and ``clear`` around a CONNACK
========================  ====================================================================

:func:`check_version` refuses any other minor version at start with one clear message,
instead of a wrong behaviour later (a silently lost acknowledgement, a resend with a new id).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib import metadata
from typing import Any, Final, Protocol

from gmqtt import Client
from gmqtt.mqtt.utils import IdGenerator

from iotvault.errors import UnsupportedLibraryError

SUPPORTED_MINOR: Final = (0, 8)
"""The ``major.minor`` of gmqtt whose internals this module was read from (``gmqtt==0.8.*``)."""

NO_RECONNECT: Final = -2
"""A ``reconnect_retries`` that never allows a reconnect (-1 means "unlimited")."""

QoS1Handler = Callable[[int, bytes, str, dict[str, Any]], None]
"""``(packet id, payload, topic, properties)``; ``properties["dup"]`` is the DUP flag."""


@functools.cache
def check_version() -> str:
    """The installed gmqtt version, if it is the minor version these touches were read from."""
    installed = metadata.version("gmqtt")
    parts = installed.split(".")
    try:
        minor = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        minor = (-1, -1)
    if minor != SUPPORTED_MINOR:
        raise UnsupportedLibraryError("gmqtt", installed, "{}.{}.*".format(*SUPPORTED_MINOR))
    return installed


def take_qos1(client: Client, handler: QoS1Handler) -> None:
    """Route every inbound QoS 1 PUBLISH of ``client`` to ``handler`` instead of ``on_message``.

    gmqtt then sends no PUBACK: the handler owes one (:func:`write_raw`) once it has the message.
    """
    check_version()
    client._package_handler._handle_qos_1_publish_packet = handler


def write_raw(client: Client, data: bytes) -> bool:
    """Write already-encoded packets to the client's connection; False if it has none."""
    connection = client._connection
    if connection is None:
        return False
    connection._protocol.write_data(data)
    return True


class PinnedIds(IdGenerator):  # type: ignore[misc]  # gmqtt ships no type information
    """gmqtt's packet id allocator, plus: reserve ids still in flight, pin the next one."""

    def __init__(self) -> None:
        super().__init__()
        self.pinned: int | None = None

    def reserve(self, mids: set[int]) -> None:
        self._used_ids.update(mids)

    def next_id(self) -> int:
        if self.pinned is not None:
            mid, self.pinned = self.pinned, None
            self._used_ids.add(mid)
            return mid
        return int(super().next_id())


def use_packet_ids(client: Client, ids: PinnedIds) -> None:
    """Make ``ids`` the client's packet id allocator; call before ``connect``."""
    check_version()
    client._package_handler.id_generator = ids


class OneConnectionClient(Client):  # type: ignore[misc]  # gmqtt ships no type information
    """A gmqtt client that never reconnects by itself: its owner's supervisor does that.

    gmqtt calls ``reconnect`` when the connection drops or a CONNACK refuses it; doing nothing
    here keeps a stale client from opening a second connection under the same client id.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_version()
        super().__init__(*args, **kwargs)

    async def reconnect(self, delay: bool = False) -> None:
        return None


class InflightStore(Protocol):
    """What gmqtt asks of a ``persistent_storage`` (the QoS 1/2 messages in flight)."""

    def push_message(self, mid: int, raw_package: bytes) -> None: ...
    def remove_message_by_mid(self, mid: int) -> None: ...
    def get_all(self) -> list[tuple[int, bytes]]: ...
    def clear(self) -> None: ...
    @property
    def is_empty(self) -> bool: ...
    async def wait_empty(self) -> None: ...
