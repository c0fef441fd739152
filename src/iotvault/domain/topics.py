"""The MQTT topics of the contract (Watson IoT Platform names), parsed into value objects.

=====================================================================  ==================
``iot-2/type/{typeId}/id/{deviceId}/evt/{eventType}/fmt/{format}``     :class:`EventTopic`
``iot-2/type/{typeId}/id/{deviceId}/mon``                              :class:`StatusTopic`
``iot-2/type/{typeId}/id/{deviceId}/cmd/{command}/fmt/{format}``       :class:`CommandTopic`
=====================================================================  ==================

iotvault's own (signed) commands are ``fmt/json``; a command in another format is one a Watson
application published for a device that takes commands as sent (unsigned delivery). A command
acknowledgement is an event whose ``eventType`` is ``cmdack``. Every segment is an
identifier (1-64 of ``A-Z a-z 0-9 . _ -``): wildcards, empty levels, ``$`` prefixes and extra
levels are refused, so a parsed topic is always safe to use as a key or to rebuild a topic.
"""

from __future__ import annotations

from dataclasses import dataclass

from iotvault.domain.ids import check_identifier
from iotvault.errors import TopicError, ValidationError

PREFIX = "iot-2"
CMDACK_EVENT = "cmdack"
JSON_FORMAT = "json"  # the one format whose payload must parse; any other is kept as bytes
MAX_TOPIC_LENGTH = 512

# Subscription filters for iotvault's own clients.
EVENT_FILTER = f"{PREFIX}/type/+/id/+/evt/+/fmt/+"
STATUS_FILTER = f"{PREFIX}/type/+/id/+/mon"


def _ident(topic: str, field: str, value: str) -> str:
    try:
        return check_identifier(field, value)
    except ValidationError as exc:
        raise TopicError(topic, f"{field} {exc.reason}") from None


@dataclass(frozen=True, slots=True)
class EventTopic:
    type_id: str
    device_id: str
    event_type: str
    fmt: str

    def __post_init__(self) -> None:
        t = self.render_unchecked()
        _ident(t, "typeId", self.type_id)
        _ident(t, "deviceId", self.device_id)
        _ident(t, "eventType", self.event_type)
        _ident(t, "format", self.fmt)

    def render_unchecked(self) -> str:
        return f"{PREFIX}/type/{self.type_id}/id/{self.device_id}/evt/{self.event_type}/fmt/{self.fmt}"

    def __str__(self) -> str:
        return self.render_unchecked()

    @property
    def is_command_ack(self) -> bool:
        return self.event_type == CMDACK_EVENT


@dataclass(frozen=True, slots=True)
class StatusTopic:
    type_id: str
    device_id: str

    def __post_init__(self) -> None:
        t = str(self)
        _ident(t, "typeId", self.type_id)
        _ident(t, "deviceId", self.device_id)

    def __str__(self) -> str:
        return f"{PREFIX}/type/{self.type_id}/id/{self.device_id}/mon"


@dataclass(frozen=True, slots=True)
class CommandTopic:
    type_id: str
    device_id: str
    command: str
    fmt: str = JSON_FORMAT  # signed commands are JSON; an unsigned one keeps its sender's format

    def __post_init__(self) -> None:
        t = str(self)
        _ident(t, "typeId", self.type_id)
        _ident(t, "deviceId", self.device_id)
        _ident(t, "command", self.command)
        _ident(t, "format", self.fmt)

    def __str__(self) -> str:
        return f"{PREFIX}/type/{self.type_id}/id/{self.device_id}/cmd/{self.command}/fmt/{self.fmt}"


Topic = EventTopic | StatusTopic | CommandTopic


def parse_topic(topic: str) -> Topic:
    """Parse a contract topic; raise :class:`TopicError` for anything else."""
    if not isinstance(topic, str) or not topic:
        raise TopicError(str(topic)[:80], "empty topic")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise TopicError(topic[:80], f"longer than {MAX_TOPIC_LENGTH} characters")
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != PREFIX or parts[1] != "type" or parts[3] != "id":
        raise TopicError(topic, "not an iot-2/type/{typeId}/id/{deviceId}/... topic")
    type_id, device_id, rest = parts[2], parts[4], parts[5:]
    if rest == ["mon"]:
        return StatusTopic(_ident(topic, "typeId", type_id), _ident(topic, "deviceId", device_id))
    if len(rest) == 4 and rest[0] == "evt" and rest[2] == "fmt":
        return EventTopic(type_id, device_id, rest[1], rest[3])
    if len(rest) == 4 and rest[0] == "cmd" and rest[2] == "fmt":
        return CommandTopic(type_id, device_id, rest[1], rest[3])
    raise TopicError(
        topic, "expected .../evt/{eventType}/fmt/{format}, .../mon or .../cmd/{command}/fmt/{format}"
    )
