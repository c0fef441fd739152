"""Run a fleet of simulated devices: connect them all, pace their events, wait for the acks.

Used by ``iotvault simulate``, ``iotvault demo`` and the integration tests. Progress goes to an
``on_progress(published, acknowledged)`` callback, so this module stays free of any display.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from ssl import SSLContext
from typing import Any

from iotvault.crypto.signing import CommandPublicKey
from iotvault.device.connection import DeviceConnection, DeviceCredential
from iotvault.device.processor import CommandProcessor, Handler
from iotvault.device.replay import ReplayGuard
from iotvault.device.verify import Command, CommandVerifier
from iotvault.domain.ids import check_identifier
from iotvault.errors import IotVaultError, ValidationError

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]

_PROGRESS_INTERVAL = 0.1  # seconds between progress reports while something changes


@dataclass(frozen=True)
class SimulationPlan:
    """Which devices publish, how fast (events per second per device; 0 = as fast as
    possible), how many events each (None = until cancelled), and under which event type."""

    devices: Sequence[DeviceCredential]
    rate: float = 1.0
    count: int | None = 10
    event_type: str = "status"

    def __post_init__(self) -> None:
        if not math.isfinite(self.rate) or self.rate < 0:
            raise ValidationError("rate", "must be a finite number of events per second, 0 or more")
        if self.count is not None and self.count < 0:
            raise ValidationError("count", "must be 0 or more (or None to run until cancelled)")
        check_identifier("eventType", self.event_type)
        seen: set[str] = set()
        for cred in self.devices:
            if cred.device_id in seen:
                # Two connections with one client id would take each other over forever.
                raise ValidationError("devices", f"deviceId {cred.device_id!r} appears twice")
            seen.add(cred.device_id)


def obey(command: Command) -> Mapping[str, Any]:
    """What a simulated device does with a verified command: reports that it obeyed."""
    logger.info("device %s obeys %s (seq %d)", command.device_id, command.name, command.seq)
    return {"obeyed": command.name}


@dataclass(frozen=True)
class CommandSupport:
    """Simulated devices verify and answer signed commands (:mod:`iotvault.device`).

    ``state_dir`` holds one replay-state file per device (``<deviceId>.json``), so a device
    refuses replays across runs; None keeps the state in memory.
    """

    platform_key: CommandPublicKey
    state_dir: Path | None = None
    handler: Handler | None = obey

    def processor(self, cred: DeviceCredential) -> CommandProcessor:
        state = self.state_dir / f"{cred.device_id}.json" if self.state_dir is not None else None
        return CommandProcessor(
            CommandVerifier(self.platform_key, cred.device_id, type_id=cred.type_id),
            ReplayGuard(state, cred.device_id),
            self.handler,
        )


@dataclass
class SimulationReport:
    published: int
    acknowledged: int
    elapsed: float  # seconds from the start until every event was acknowledged (or timed out)

    @property
    def complete(self) -> bool:
        return self.acknowledged == self.published


def make_payload(device_id: str, seq: int, rng: random.Random) -> dict[str, object]:
    """A plausible sensor reading: 130-150 bytes of compact JSON.

    Each device has its own baseline (derived from its id) that drifts slowly with ``seq``;
    ``rng`` adds noise. ``d.seq`` numbers a device's events from 0, so a test can check that
    every event was stored exactly once.
    """
    base = zlib.crc32(device_id.encode())
    temperature = 18.0 + (base % 800) / 100 + 2.5 * math.sin(seq / 30) + rng.gauss(0, 0.15)
    humidity = 40.0 + (base >> 10) % 25 + 5 * math.cos(seq / 45) + rng.gauss(0, 0.5)
    now = datetime.now(UTC)
    return {
        "d": {
            "temperature": round(temperature, 2),
            "humidity": round(min(100.0, max(0.0, humidity)), 1),
            "pressure": round(1013.25 + ((base >> 20) % 30 - 15) + rng.gauss(0, 0.4), 1),
            "co2": 420 + (base >> 15) % 300 + rng.randint(-12, 12),
            "battery": max(1, 100 - (base >> 5) % 8 - seq // 250),
            "rssi": -45 - (base >> 25) % 35 + rng.randint(-3, 3),
            "seq": seq,
        },
        "ts": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


async def run_simulation(
    host: str,
    port: int,
    plan: SimulationPlan,
    *,
    ssl: SSLContext | None = None,
    on_progress: ProgressCallback | None = None,
    ack_timeout: float = 120.0,
    commands: CommandSupport | None = None,
) -> SimulationReport:
    """Connect every device at once, publish the plan, wait for every acknowledgement, close.

    If the acknowledgements have not all come within ``ack_timeout`` seconds after the last
    event was published, the report says how many did. A device whose credential is refused
    raises :class:`~iotvault.device.connection.DeviceRefusedError` (the first such, for all).
    With ``count=None`` it publishes until cancelled, then closes the devices and re-raises.
    """
    loop = asyncio.get_running_loop()
    devices = [
        DeviceConnection(
            cred, host, port, ssl=ssl, commands=commands.processor(cred) if commands is not None else None
        )
        for cred in plan.devices
    ]
    started = loop.time()
    elapsed = 0.0
    finished = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as tg:
            if on_progress is not None:
                tg.create_task(_report_progress(devices, on_progress, finished), name="simulation progress")
            try:
                await _publish_all(devices, plan)
                acked = await asyncio.gather(*(device.wait_acknowledged(ack_timeout) for device in devices))
                if not all(acked):
                    logger.warning(
                        "%d of %d devices still have unacknowledged events after %.0f s",
                        acked.count(False),
                        len(devices),
                        ack_timeout,
                    )
            finally:
                elapsed = loop.time() - started
                finished.set()
    except BaseExceptionGroup as group:
        errors = list(_leaves(group))
        if errors and all(isinstance(error, IotVaultError) for error in errors):
            # One clear error for the command line; the others are alike (same broker).
            raise errors[0] from None
        raise
    finally:
        await _close_all(devices)
    report = SimulationReport(*_totals(devices), elapsed=elapsed)
    if on_progress is not None:
        on_progress(report.published, report.acknowledged)
    return report


async def _publish_all(devices: Sequence[DeviceConnection], plan: SimulationPlan) -> None:
    async with asyncio.TaskGroup() as tg:
        for index, device in enumerate(devices):
            # Seeded per device so a run's payloads are reproducible; not used for secrets.
            rng = random.Random(f"{device.device_id}/{index}")  # noqa: S311
            tg.create_task(_drive(device, plan, rng), name=f"simulate {device.device_id}")


async def _drive(device: DeviceConnection, plan: SimulationPlan, rng: random.Random) -> None:
    """Connect one device, then publish its events on a fixed schedule (no drift)."""
    loop = asyncio.get_running_loop()
    await device.connect()
    interval = 1.0 / plan.rate if plan.rate > 0 else 0.0
    # A random phase, so a fleet does not publish in lockstep.
    start = loop.time() + rng.uniform(0, interval)
    seq = 0
    while plan.count is None or seq < plan.count:
        delay = start + seq * interval - loop.time()
        # Sleep even when late or unpaced: other devices and the acknowledgements need turns.
        await asyncio.sleep(max(0.0, delay))
        await device.publish_event(plan.event_type, make_payload(device.device_id, seq, rng))
        seq += 1


async def _report_progress(
    devices: Sequence[DeviceConnection], on_progress: ProgressCallback, finished: asyncio.Event
) -> None:
    last: tuple[int, int] | None = None
    while not finished.is_set():
        totals = _totals(devices)
        if totals != last:
            on_progress(*totals)
            last = totals
        try:
            async with asyncio.timeout(_PROGRESS_INTERVAL):
                await finished.wait()
        except TimeoutError:
            pass


async def _close_all(devices: Sequence[DeviceConnection]) -> None:
    results = await asyncio.gather(*(device.close() for device in devices), return_exceptions=True)
    for device, result in zip(devices, results, strict=True):
        if isinstance(result, BaseException):
            logger.warning("device %s did not close cleanly: %r", device.device_id, result)


def _totals(devices: Sequence[DeviceConnection]) -> tuple[int, int]:
    return sum(d.published for d in devices), sum(d.acknowledged for d in devices)


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            yield from _leaves(error)
        else:
            yield error
