"""Simulated devices that publish events over MQTT exactly as real devices do.

:class:`SimulatedDevice` is one device with at-least-once delivery across broker restarts;
:func:`run_simulation` drives a fleet of them for ``iotvault simulate``, ``iotvault demo`` and
the integration tests.
"""

from iotvault.simulator.device import DeviceCredential, DeviceRefusedError, SimulatedDevice
from iotvault.simulator.run import (
    CommandSupport,
    SimulationPlan,
    SimulationReport,
    make_payload,
    obey,
    run_simulation,
)

__all__ = [
    "CommandSupport",
    "DeviceCredential",
    "DeviceRefusedError",
    "SimulatedDevice",
    "SimulationPlan",
    "SimulationReport",
    "make_payload",
    "obey",
    "run_simulation",
]
