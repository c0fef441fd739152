"""Time as iotvault stores it: integer microseconds since the Unix epoch (UTC).

One reading of the wall clock for the whole code base. Services that decide by time (credential
grace periods, expiry, throttles) take a :data:`Clock` argument that defaults to :func:`now_us`,
so a test can move time without patching a module.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

Clock = Callable[[], int]
"""A function that answers the current time in microseconds since the Unix epoch."""

US_PER_S: Final = 1_000_000


def now_us() -> int:
    """The wall clock, in microseconds since the Unix epoch."""
    return time.time_ns() // 1000
