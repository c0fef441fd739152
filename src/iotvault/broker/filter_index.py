"""Could anyone receive a topic? An index of the subscription filters granted since the start.

The embedded broker answers a stored PUBLISH that no subscription can match with a PUBACK of
its own, without amqtt's delivery queue (four futures per message and broadcast tasks that find
no subscriber); on iotvault's topics devices subscribe to their commands only, so events and
status messages take that short way.
"""

from __future__ import annotations

from typing import Final

__all__ = ["FilterIndex"]

_MAX_FILTER_KEYS: Final = 250_000


class FilterIndex:
    """Could anyone receive a topic? The filters of the subscriptions granted since the start.

    A superset of amqtt's live subscriptions: a filter is noted when its SUBSCRIBE is
    authorized, and never forgotten (an unsubscribe or a deleted session is not seen). Each
    filter is kept as its literal part, up to the first wildcard; since a wildcard takes a
    whole level, a topic a filter matches starts with that part at a level boundary, or is it
    (``a/b`` for ``a/b``), or is it less the final ``/`` (``a`` for ``a/#``). So a topic for
    which no such key is noted has no subscriber. A device's command filter
    ``iot-2/type/T/id/D/cmd/+/fmt/json`` is kept as ``iot-2/type/T/id/D/cmd/``, which no event
    or status topic starts with. Past ``_MAX_FILTER_KEYS`` keys the index stops noting and
    answers "maybe" to everything: amqtt's own forwarding, as without the index.
    """

    def __init__(self) -> None:
        self._keys: set[str] = set()
        self._full = False

    def add(self, topic_filter: str) -> None:
        cut = len(topic_filter)
        for wildcard in "+#":
            at = topic_filter.find(wildcard)
            if 0 <= at < cut:
                cut = at
        if len(self._keys) >= _MAX_FILTER_KEYS:
            self._full = True
        else:
            self._keys.add(topic_filter[:cut])

    def may_match(self, topic: str) -> bool:
        keys = self._keys
        if self._full:
            return True
        if not keys:
            return False
        if "" in keys or topic in keys or topic + "/" in keys:
            return True
        at = topic.find("/")
        while at >= 0:
            if topic[: at + 1] in keys:
                return True
            at = topic.find("/", at + 1)
        return False
