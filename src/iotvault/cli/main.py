"""The ``iotvault`` command.

Errors of the :mod:`iotvault.errors` tree end the program with one line on stderr and a
non-zero exit code; a traceback means a bug. Secrets (device credentials) are printed once, at
the moment they are made, and never again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from iotvault import __version__
from iotvault.config import Settings, load_settings
from iotvault.errors import ConfigError, IotVaultError, RecordDecryptionError
from iotvault.runtime import context, delete_device, register_device, rotate_device_credential

app = typer.Typer(
    name="iotvault",
    help="A self-hosted, secure back end for IoT applications.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
keys_app = typer.Typer(help="Encryption keys.", no_args_is_help=True)
devices_app = typer.Typer(help="Device registry and credentials.", no_args_is_help=True)
events_app = typer.Typer(help="Stored events (decrypted on the way out).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(devices_app, name="devices")
app.add_typer(events_app, name="events")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML file of settings (names as the IOTVAULT_ variables, lower case, no prefix).",
        exists=False,
        dir_okay=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


class _State:
    config: Path | None = None


def settings() -> Settings:
    return load_settings(_State.config)


@app.callback()
def main(config: ConfigOption = None) -> None:
    """iotvault: encrypted MQTT ingest, a role-based device data API, an OpenID Connect provider."""
    _State.config = config


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("amqtt", "transitions", "gmqtt", "uvicorn.error", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _iso(us: int | None) -> str:
    if us is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(us / 1e6)) + f".{(us // 1000) % 1000:03d}Z"


# ---- serve / demo / simulate ---------------------------------------------------------
@app.command()
def version() -> None:
    """Print the version."""
    out.print(__version__)


@app.command()
def serve(
    role: Annotated[str, typer.Option(help="all, api (HTTP only) or ingest (ingest only).")] = "all",
) -> None:
    """Run one node: HTTP API, ingest worker and (with broker 'embedded') the MQTT broker."""
    from iotvault.node import Node, Role  # imported here: the admin commands need none of it

    try:
        r = Role(role)
    except ValueError:
        raise ConfigError("--role", f"{role!r} is not one of all, api, ingest") from None
    s = settings()
    _setup_logging(s.log_level)

    def ready(node: Node) -> None:
        parts = []
        if r in (Role.ALL, Role.API):
            parts.append(f"HTTP on http://{s.http_host}:{s.http_port}")
        if node.broker is not None:
            parts.append(f"embedded MQTT broker on {s.mqtt_host}:{node.broker.port}")
        elif r in (Role.ALL, Role.INGEST):
            parts.append(f"ingesting from {s.broker.display}")
        err.print(f"iotvault {__version__} ready: " + ", ".join(parts), highlight=False)

    try:
        asyncio.run(Node(s, r).run(ready))
    except asyncio.CancelledError:
        err.print("iotvault: stopped before it was ready")
        raise typer.Exit(1) from None


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


DEMO_DEVICES = (
    ("demo-sensor", "demo-thermo-1"),
    ("demo-sensor", "demo-thermo-2"),
    ("demo-meter", "demo-meter-1"),
)


@app.command()
def demo(
    rate: Annotated[float, typer.Option(help="Events per second per simulated device.")] = 1.0,
) -> None:
    """Serve with the embedded defaults, create demo devices, and run the device simulator."""
    import os
    from dataclasses import replace

    from iotvault.node import Node
    from iotvault.simulator import DeviceCredential, SimulationPlan, run_simulation

    s = settings()
    _setup_logging(s.log_level)
    if not s.broker.embedded:
        raise ConfigError("broker_url", "the demo runs the embedded broker; unset IOTVAULT_BROKER_URL")
    if "IOTVAULT_MQTT_PORT" not in os.environ and not _port_free(s.mqtt_host, s.mqtt_port):
        with socket.socket() as sock:
            sock.bind((s.mqtt_host, 0))
            free = sock.getsockname()[1]
        err.print(
            f"port {s.mqtt_port} is taken (another MQTT broker?); the demo's broker uses {free} instead"
        )
        s = replace(s, mqtt_port=free)
    creds: list[DeviceCredential] = []
    with context(s) as ctx:
        for type_id, device_id in DEMO_DEVICES:
            if ctx.store.get_device(device_id) is None:
                new = register_device(ctx, type_id, device_id, {"demo": True})
                creds.append(DeviceCredential(device_id, type_id, new.credential))
            else:  # stored only as a hash: give the simulator a fresh one
                creds.append(DeviceCredential(device_id, type_id, rotate_device_credential(ctx, device_id)))
    err.print(f"demo devices: {', '.join(d for _, d in DEMO_DEVICES)} (credentials held by the simulator)")
    err.print(f"watch them arrive: iotvault events tail {DEMO_DEVICES[0][1]} --follow")

    async def main() -> None:
        node = Node(s)
        started = asyncio.Event()
        node_task = asyncio.create_task(node.run(lambda _n: started.set()))
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait({node_task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if node_task.done():
            waiter.cancel()
            node_task.result()
            return
        port = node.broker.port if node.broker is not None else s.mqtt_port
        err.print(f"iotvault demo ready: HTTP on http://{s.http_host}:{s.http_port}, MQTT on port {port}")
        sim = asyncio.create_task(
            run_simulation(
                s.mqtt_host, port, SimulationPlan(devices=creds, rate=rate, count=None, event_type="reading")
            )
        )
        done, _ = await asyncio.wait({node_task, sim}, return_when=asyncio.FIRST_COMPLETED)
        sim.cancel()
        node.stop()
        await asyncio.gather(node_task, sim, return_exceptions=True)
        for t in done:
            if t is node_task:
                t.result()

    asyncio.run(main())


@app.command()
def simulate(
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
    host: Annotated[str | None, typer.Option(help="Broker host (default: from the settings).")] = None,
    port: Annotated[int | None, typer.Option(help="Broker port (default: from the settings).")] = None,
) -> None:
    """Publish events from simulated devices with real device credentials, with a progress bar."""
    from iotvault.simulator import DeviceCredential, SimulationPlan, run_simulation

    s = settings()
    _setup_logging("warning")
    creds: list[DeviceCredential] = []
    if credentials is not None:
        try:
            doc = json.loads(credentials.read_text(encoding="utf-8"))
            creds = [DeviceCredential(d["deviceId"], d["typeId"], d["password"]) for d in doc]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                "--credentials", f"{credentials}: expected a JSON list of deviceId/typeId/password ({exc})"
            ) from None
    else:
        with context(s) as ctx:
            for i in range(1, devices + 1):
                device_id = f"{prefix}-{i:04d}"
                if ctx.store.get_device(device_id) is None:
                    new = register_device(ctx, type_id, device_id, {"simulated": True})
                    creds.append(DeviceCredential(device_id, type_id, new.credential))
                else:
                    dev = ctx.store.get_device(device_id)
                    assert dev is not None  # noqa: S101
                    creds.append(
                        DeviceCredential(device_id, dev.type_id, rotate_device_credential(ctx, device_id))
                    )
    b = s.broker
    h = host or (s.mqtt_host if b.embedded else b.host)
    p = port or (s.mqtt_port if b.embedded else b.port)
    plan = SimulationPlan(devices=creds, rate=rate, count=count or None, event_type="reading")
    total = len(creds) * count if count else None
    with Progress(
        TextColumn("[bold]simulate"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("acknowledged"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as progress:
        task = progress.add_task("events", total=total)

        def on_progress(published: int, acknowledged: int) -> None:
            progress.update(task, completed=acknowledged)

        report = asyncio.run(run_simulation(h, p, plan, on_progress=on_progress))
    err.print(
        f"published {report.published}, acknowledged {report.acknowledged} in {report.elapsed:.1f}s "
        f"({report.acknowledged / max(report.elapsed, 1e-9):.0f} events/s)"
    )
    if total is not None and report.acknowledged < total:
        raise typer.Exit(1)


# ---- db ------------------------------------------------------------------------------
@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create the schema or upgrade it to this version's revision."""
    from iotvault.storage import migrate
    from iotvault.storage.db import check_connection, create_db_engine, redact

    s = settings()
    url = s.effective_database_url
    engine = create_db_engine(url, sqlite_synchronous=s.sqlite_synchronous)
    try:
        check_connection(engine, url)
        before = migrate.current_revision(engine)
        migrate.upgrade(engine)
        after = migrate.current_revision(engine)
    finally:
        engine.dispose()
    out.print(f"{redact(url)}: schema {before or 'none'} -> {after}")


# ---- keys ----------------------------------------------------------------------------
@keys_app.command("rotate")
def keys_rotate(
    reencrypt: Annotated[bool, typer.Option(help="Also rewrite stored events under the new keys.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Start a new data-key version for every device; old events stay readable."""
    s = settings()
    with context(s) as ctx:
        ids = ctx.store.device_ids()
        versions = {d: ctx.keyring.rotate(d) for d in ids}
        rewritten = _reencrypt(ctx, ids) if reencrypt else 0
    if json_out:
        out.print_json(json.dumps({"devices": versions, "reencrypted": rewritten}))
    else:
        out.print(
            f"rotated the data keys of {len(versions)} devices"
            + (f"; re-encrypted {rewritten} events" if reencrypt else "")
        )


def _reencrypt(ctx: Any, device_ids: list[str]) -> int:
    total = ctx.store.count_events()
    rewritten = 0
    with Progress(
        TextColumn("[bold]re-encrypt"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as progress:
        task = progress.add_task("events", total=total)
        for device_id in device_ids:
            after: str | None = "0"
            while True:
                page = ctx.store.events_page(device_id, count=500, after=after)
                if not page:
                    break
                rows = []
                for e in page:
                    if ctx.keyring.needs_reencrypt(e.device_id, e.event_id, e.payload):
                        plain = ctx.keyring.decrypt(e.device_id, e.event_id, e.payload)
                        rows.append(
                            (e.device_id, e.event_id, ctx.keyring.encrypt(e.device_id, e.event_id, plain))
                        )
                ctx.store.replace_payloads(rows)
                rewritten += len(rows)
                progress.advance(task, len(page))
                after = page[-1].event_id
    return rewritten


# ---- devices -------------------------------------------------------------------------
@devices_app.command("register")
def devices_register(
    type_id: Annotated[str, typer.Argument(metavar="TYPE", help="typeId")],
    device_id: Annotated[str, typer.Argument(metavar="ID", help="deviceId")],
    json_out: JsonOption = False,
) -> None:
    """Register a device; prints its credential once (only a hash is kept)."""
    with context(settings()) as ctx:
        new = register_device(ctx, type_id, device_id)
    if json_out:
        out.print_json(
            json.dumps({"deviceId": new.device_id, "typeId": new.type_id, "password": new.credential})
        )
    else:
        out.print(f"registered {new.type_id}/{new.device_id}")
        out.print(f"credential (shown once, store it on the device): {new.credential}", highlight=False)


@devices_app.command("list")
def devices_list(json_out: JsonOption = False) -> None:
    """List registered devices."""
    with context(settings()) as ctx:
        devs = ctx.store.list_devices()
    if json_out:
        out.print_json(
            json.dumps(
                [
                    {
                        "deviceId": d.device_id,
                        "typeId": d.type_id,
                        "status": d.status,
                        "lastSeen": _iso(d.last_seen_us) if d.last_seen_us else None,
                    }
                    for d in devs
                ]
            )
        )
        return
    table = Table("deviceId", "typeId", "status", "lastSeen")
    for d in devs:
        table.add_row(d.device_id, d.type_id, d.status, _iso(d.last_seen_us))
    out.print(table)


@devices_app.command("rotate-credential")
def devices_rotate(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    grace: Annotated[int, typer.Option(min=0, help="Seconds the old credential stays valid.")] = 0,
    json_out: JsonOption = False,
) -> None:
    """Give a device a new credential (printed once)."""
    with context(settings()) as ctx:
        cred = rotate_device_credential(ctx, device_id, grace_s=grace)
    if json_out:
        out.print_json(json.dumps({"deviceId": device_id, "password": cred}))
    else:
        out.print(f"new credential for {device_id} (shown once): {cred}", highlight=False)


@devices_app.command("delete")
def devices_delete(
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a device, its events and its data keys (crypto-shredding)."""
    if not yes:
        typer.confirm(f"Delete {device_id}, all its events and its keys? This cannot be undone", abort=True)
    with context(settings()) as ctx:
        delete_device(ctx, device_id)
    out.print(f"deleted {device_id}; its data keys are destroyed")


# ---- events --------------------------------------------------------------------------
@events_app.command("tail")
def events_tail(
    device_id: Annotated[str, typer.Argument(metavar="DEVICE")],
    count: Annotated[int, typer.Option(min=1, max=1000, help="How many of the latest events.")] = 10,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Show a device's latest stored events, decrypted."""
    from iotvault.errors import DeviceNotFoundError

    with context(settings()) as ctx:
        if ctx.store.get_device(device_id) is None:
            raise DeviceNotFoundError(device_id)
        events = list(reversed(ctx.store.last_events(device_id, count)))
        last: str | None = None
        while True:
            for e in events:
                try:
                    payload: Any = json.loads(ctx.keyring.decrypt(e.device_id, e.event_id, e.payload))
                except RecordDecryptionError as exc:
                    payload = {"error": exc.reason}
                doc = {
                    "eventId": e.event_id,
                    "deviceId": e.device_id,
                    "typeId": e.type_id,
                    "eventType": e.event_type,
                    "format": e.fmt,
                    "timestamp": _iso(e.received_us),
                    "payload": payload,
                }
                if json_out:
                    sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
                else:
                    out.print(f"{doc['timestamp']} {e.event_type} {json.dumps(payload)}", highlight=False)
                last = e.event_id
            sys.stdout.flush()
            if not follow:
                return
            time.sleep(1.0)
            events = (
                ctx.store.events_page(device_id, count=1000, after=last)
                if last
                else list(reversed(ctx.store.last_events(device_id, count)))
            )


def run() -> None:
    try:
        app()
    except IotVaultError as exc:
        # one plain line, never wrapped or styled: scripts and people both read it
        sys.stderr.write(f"iotvault: error: {' '.join(str(exc).split())}\n")
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)
