"""The ``iotvault`` command.

Errors of the :mod:`iotvault.errors` tree end the program with one line on stderr and a
non-zero exit code; a traceback means a bug. Secrets (device credentials) are printed once, at
the moment they are made, and never again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from iotvault import __version__
from iotvault import accounts as account_services
from iotvault.config import Settings, load_settings
from iotvault.context import Context, context
from iotvault.devices import delete_device, register_device, rotate_device_credential
from iotvault.documents import api_key_doc, client_doc, group_doc, iso, user_doc
from iotvault.domain.accounts import Roles
from iotvault.errors import ConfigError, IotVaultError, RecordDecryptionError
from iotvault.storage.accounts import GroupNotFoundError

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
YesOption = Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")]
IdArg = Annotated[str, typer.Argument(metavar="ID")]
NameArg = Annotated[str, typer.Argument(metavar="NAME")]
GroupArg = Annotated[str, typer.Argument(metavar="GROUP")]
UserArg = Annotated[str, typer.Argument(metavar="USER")]
DeviceArg = Annotated[str, typer.Argument(metavar="DEVICE")]


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
    """A time for a person: as in the JSON documents, and ``-`` for none."""
    return iso(us) or "-"


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
    from iotvault.node import Node, Role, tune_gc_for_serving  # the admin commands need none of it

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
        tune_gc_for_serving()

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


def _demo_accounts(ctx: Any) -> list[tuple[str, str]]:
    """On first start: a group that reads and commands the demo devices, an admin group, and
    one user in each. Returns the (user, generated password) pairs made now."""
    from iotvault.accounts import create_group, create_user
    from iotvault.domain.accounts import Roles

    made: list[tuple[str, str]] = []
    if ctx.accounts.get_group("demo-operators") is None:
        create_group(
            ctx,
            "demo-operators",
            "Demo operators",
            roles=Roles(reader=True, writer=True),
            devices=[d for _, d in DEMO_DEVICES],
        )
    if ctx.accounts.get_group("demo-admins") is None:
        create_group(ctx, "demo-admins", "Demo administrators", roles=Roles(admin=True))
    for user, group in (("demo", "demo-operators"), ("admin", "demo-admins")):
        if ctx.accounts.get_user(user) is None:
            made.append((user, create_user(ctx, user, user.title(), groups=[group])))
    return made


def _on_stop_signals(callback: Callable[[], object]) -> None:
    """Run ``callback`` on SIGINT and SIGTERM, in place of what the running loop had."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, callback)


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
        accounts_made = _demo_accounts(ctx)
    for user, password in accounts_made:
        err.print(f"demo user {user!r} created; password (shown once): {password}", highlight=False)
    commands, _ = _simulator_extras(s)
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
                s.mqtt_host,
                port,
                SimulationPlan(devices=creds, rate=rate, count=None, event_type="reading"),
                commands=commands,
            )
        )
        # Ctrl-C: the simulated devices disconnect first, then the node stops, so no device
        # sees its broker vanish under it (this replaces the node's own signal handlers)
        _on_stop_signals(sim.cancel)
        done, _ = await asyncio.wait({node_task, sim}, return_when=asyncio.FIRST_COMPLETED)
        sim.cancel()
        await asyncio.gather(sim, return_exceptions=True)  # its devices say "disconnected", leave
        node.stop()
        await asyncio.gather(node_task, return_exceptions=True)
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
    command_key: Annotated[
        Path | None,
        typer.Option(
            "--command-key",
            dir_okay=False,
            help="Platform public key (PEM) to verify commands with; default: this installation's "
            "(with --credentials and no key, the devices take no commands).",
        ),
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
    commands, device_ssl = _simulator_extras(s, command_key, registry=credentials is None)
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

        report = asyncio.run(
            run_simulation(h, p, plan, on_progress=on_progress, ssl=device_ssl, commands=commands)
        )
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
    signing: Annotated[
        bool,
        typer.Option(
            "--signing",
            help="Rotate the OpenID Connect token-signing key instead of the device data keys; "
            "the old key stays in the JWKS until the tokens it signed have expired.",
        ),
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """Start a new data-key version for every device (old events stay readable), or with
    --signing a new token-signing key for the OpenID Connect provider."""
    if signing and reencrypt:
        raise typer.BadParameter("--signing rotates the token-signing key only; run --reencrypt on its own")
    s = settings()
    if signing:
        _rotate_signing_key(s, json_out)
        return
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


def _rotate_signing_key(s: Settings, json_out: bool) -> None:
    from iotvault.identity import IdentityProvider

    with context(s) as ctx:
        provider = IdentityProvider(s, ctx)
        kid, retired, until = provider.keys.rotate()
        provider.housekeeping(force=True)  # drops keys whose tokens have all expired
    if json_out:
        out.print_json(
            json.dumps({"signing": {"kid": kid, "retired": retired, "publishedUntil": _iso(until)}})
        )
        return
    out.print(f"token-signing key {kid} signs from now on", highlight=False)
    if retired:
        out.print(f"{', '.join(retired)} stay published until {_iso(until)}", highlight=False)


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
    device_id: IdArg,
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
def devices_delete(device_id: IdArg, yes: YesOption = False) -> None:
    """Delete a device, its events and its data keys (crypto-shredding)."""
    if not yes:
        typer.confirm(f"Delete {device_id}, all its events and its keys? This cannot be undone", abort=True)
    with context(settings()) as ctx:
        delete_device(ctx, device_id)
    out.print(f"deleted {device_id}; its data keys are destroyed")


# ---- events --------------------------------------------------------------------------
@events_app.command("tail")
def events_tail(
    device_id: DeviceArg,
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


# ---- users, groups, API keys ---------------------------------------------------------
users_app = typer.Typer(
    help="People who log in: passwords (argon2id), attributes, groups.", no_args_is_help=True
)
groups_app = typer.Typer(help="Groups: roles on a list of devices, and their members.", no_args_is_help=True)
apikeys_app = typer.Typer(help="API keys for third-party programs (HTTP Basic).", no_args_is_help=True)
seed_app = typer.Typer(help="Import the seed's user and userGroup documents.", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(groups_app, name="groups")
app.add_typer(apikeys_app, name="apikeys")
app.add_typer(seed_app, name="seed")

PasswordStdinOption = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
]


def _password_from_stdin() -> str:
    line = sys.stdin.readline()
    return line.removesuffix("\n").removesuffix("\r")


def _attributes(pairs: list[str]) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--attribute")
        attrs[key] = value
    return attrs


def _roles_text(roles: Roles) -> str:
    return ", ".join(n.removeprefix("role").lower() for n in roles.names()) or "-"


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(metavar="NAME", help="userName")],
    display_name: Annotated[str | None, typer.Option(help="Display name (default: NAME).")] = None,
    group: Annotated[
        list[str] | None, typer.Option("--group", "-g", help="A group to join (repeat).")
    ] = None,
    attribute: Annotated[
        list[str] | None, typer.Option("--attribute", "-a", help="KEY=VALUE, e.g. Language=en (repeat).")
    ] = None,
    password_stdin: PasswordStdinOption = False,
    json_out: JsonOption = False,
) -> None:
    """Create a user; prints its generated password once (unless given on stdin)."""
    given = _password_from_stdin() if password_stdin else None
    attrs = _attributes(attribute or [])
    with context(settings()) as ctx:
        password = account_services.create_user(
            ctx, name, display_name, password=given, attributes=attrs, groups=group or []
        )
        user = ctx.accounts.get_user(name)
    assert user is not None  # noqa: S101 - just made
    if json_out:
        doc = user_doc(user)
        if given is None:
            doc["password"] = password
        out.print_json(json.dumps(doc))
        return
    out.print(f"created user {user.user_name}" + (f" in {', '.join(user.groups)}" if user.groups else ""))
    if given is None:
        out.print(f"password (shown once): {password}", highlight=False)


@users_app.command("list")
def users_list(json_out: JsonOption = False) -> None:
    """List users (never their passwords)."""
    with context(settings()) as ctx:
        users = ctx.accounts.list_users()
    if json_out:
        out.print_json(json.dumps([user_doc(u) for u in users]))
        return
    table = Table(Column("userName", overflow="fold"), "displayName", "groups", "disabled", "created")
    for u in users:
        table.add_row(
            u.user_name, u.display_name, ", ".join(u.groups), "yes" if u.disabled else "", _iso(u.created_us)
        )
    out.print(table)


def _set_disabled(name: str, *, disabled: bool) -> None:
    with context(settings()) as ctx:
        account_services.update_user(ctx, name, disabled=disabled)
    out.print(f"{'disabled' if disabled else 'enabled'} {name}")


@users_app.command("disable")
def users_disable(name: NameArg) -> None:
    """Refuse the user's logins until it is enabled again."""
    _set_disabled(name, disabled=True)


@users_app.command("enable")
def users_enable(name: NameArg) -> None:
    """Allow a disabled user to log in again."""
    _set_disabled(name, disabled=False)


@users_app.command("set-password")
def users_set_password(
    name: NameArg,
    password_stdin: PasswordStdinOption = False,
    json_out: JsonOption = False,
) -> None:
    """Set a user's password: from stdin, or generated and printed once."""
    with context(settings()) as ctx:
        if password_stdin:
            account_services.set_password(ctx, name, _password_from_stdin())
            password = None
        else:
            password = account_services.reset_password(ctx, name)
    if json_out:
        out.print_json(json.dumps({"userName": name, **({"password": password} if password else {})}))
    elif password is None:
        out.print(f"password of {name} changed")
    else:
        out.print(f"new password of {name} (shown once): {password}", highlight=False)


@users_app.command("delete")
def users_delete(name: NameArg, yes: YesOption = False) -> None:
    """Delete a user and its group memberships."""
    if not yes:
        typer.confirm(f"Delete user {name}?", abort=True)
    with context(settings()) as ctx:
        account_services.delete_user(ctx, name)
    out.print(f"deleted user {name}")


@groups_app.command("add")
def groups_add(
    name: Annotated[str, typer.Argument(metavar="NAME", help="groupName")],
    display_name: Annotated[str | None, typer.Option(help="Display name (default: NAME).")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="roleAdmin: manage accounts and devices.")] = False,
    reader: Annotated[bool, typer.Option("--reader", help="roleReader: read the group's devices.")] = False,
    writer: Annotated[
        bool, typer.Option("--writer", help="roleWriter: command the group's devices.")
    ] = False,
    device: Annotated[list[str] | None, typer.Option("--device", "-d", help="A deviceId (repeat).")] = None,
    json_out: JsonOption = False,
) -> None:
    """Create a group giving its roles on its devices to its members."""
    with context(settings()) as ctx:
        group = account_services.create_group(
            ctx, name, display_name, roles=Roles(admin, reader, writer), devices=device or []
        )
    if json_out:
        out.print_json(json.dumps(group_doc(group)))
    else:
        out.print(
            f"created group {group.group_name} (roles: {_roles_text(group.roles)}; "
            f"{len(group.devices)} devices)"
        )


@groups_app.command("list")
def groups_list(json_out: JsonOption = False) -> None:
    """List groups with their roles, devices and members."""
    with context(settings()) as ctx:
        groups = ctx.accounts.list_groups()
    if json_out:
        out.print_json(json.dumps([group_doc(g) for g in groups]))
        return
    table = Table(Column("groupName", overflow="fold"), "displayName", "roles", "devices", "members")
    for g in groups:
        table.add_row(
            g.group_name, g.display_name, _roles_text(g.roles), ", ".join(g.devices), ", ".join(g.members)
        )
    out.print(table)


@groups_app.command("delete")
def groups_delete(name: NameArg, yes: YesOption = False) -> None:
    """Delete a group: its members lose what it granted; API keys that named it forget it."""
    if not yes:
        typer.confirm(f"Delete group {name}?", abort=True)
    with context(settings()) as ctx:
        account_services.delete_group(ctx, name)
    out.print(f"deleted group {name}")


def _change_group(
    change: Callable[[Context, str, str], bool], group: str, item: str, *, adding: bool
) -> None:
    """Add a member or device to a group, or take it out; say whether anything changed."""
    with context(settings()) as ctx:
        changed = change(ctx, group, item)
    if adding:
        outcome = "added to" if changed else "was already in"
    else:
        outcome = "removed from" if changed else "was not in"
    out.print(f"{item} {outcome} {group}")


@groups_app.command("add-member")
def groups_add_member(group: GroupArg, user: UserArg) -> None:
    """Add a user to a group."""
    _change_group(account_services.add_member, group, user, adding=True)


@groups_app.command("remove-member")
def groups_remove_member(group: GroupArg, user: UserArg) -> None:
    """Remove a user from a group."""
    _change_group(account_services.remove_member, group, user, adding=False)


@groups_app.command("add-device")
def groups_add_device(group: GroupArg, device_id: DeviceArg) -> None:
    """Give a group's roles on a device (which need not be registered yet)."""
    _change_group(account_services.add_group_device, group, device_id, adding=True)


@groups_app.command("remove-device")
def groups_remove_device(group: GroupArg, device_id: DeviceArg) -> None:
    """Take a device out of a group."""
    _change_group(account_services.remove_group_device, group, device_id, adding=False)


@groups_app.command("set-roles")
def groups_set_roles(
    group: GroupArg,
    admin: Annotated[bool | None, typer.Option("--admin/--no-admin", help="roleAdmin.")] = None,
    reader: Annotated[bool | None, typer.Option("--reader/--no-reader", help="roleReader.")] = None,
    writer: Annotated[bool | None, typer.Option("--writer/--no-writer", help="roleWriter.")] = None,
) -> None:
    """Change a group's roles; roles not named stay as they are."""
    with context(settings()) as ctx:
        current = ctx.accounts.get_group(group)
        if current is None:
            raise GroupNotFoundError(group)
        roles = current.roles.changed(admin=admin, reader=reader, writer=writer)
        updated = account_services.update_group(ctx, group, roles=roles)
    out.print(f"roles of {group}: {_roles_text(updated.roles)}")


@apikeys_app.command("add")
def apikeys_add(
    reader: Annotated[bool, typer.Option("--reader", help="Read its devices' events.")] = False,
    writer: Annotated[bool, typer.Option("--writer", help="Command its devices.")] = False,
    admin: Annotated[bool, typer.Option("--admin", help="Manage accounts and devices.")] = False,
    device: Annotated[list[str] | None, typer.Option("--device", "-d", help="A deviceId (repeat).")] = None,
    group: Annotated[
        list[str] | None, typer.Option("--group", "-g", help="A group whose devices it may use (repeat).")
    ] = None,
    expires_in: Annotated[
        int | None, typer.Option("--expires-in", min=1, max=3650, metavar="DAYS", help="Expire after DAYS.")
    ] = None,
    description: Annotated[str, typer.Option(help="What the key is for.")] = "",
    json_out: JsonOption = False,
) -> None:
    """Create an API key; prints its key and password once (only a hash is kept)."""
    from iotvault.clock import now_us

    with context(settings()) as ctx:
        expires = now_us() + expires_in * 86_400_000_000 if expires_in else None
        new = account_services.create_api_key(
            ctx,
            roles=Roles(admin, reader, writer),
            devices=device or [],
            groups=group or [],
            expires_us=expires,
            description=description,
            created_by="cli",
        )
        found = ctx.accounts.get_api_key(new.key)
    assert found is not None  # noqa: S101 - just made
    if json_out:
        out.print_json(json.dumps({**api_key_doc(found[0]), "password": new.password}))
        return
    out.print(f"created API key {new.key} (roles: {_roles_text(found[0].roles)})", highlight=False)
    out.print(f"password (shown once): {new.password}", highlight=False)
    out.print("use it as HTTP Basic credentials: Authorization: Basic base64(key:password)")


@apikeys_app.command("list")
def apikeys_list(json_out: JsonOption = False) -> None:
    """List API keys (never their passwords)."""
    with context(settings()) as ctx:
        keys = ctx.accounts.list_api_keys()
    if json_out:
        out.print_json(json.dumps([api_key_doc(k) for k in keys]))
        return
    table = Table(
        Column("key", no_wrap=True, min_width=22),
        "roles",
        "devices",
        "groups",
        "expires",
        "lastUsed",
        "revoked",
        "description",
    )
    for k in keys:
        table.add_row(
            k.key,
            _roles_text(k.roles),
            ", ".join(k.devices),
            ", ".join(k.groups),
            _iso(k.expires_us),
            _iso(k.last_used_us),
            _iso(k.revoked_us),
            k.description,
        )
    out.print(table)


@apikeys_app.command("revoke")
def apikeys_revoke(key: Annotated[str, typer.Argument(metavar="KEY")]) -> None:
    """Revoke an API key at once; it stays listed, marked revoked."""
    with context(settings()) as ctx:
        account_services.revoke_api_key(ctx, key)
    out.print(f"revoked {key}", highlight=False)


def _read_json(option: str, path: Path | None) -> Any:
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(option, f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(option, f"{path} is not valid JSON: {exc}") from None


@seed_app.command("import")
def seed_import(
    users: Annotated[
        Path | None, typer.Option("--users", dir_okay=False, help="JSON of user documents.")
    ] = None,
    groups: Annotated[
        Path | None, typer.Option("--groups", dir_okay=False, help="JSON of userGroup documents.")
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Create the seed's users and groups; existing ones are left unchanged. Generated passwords
    are printed once."""
    if users is None and groups is None:
        raise typer.BadParameter("give --users, --groups or both")
    users_doc, groups_doc = _read_json("--users", users), _read_json("--groups", groups)
    with context(settings()) as ctx:
        report = account_services.import_seed(ctx, users_doc, groups_doc)
    if json_out:
        out.print_json(
            json.dumps(
                {
                    "groupsCreated": list(report.groups_created),
                    "groupsSkipped": list(report.groups_skipped),
                    "usersCreated": list(report.users_created),
                    "usersSkipped": list(report.users_skipped),
                    "passwords": dict(report.passwords),
                }
            )
        )
        return
    out.print(f"groups: {len(report.groups_created)} created, {len(report.groups_skipped)} already existed")
    out.print(f"users: {len(report.users_created)} created, {len(report.users_skipped)} already existed")
    for name, password in report.passwords.items():
        out.print(f"password of {name} (shown once): {password}", highlight=False)


# ---- OAuth clients and login ---------------------------------------------------------
clients_app = typer.Typer(
    help="OAuth clients of the built-in OpenID Connect provider (apps, web apps, CLIs).", no_args_is_help=True
)
app.add_typer(clients_app, name="clients")


@clients_app.command("add")
def clients_add(
    client_id: Annotated[str, typer.Argument(metavar="CLIENT_ID", help="clientId, e.g. iotvault-mobile")],
    name: Annotated[str, typer.Option("--name", help="Shown on the login page (default: CLIENT_ID).")] = "",
    redirect_uri: Annotated[
        list[str] | None,
        typer.Option("--redirect-uri", "-r", help="Exact redirect URI for the code flow (repeat)."),
    ] = None,
    post_logout_redirect_uri: Annotated[
        list[str] | None,
        typer.Option("--post-logout-redirect-uri", help="Where logout may send the browser back (repeat)."),
    ] = None,
    confidential: Annotated[
        bool,
        typer.Option("--confidential", help="A server-side app: gets a secret (HTTP Basic), shown once."),
    ] = False,
    device: Annotated[
        bool, typer.Option("--device", help="Allow the device authorization grant (terminals, headless).")
    ] = False,
    refresh: Annotated[bool, typer.Option("--refresh/--no-refresh", help="Issue refresh tokens.")] = True,
    anonymous: Annotated[
        bool, typer.Option("--anonymous", help='Offer anonymous login (tokens with amr ["anon"]).')
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """Register an OAuth client; a confidential client's secret is printed once."""
    from iotvault.identity import IdentityProvider
    from iotvault.identity.clients import AUTHORIZATION_CODE, DEVICE_CODE, REFRESH_TOKEN, add_client

    grants = ([AUTHORIZATION_CODE] if redirect_uri else []) + ([DEVICE_CODE] if device else [])
    if not grants:
        raise typer.BadParameter("give --redirect-uri (browser and app logins), --device, or both")
    if refresh:
        grants.append(REFRESH_TOKEN)
    with context(settings()) as ctx:
        new = add_client(
            IdentityProvider(ctx.settings, ctx).store,
            client_id,
            display_name=name,
            confidential=confidential,
            redirect_uris=redirect_uri or [],
            post_logout_redirect_uris=post_logout_redirect_uri or [],
            grant_types=grants,
            allow_anonymous=anonymous,
            created_by="cli",
        )
    if json_out:
        doc = client_doc(new.client)
        if new.secret is not None:
            doc["clientSecret"] = new.secret
        out.print_json(json.dumps(doc))
        return
    kind = "confidential" if confidential else "public (PKCE)"
    out.print(f"registered {kind} client {new.client.client_id}", highlight=False)
    if new.secret is not None:
        out.print(f"client secret (shown once): {new.secret}", highlight=False)


@clients_app.command("list")
def clients_list(json_out: JsonOption = False) -> None:
    """List OAuth clients (never their secrets)."""
    from iotvault.identity import IdentityProvider

    with context(settings()) as ctx:
        clients = IdentityProvider(ctx.settings, ctx).store.list_clients()
    if json_out:
        out.print_json(json.dumps([client_doc(c) for c in clients]))
        return
    table = Table(
        Column("clientId", overflow="fold"), "type", "grants", "redirectUris", "anonymous", "created"
    )
    for c in clients:
        grants = ", ".join(g.rsplit(":", 1)[-1] for g in c.grant_types)
        table.add_row(
            c.client_id,
            "public" if c.public else "confidential",
            grants,
            "\n".join(c.redirect_uris),
            "yes" if c.allow_anonymous else "",
            _iso(c.created_us),
        )
    out.print(table)


@clients_app.command("remove")
def clients_remove(
    client_id: Annotated[str, typer.Argument(metavar="CLIENT_ID")], yes: YesOption = False
) -> None:
    """Remove an OAuth client; every token it holds is revoked."""
    from iotvault.identity import IdentityProvider
    from iotvault.identity.clients import remove_client

    if not yes:
        typer.confirm(f"Remove client {client_id} and revoke its tokens?", abort=True)
    with context(settings()) as ctx:
        remove_client(IdentityProvider(ctx.settings, ctx).store, client_id)
    out.print(f"removed client {client_id}; its tokens are revoked", highlight=False)


@app.command()
def login(
    url: Annotated[
        str | None, typer.Option(help="iotvault's public URL, the issuer (default: IOTVAULT_PUBLIC_URL).")
    ] = None,
    client_id: Annotated[
        str, typer.Option("--client-id", help="The OAuth client to log in as.")
    ] = "iotvault-cli",
    scope: Annotated[str, typer.Option(help="Scopes to ask for.")] = "openid profile offline_access",
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            dir_okay=False,
            help="Where to save the tokens (0600). Default: $XDG_CONFIG_HOME/iotvault/token.json",
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the tokens as JSON instead of saving them.")
    ] = False,
) -> None:
    """Log in from a terminal with the device authorization grant (RFC 8628)."""
    from iotvault.identity.login import Verification, default_token_file, device_login, save_tokens, whoami

    issuer = url or settings().public_url

    def show(v: Verification) -> None:
        err.print(f"To log in, open {v.uri} in a browser and enter the code {v.user_code}", highlight=False)
        if v.uri_complete:
            err.print(f"(or open {v.uri_complete})", highlight=False)
        err.print(f"waiting for you to allow it (the code expires in {v.expires_in // 60} minutes)...")

    tokens = device_login(issuer, client_id=client_id, scope=scope, show=show)
    if json_out:
        sys.stdout.write(json.dumps(tokens) + "\n")
        return
    path = output or default_token_file()
    save_tokens(path, tokens)
    who = whoami(issuer, tokens)
    err.print(f"logged in{f' as {who}' if who else ''}; tokens saved to {path}", highlight=False)


# ---- device security: certificates, the command key, revocation ---------------------------
def _simulator_extras(s: Settings, key_file: Path | None = None, *, registry: bool = True) -> tuple[Any, Any]:
    """Simulated devices obey signed commands (replay state under the data dir) and, with a
    TLS broker, verify it with ``broker_ca_file``.

    The platform key comes from ``key_file`` (PEM), else from this installation's database —
    unless the devices are not this installation's (``registry`` false): then they take no
    commands rather than trust a key made up on the spot.
    """
    from iotvault.broker.tls import client_context
    from iotvault.commands.keys import command_signing_key
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
    tls = (not b.embedded and b.tls) or (b.embedded and bool(s.mqtt_tls_cert_file))
    return commands, client_context(s.broker_ca_file) if tls else None


@app.command()
def certs(
    directory: Annotated[
        Path,
        typer.Argument(
            metavar="DIR", file_okay=False, help="Where to write ca.pem, ca.key, server.pem, server.key."
        ),
    ],
    host: Annotated[
        list[str], typer.Option("--host", help="A host name or IP address the broker is reached at (repeat).")
    ],
    days: Annotated[
        int, typer.Option(min=1, max=825, help="Validity of the server certificate, in days.")
    ] = 397,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing server certificate.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Make a private CA (or reuse the one in DIR) and a TLS server certificate for the MQTT broker."""
    from iotvault.certs import write_certs

    files = write_certs(directory, host, days=days, force=force)
    if json_out:
        doc = {k: str(getattr(files, k)) for k in ("ca_cert", "ca_key", "server_cert", "server_key")}
        out.print_json(json.dumps({**doc, "caCreated": files.ca_created}))
        return
    out.print(f"{'created' if files.ca_created else 'reused'} the CA: {files.ca_cert} (key {files.ca_key})")
    out.print(f"server certificate for {', '.join(host)}: {files.server_cert} (key {files.server_key})")
    out.print("give ca.pem to devices and set IOTVAULT_BROKER_CA_FILE to it; keep ca.key offline")


@devices_app.command("command-key")
def devices_command_key(json_out: JsonOption = False) -> None:
    """Print the public key devices verify commands with (PEM; --json adds its kid and JWK)."""
    from iotvault.commands.keys import command_signing_key

    with context(settings()) as ctx:
        key = command_signing_key(ctx.store, ctx.master).public
    if json_out:
        out.print_json(json.dumps({"kid": key.kid, "alg": "EdDSA", "pem": key.pem(), "jwk": key.jwk()}))
        return
    sys.stdout.write(key.pem())


@devices_app.command("revoke-credential")
def devices_revoke_credential(device_id: IdArg, yes: YesOption = False) -> None:
    """Refuse every credential of a device (also one in its grace period) until it is rotated."""
    from iotvault.devices import revoke_device_credential

    if not yes:
        typer.confirm(f"Disconnect {device_id} and refuse its credentials?", abort=True)
    with context(settings()) as ctx:
        revoke_device_credential(ctx, device_id)
    out.print(f"revoked the credentials of {device_id}; rotate-credential gives it a new one")


def run() -> None:
    try:
        app()
    except IotVaultError as exc:
        # one plain line, never wrapped or styled: scripts and people both read it
        sys.stderr.write(f"iotvault: error: {' '.join(str(exc).split())}\n")
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)
