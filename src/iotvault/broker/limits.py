"""The embedded broker's limits: what one client, one address or everyone together may hold.

Every limit here is on by default (README, "Embedded broker limits"): an attacker who can open
TCP connections must not be able to exhaust descriptors, memory, log space or the event loop,
and must not lock honest devices out while trying.

- :class:`BrokerLimits` — the numbers, from the settings (``IOTVAULT_MQTT_*``).
- :class:`ConnectionGate` — counts open connections, in all, per address, and those that have
  not yet sent CONNECT; a connection over a limit is closed at once, before anything is read.
  One address may hold at most half of the pending (pre-CONNECT) slots, so one source cannot
  fill them and keep every other device from logging in.
- :class:`LogBudget` — at most ``log_lines_per_connection`` broker log lines per connection
  (amqtt's included); the rest are counted and summed up in one line when it ends.
"""

from __future__ import annotations

import contextvars
import logging
import resource
import sys
from collections import Counter
from dataclasses import dataclass, replace
from typing import Final, Literal

__all__ = ["BrokerLimits", "ConnectionGate", "LogBudget", "log_budget"]


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    """Bounds of the embedded broker; 0 for a count means "none allowed" only where noted."""

    max_connections: int = 10_000  # open connections in all
    max_connections_per_address: int = 500  # from one IP address (a NAT may hold many devices)
    max_pending_connects: int = 1_024  # connections that have not yet sent CONNECT
    connect_timeout_s: float = 5.0  # time a new connection has to send CONNECT
    max_inflight: int = 64  # QoS 1/2 PUBLISHes of one connection being stored at once
    max_retained: int = 1_000  # retained messages kept; 0: retained messages are off
    max_retained_bytes: int = 1_048_576  # bytes of retained payloads kept in all
    log_lines_per_connection: int = 20  # broker log lines one connection may cause

    def __post_init__(self) -> None:
        positive = ("max_connections", "max_connections_per_address", "max_pending_connects", "max_inflight")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s must be positive")
        if self.max_retained < 0 or self.max_retained_bytes < 0 or self.log_lines_per_connection < 0:
            raise ValueError("retained and log limits must not be negative")


_DESCRIPTOR_RESERVE: Final = 128  # descriptors kept for the database, HTTP, logs and the like


def fit_to_descriptors(limits: BrokerLimits, soft_limit: int | None = None) -> BrokerLimits:
    """``limits`` with ``max_connections`` lowered to what the process may open (``ulimit -n``).

    Past its descriptor limit a server fails every ``accept()`` and every new file, health
    checks and logins included; refusing MQTT connections a little before keeps the rest working.
    """
    if soft_limit is None:
        soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft_limit == resource.RLIM_INFINITY:
            return limits
    room = max(1, soft_limit - _DESCRIPTOR_RESERVE)
    if limits.max_connections <= room:
        return limits
    logging.getLogger(__name__).warning(
        "embedded broker: at most %d MQTT connections, not %d: the process may open %d descriptors "
        "(raise it with `ulimit -n`)",
        room,
        limits.max_connections,
        soft_limit,
    )
    return replace(limits, max_connections=room)


Refusal = Literal[
    "too many connections", "too many connections from one address", "too many pending connections"
]


class ConnectionGate:
    """Open connections, in all, per address and before CONNECT; refuses past the limits."""

    def __init__(self, limits: BrokerLimits) -> None:
        self._limits = limits
        self.total = 0
        self.pending = 0
        self._per_address: Counter[str] = Counter()
        self._pending_per_address: Counter[str] = Counter()
        self._pending_share = max(1, limits.max_pending_connects // 2)

    def enter(self, address: str) -> Refusal | None:
        """Count a new connection; why it must be closed instead, or None (counted)."""
        lim = self._limits
        if self.total >= lim.max_connections:
            return "too many connections"
        if self._per_address[address] >= lim.max_connections_per_address:
            return "too many connections from one address"
        if (
            self.pending >= lim.max_pending_connects
            or self._pending_per_address[address] >= self._pending_share
        ):
            return "too many pending connections"
        self.total += 1
        self.pending += 1
        self._per_address[address] += 1
        self._pending_per_address[address] += 1
        return None

    def connected(self, address: str) -> None:
        """The connection sent its CONNECT: no longer pending."""
        self.pending -= 1
        _decrement(self._pending_per_address, address)

    def leave(self, address: str, *, pending: bool) -> None:
        self.total -= 1
        if pending:
            self.connected(address)
        _decrement(self._per_address, address)


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


class LogBudget:
    """How many more log lines the current connection may write."""

    __slots__ = ("left", "suppressed")

    def __init__(self, lines: int) -> None:
        self.left = lines
        self.suppressed = 0


log_budget: Final[contextvars.ContextVar[LogBudget | None]] = contextvars.ContextVar(
    "iotvault_mqtt_log_budget", default=None
)
"""Set in each connection's task; amqtt's tasks for the connection inherit it (context copy)."""


class BudgetFilter(logging.Filter):
    """Drops a connection's log records past its budget (records outside a connection pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        budget = log_budget.get()
        if budget is None:
            return True
        if budget.left > 0:
            budget.left -= 1
            return True
        budget.suppressed += 1
        return False


_FILTER: Final = BudgetFilter()


def install_log_budget(prefixes: tuple[str, ...]) -> None:
    """Put the budget on every logger under ``prefixes`` (filters do not reach child loggers).

    amqtt makes most of its loggers when a connection starts (``getLogger(__name__)``), so the
    loggers of every imported module under the prefixes are made now, with the filter.
    """
    known = set(logging.root.manager.loggerDict) | set(sys.modules)
    names = [n for n in known if n.startswith(prefixes)]
    for name in (*prefixes, *names):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
