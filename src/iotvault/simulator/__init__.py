"""Simulated devices that publish events over MQTT exactly as real devices do.

Each simulated device is the SDK's own connection (:class:`iotvault.device.DeviceConnection`,
at-least-once delivery across broker restarts); :func:`run_simulation` drives a fleet of them
for ``iotvault simulate``, ``iotvault demo`` and the integration tests.
"""

from iotvault.device.connection import DeviceCredential, DeviceRefusedError
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
    "SimulationPlan",
    "SimulationReport",
    "make_payload",
    "obey",
    "run_simulation",
]
