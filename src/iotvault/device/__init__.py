"""The device-side SDK: verify the platform's signed commands, refuse replays, answer them.

For a device written in Python (or a gateway speaking for devices)::

    from iotvault.device import CommandPublicKey, DeviceClient, DeviceCredential

    key = CommandPublicKey.from_text(open("platform-command-key.pem").read())

    async def on_command(command):
        if command.name == "setInterval":
            interval = int(command.payload["seconds"])
            return {"interval": interval}
        raise CommandRejectedError("unsupported")

    async with DeviceClient(DeviceCredential("kitchen-1", "thermo", password), "broker", 8883,
                            ssl=ssl_context, platform_key=key,
                            state_file=Path("/var/lib/thermo/commands.json"),
                            on_command=on_command) as device:
        await device.publish_event("reading", {"d": {"temperature": 21.5}})

A device in another language implements the same checks (README, "Commands on the device"):
:mod:`.verify` (signature, addressee, topic, time) and :mod:`.replay` (the ``seq`` window and
nonces, saved before the handler runs) are small enough to port.
"""

from iotvault.crypto.signing import CommandPublicKey
from iotvault.device.client import DeviceClient
from iotvault.device.connection import DeviceConnection, DeviceCredential, DeviceRefusedError
from iotvault.device.processor import CommandProcessor, Handler
from iotvault.device.replay import ReplayGuard
from iotvault.device.verify import Command, CommandVerifier
from iotvault.domain.commands import Ack, Reason
from iotvault.errors import CommandRejectedError

__all__ = [
    "Ack",
    "Command",
    "CommandProcessor",
    "CommandPublicKey",
    "CommandRejectedError",
    "CommandVerifier",
    "DeviceClient",
    "DeviceConnection",
    "DeviceCredential",
    "DeviceRefusedError",
    "Handler",
    "Reason",
    "ReplayGuard",
]
