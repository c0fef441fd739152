"""Identifiers of the data model, validated where they enter.

``deviceId`` and ``typeId`` are 1-64 characters of ``A-Z a-z 0-9 . _ -`` (the contract). Both
appear inside MQTT topics and SQL keys, so anything else (``+``, ``#``, ``/``, NUL, spaces,
non-ASCII look-alikes) is refused at the edge rather than escaped later.
"""

from __future__ import annotations

import os
import re
import struct
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from iotvault.errors import ValidationError

IDENTIFIER_PATTERN: Final = "[A-Za-z0-9._-]{1,64}"
"""The contract's identifier: ``deviceId``, ``typeId``, OAuth client ids, command names."""
UUID_PATTERN: Final = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
"""A UUID in its canonical lower-case form: event ids (UUIDv7) and command ids (UUIDv4)."""

_ID_RE = re.compile(IDENTIFIER_PATTERN)
_MS_MASK: Final = (1 << 48) - 1
_RAND_B_MASK: Final = (1 << 62) - 1
_VARIANT: Final = 0b10 << 62  # RFC 9562's variant, in the top bits of the last 64


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
        return self.new_many((unix_ms,))[0][0]

    def new_many(self, unix_ms: Sequence[int]) -> list[tuple[str, int]]:
        """Ids for the given times, in order, each with the millisecond it carries.

        Each id is strictly after the one before it (and every id this factory made): the
        millisecond carried is ``unix_ms[i]`` unless the clock stood still or stepped back, then
        the previous id's. Ingest makes a batch's ids in one call: one lock, one read of the
        OS's random bytes for the whole batch instead of one or two per id, and the time part of
        the text made once per millisecond (BENCHMARKS.md, issue 17 ingest round).
        """
        n = len(unix_ms)
        # per id: 8 random bytes for rand_b; per id too, 2 bytes to seed the counter of a new
        # millisecond (most are unused: a batch spans a few milliseconds)
        rand = os.urandom(10 * n)
        rand_b = struct.unpack_from(f">{n}Q", rand)
        seeds = rand[8 * n :]
        out: list[tuple[str, int]] = []
        with self._lock:
            last, counter = self._last_ms, self._counter
            head_ms, head = -1, ""
            for i, wanted in enumerate(unix_ms):
                ms = wanted
                if ms <= last:
                    ms = last
                    counter += 1
                    if counter > 0xFFF:
                        ms += 1
                        counter = int.from_bytes(os.urandom(2), "big") & 0x3FF
                else:
                    counter = (seeds[2 * i] << 8 | seeds[2 * i + 1]) & 0x3FF
                last = ms
                if ms != head_ms:  # the 48-bit time as "tttttttt-tttt-", once per millisecond
                    t = f"{ms & _MS_MASK:012x}"
                    head_ms, head = ms, f"{t[:8]}-{t[8:]}-"
                # the canonical 8-4-4-4-12 form, formatted directly rather than through
                # uuid.UUID: version 7, the 12-bit counter, the variant 0b10 and 62 random bits
                r = f"{rand_b[i] & _RAND_B_MASK | _VARIANT:016x}"
                out.append((f"{head}7{counter:03x}-{r[:4]}-{r[4:]}", ms))
            self._last_ms, self._counter = last, counter
        return out


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
