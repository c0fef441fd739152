"""Who may use which topic: devices, and iotvault's own broker account. Pure functions.

The contract (section 5): a device publishes only its own event and status topics and
subscribes only to its own command topic. "Own" means the exact prefix
``iot-2/type/{typeId}/id/{deviceId}/`` of its registration — the type included, so a device
cannot publish as another type either. No wildcard reaches beyond that prefix: a device may
subscribe to ``…/cmd/+/fmt/json`` (all its commands), to one command's topic, or to
``…/cmd/<command|+>/fmt/<format|+>`` (what a Watson IoT device asks for), never to ``#``, ``+``
levels above its own, or ``$SYS``. It receives its own commands in any format: iotvault's
signed ones are ``fmt/json``; a Watson application's command for a device with unsigned
delivery keeps the format it was published in (``fmt/text``, ``fmt/bin``, ...).

iotvault's own account (``iotvault:service``) only publishes commands; on the embedded broker
ingest runs inside the broker and needs no subscription. On Mosquitto the same account also
subscribes to events and status (:mod:`iotvault.broker.dynsec` grants exactly that).

The same rules are declared for Mosquitto's dynamic-security plugin by
:func:`iotvault.broker.dynsec.device_role_acls`, built from the same prefix.
"""

from __future__ import annotations

from typing import Final, Literal

from iotvault.domain.ids import check_identifier
from iotvault.domain.topics import PREFIX, CommandTopic, EventTopic, StatusTopic, parse_topic
from iotvault.errors import TopicError, ValidationError

TopicAction = Literal["publish", "subscribe", "receive"]

SERVICE_USERNAME: Final = "iotvault:service"
"""iotvault's own broker account; ``:`` keeps it apart from every possible deviceId."""
SERVICE_CLIENT_PREFIX: Final = "iotvault:"
"""Client ids of iotvault's own connections start with this; no device's can."""


def device_prefix(type_id: str, device_id: str) -> str:
    return f"{PREFIX}/type/{type_id}/id/{device_id}/"


def command_filter(type_id: str, device_id: str) -> str:
    """The one subscription a device needs: all its commands."""
    return f"{device_prefix(type_id, device_id)}cmd/+/fmt/json"


def device_may(type_id: str, device_id: str, topic: str, action: TopicAction) -> bool:
    """May device ``device_id`` (of type ``type_id``) do ``action`` on ``topic``?"""
    if action == "subscribe":
        if topic == command_filter(type_id, device_id):
            return True
        return _own_command_filter(type_id, device_id, topic) or _own_command_topic(type_id, device_id, topic)
    if action == "receive":
        return _own_command_topic(type_id, device_id, topic)
    try:
        parsed = parse_topic(topic)
    except TopicError:
        return False
    return (
        isinstance(parsed, EventTopic | StatusTopic)
        and parsed.type_id == type_id
        and parsed.device_id == device_id
    )


def service_may(topic: str, action: TopicAction) -> bool:
    """iotvault's own account on the embedded broker: it publishes commands, nothing else."""
    if action != "publish":
        return False
    try:
        return isinstance(parse_topic(topic), CommandTopic)
    except TopicError:
        return False


def _own_command_filter(type_id: str, device_id: str, topic_filter: str) -> bool:
    """``<own prefix>cmd/<command|+>/fmt/<format|+>``: its own commands, nothing wider."""
    prefix = device_prefix(type_id, device_id)
    if not topic_filter.startswith(prefix):
        return False
    parts = topic_filter[len(prefix) :].split("/")
    return (
        len(parts) == 4  # cmd/C/fmt/F
        and parts[0] == "cmd"
        and parts[2] == "fmt"
        and all(part == "+" or is_device_id(part) for part in (parts[1], parts[3]))
    )


def _own_command_topic(type_id: str, device_id: str, topic: str) -> bool:
    try:
        parsed = parse_topic(topic)
    except TopicError:
        return False
    return isinstance(parsed, CommandTopic) and parsed.type_id == type_id and parsed.device_id == device_id


def is_device_id(value: str | None) -> bool:
    if value is None:
        return False
    try:
        check_identifier("deviceId", value)
    except ValidationError:
        return False
    return True
