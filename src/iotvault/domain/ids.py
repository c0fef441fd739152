"""Identifiers of the data model, validated where they enter.

``deviceId`` and ``typeId`` are 1-64 characters of ``A-Z a-z 0-9 . _ -`` (the contract). Both
appear inside MQTT topics and SQL keys, so anything else (``+``, ``#``, ``/``, NUL, spaces,
non-ASCII look-alikes) is refused at the edge rather than escaped later.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Final

from iotvault.errors import ValidationError

IDENTIFIER_PATTERN: Final = "[A-Za-z0-9._-]{1,64}"
"""The contract's identifier: ``deviceId``, ``typeId``, OAuth client ids, command names."""
UUID_PATTERN: Final = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
"""A UUID in its canonical lower-case form: event ids (UUIDv7) and command ids (UUIDv4)."""

_ID_RE = re.compile(IDENTIFIER_PATTERN)


def check_identifier(field: str, value: str) -> str:
    """Return *value* if it is a valid device or type identifier, else raise ValidationError."""
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise ValidationError(field, "must be 1-64 characters of A-Z a-z 0-9 . _ -")
    return value


@dataclass(frozen=True, slots=True)
class DeviceId:
    value: str

    def __post_init__(self) -> None:
        check_identifier("deviceId", self.value)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class TypeId:
    value: str

    def __post_init__(self) -> None:
        check_identifier("typeId", self.value)

    def __str__(self) -> str:
        return self.value


class EventIdFactory:
    """Makes UUIDv7 event ids (RFC 9562): time-ordered, so sorting ids sorts by arrival.

    Within one millisecond the 12-bit ``rand_a`` field is a counter seeded at random, so ids
    made by one process are strictly increasing even when the clock stands still or steps
    back; 62 random bits keep ids of different processes apart.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0

    def new(self) -> str:
        return self.new_at(time.time_ns() // 1_000_000)

    def new_at(self, unix_ms: int) -> str:
        """An id for the given time (still strictly after every id this factory made)."""
        with self._lock:
            ms = unix_ms
            if ms <= self._last_ms:
                ms = self._last_ms
                self._counter += 1
                if self._counter > 0xFFF:
                    ms += 1
                    self._counter = int.from_bytes(os.urandom(2), "big") & 0x3FF
            else:
                self._counter = int.from_bytes(os.urandom(2), "big") & 0x3FF
            self._last_ms = ms
            counter = self._counter
        rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
        value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand_b
        # the canonical 8-4-4-4-12 form, formatted directly rather than through uuid.UUID: it
        # runs for every stored event (BENCHMARKS.md)
        h = f"{value:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def event_id_millis(event_id: str) -> int:
    """The Unix time in milliseconds carried by a UUIDv7 event id."""
    return uuid.UUID(event_id).int >> 80


def event_id_bound(unix_us: int, *, upper: bool) -> str:
    """The smallest (or largest) UUIDv7 of the millisecond holding ``unix_us``.

    Lets a time-range query run on the ``(device_id, event_id)`` primary key.
    """
    ms = max(0, unix_us // 1000) & ((1 << 48) - 1)
    low_bits = (1 << 80) - 1 if upper else 0
    return str(uuid.UUID(int=(ms << 80) | low_bits))
