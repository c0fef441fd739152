"""``iotvault simulate``: simulated devices with real credentials, and proof that iotvault stored
what they sent.

A broker's PUBACK says only that *a* broker took the message. When the devices are this
installation's, the command then waits for the events to appear in its database and fails if
they do not: another broker on the port (a Mosquitto on 1883 while the demo's broker moved) must
never look like success. It connects to the port the running node recorded in its data dir
(``node.json``), unless ``--host``/``--port`` say otherwise.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from iotvault import nodefile
from iotvault.cli.common import CliState, setup_logging, state
from iotvault.config import Settings
from iotvault.errors import ConfigError, IngestNotConfirmedError

if TYPE_CHECKING:
    from iotvault.context import Context
    from iotvault.simulator import DeviceCredential

STORE_WAIT_S = 15.0
"""How long after the last acknowledgement the events may take to appear in the database."""


def simulator_extras(s: Settings, key_file: Path | None = None, *, registry: bool = True) -> tuple[Any, Any]:
    """Simulated devices obey signed commands (replay state under the data dir) and, with a
    TLS broker, verify it with ``broker_ca_file``.

    The platform key comes from ``key_file`` (PEM), else from this installation's database —
    unless the devices are not this installation's (``registry`` false): then they take no
    commands rather than trust a key made up on the spot.
    """
    from iotvault.broker.tls import client_context
    from iotvault.commands.keys import command_signing_key
    from iotvault.context import context
    from iotvault.crypto.signing import CommandPublicKey
    from iotvault.simulator import CommandSupport

    commands = None
    if key_file is not None:
        try:
            key = CommandPublicKey.from_text(key_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError("--command-key", f"{key_file}: not a public key ({exc})") from None
        commands = CommandSupport(key, s.data_dir / "simulator")
    elif registry:
        with context(s) as ctx:
            key = command_signing_key(ctx.store, ctx.master).public
        commands = CommandSupport(key, s.data_dir / "simulator")
    b = s.broker
    tls = (not b.embedded and b.tls) or (b.embedded and bool(s.mqtt_tls_cert_file) and not s.mqtt_tls_port)
    return commands, client_context(s.broker_ca_file) if tls else None


def broker_address(s: Settings, host: str | None, port: int | None) -> tuple[str, int]:
    """Where the devices connect: the options, else the running node's broker, else the settings."""
    b = s.broker
    if b.embedded:
        running = nodefile.read(s.data_dir)
        if running is not None and running.mqtt_port is not None:
            return host or running.mqtt_host or s.mqtt_host, port or running.mqtt_port
        return host or s.mqtt_host, port or s.mqtt_port
    return host or b.host, port or b.port


def _registered(ctx: Context, devices: int, prefix: str, type_id: str) -> list[DeviceCredential]:
    """``<prefix>-0001``…: registered if new, a fresh credential if not (only hashes are kept)."""
    from iotvault.devices import register_device, rotate_device_credential
    from iotvault.simulator import DeviceCredential

    creds = []
    for i in range(1, devices + 1):
        device_id = f"{prefix}-{i:04d}"
        dev = ctx.store.get_device(device_id)
        if dev is None:
            new = register_device(ctx, type_id, device_id, {"simulated": True})
            creds.append(DeviceCredential(device_id, type_id, new.credential))
        else:
            creds.append(DeviceCredential(device_id, dev.type_id, rotate_device_credential(ctx, device_id)))
    return creds


def _read_credentials(path: Path) -> list[DeviceCredential]:
    from iotvault.simulator import DeviceCredential

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return [DeviceCredential(d["deviceId"], d["typeId"], d["password"]) for d in doc]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            "--credentials", f"{path}: expected a JSON list of deviceId/typeId/password ({exc})"
        ) from None


def _stored(ctx: Context, device_ids: list[str]) -> int:
    return sum(ctx.store.count_events(d) for d in device_ids)


def simulate(
    cli: typer.Context,
    devices: Annotated[int, typer.Option(min=1, max=100_000, help="Number of simulated devices.")] = 5,
    rate: Annotated[
        float, typer.Option(min=0.0, help="Events per second per device (0: as fast as possible).")
    ] = 1.0,
    count: Annotated[int, typer.Option(min=0, help="Events per device (0: until interrupted).")] = 10,
    type_id: Annotated[str, typer.Option("--type", help="typeId of the simulated devices.")] = "sim",
    prefix: Annotated[str, typer.Option(help="deviceId prefix; devices are <prefix>-0001, ...")] = "sim",
    credentials: Annotated[
        Path | None,
        typer.Option(help="JSON list of {deviceId, typeId, password} instead of registering devices."),
    ] = None,
    command_key: Annotated[
        Path | None,
        typer.Option(
            "--command-key",
            dir_okay=False,
            help="Platform public key (PEM) to verify commands with; default: this installation's "
            "(with --credentials and no key, the devices take no commands).",
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Broker host (default: the running node's, else the settings).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Broker port (default: the running node's, else the settings).")
    ] = None,
) -> None:
    """Publish events from simulated devices with real device credentials, with a progress bar."""
    from iotvault.context import context

    st = state(cli)
    s = st.settings
    setup_logging("warning")
    if credentials is not None:
        creds = _read_credentials(credentials)
        before = None  # another installation's devices: storage cannot be checked here
    else:
        with context(s) as ctx:
            creds = _registered(ctx, devices, prefix, type_id)
            before = _stored(ctx, [c.device_id for c in creds])
    h, p = broker_address(s, host, port)
    acknowledged = _publish(
        st, s, creds, h, p, rate=rate, count=count, command_key=command_key, registry=before is not None
    )
    total = len(creds) * count if count else None
    if before is not None:
        _confirm_stored(st, s, [c.device_id for c in creds], before, acknowledged, f"{h}:{p}")
    if total is not None and acknowledged < total:
        raise typer.Exit(1)


def _publish(
    st: CliState,
    s: Settings,
    creds: list[DeviceCredential],
    host: str,
    port: int,
    *,
    rate: float,
    count: int,
    command_key: Path | None,
    registry: bool,
) -> int:
    from iotvault.simulator import SimulationPlan, run_simulation

    commands, device_ssl = simulator_extras(s, command_key, registry=registry)
    plan = SimulationPlan(devices=creds, rate=rate, count=count or None, event_type="reading")
    total = len(creds) * count if count else None
    with Progress(
        TextColumn("[bold]simulate"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("acknowledged"),
        TimeElapsedColumn(),
        console=st.err,
        transient=False,
    ) as progress:
        task = progress.add_task("events", total=total)

        def on_progress(published: int, acknowledged: int) -> None:
            progress.update(task, completed=acknowledged)

        report = asyncio.run(
            run_simulation(host, port, plan, on_progress=on_progress, ssl=device_ssl, commands=commands)
        )
    st.err.print(
        f"published {report.published}, acknowledged {report.acknowledged} in {report.elapsed:.1f}s "
        f"({report.acknowledged / max(report.elapsed, 1e-9):.0f} events/s)"
    )
    return report.acknowledged


def _confirm_stored(
    st: CliState, s: Settings, device_ids: list[str], before: int, acknowledged: int, broker: str
) -> None:
    """Wait until iotvault's database holds what the broker acknowledged; else fail."""
    from iotvault.context import context

    with context(s) as ctx:
        stored = _stored(ctx, device_ids) - before
        last, deadline = stored, time.monotonic() + STORE_WAIT_S
        while stored < acknowledged and time.monotonic() < deadline:
            time.sleep(0.2)
            stored = _stored(ctx, device_ids) - before
            if stored > last:  # still arriving: give the rest the same time again
                last, deadline = stored, time.monotonic() + STORE_WAIT_S
    if stored < acknowledged:
        raise IngestNotConfirmedError(broker, acknowledged, stored, str(s.data_dir.resolve()))
    st.err.print(f"stored {stored} (confirmed in iotvault's database)")
