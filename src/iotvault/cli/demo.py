"""``iotvault demo``: the node, demo accounts and devices, and simulated devices, in one command.

Every port is settled before anything is created: a taken port that the settings do not name
explicitly moves to the port used last time (``demo-ports.json`` in the data dir), else to a
free one, so the addresses printed at first start keep working after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from iotvault.cli.common import CliState, setup_logging, state
from iotvault.cli.node import run_recorded
from iotvault.config import Settings
from iotvault.errors import ConfigError, PortInUseError

if TYPE_CHECKING:
    from iotvault.context import Context
    from iotvault.simulator import DeviceCredential

DEMO_DEVICES = (
    ("demo-sensor", "demo-thermo-1"),
    ("demo-sensor", "demo-thermo-2"),
    ("demo-meter", "demo-meter-1"),
)
PORTS_FILE = "demo-ports.json"
API_KEY_DESCRIPTION = "demo: read-only key on the demo devices"


def port_free(host: str, port: int) -> bool:
    """Whether a listener could bind now (as the node binds: a closed connection's TIME_WAIT
    does not count, else a restarted demo would move its ports)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _any_free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def _saved_ports(data_dir: Path) -> dict[str, int]:
    try:
        doc = json.loads((data_dir / PORTS_FILE).read_text(encoding="utf-8"))
        return {k: int(v) for k, v in doc.items() if k in ("http", "mqtt")}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def _choose(st: CliState, name: str, host: str, wanted: int, saved: int | None, what: str) -> int:
    """The port to use: the wanted one if free; a port named in the settings never moves."""
    if port_free(host, wanted):
        return wanted
    setting = f"IOTVAULT_{name.upper()}"
    if name in st.settings.given:
        raise PortInUseError(host, wanted, setting)
    port = saved if saved is not None and port_free(host, saved) else _any_free_port(host)
    st.err.print(
        f"port {wanted} is taken ({what}); the demo uses {port} instead (set {setting} to choose)",
        highlight=False,
    )
    return port


def settle_ports(st: CliState) -> Settings:
    """Every listening port of the demo, checked and chosen before anything is created."""
    s = st.settings
    saved = _saved_ports(s.data_dir)
    http = _choose(st, "http_port", s.http_host, s.http_port, saved.get("http"), "another web server?")
    mqtt = _choose(st, "mqtt_port", s.mqtt_host, s.mqtt_port, saved.get("mqtt"), "another MQTT broker?")
    s = s.with_ports(http_port=http, mqtt_port=mqtt)
    if {"http": http, "mqtt": mqtt} != saved:
        s.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (s.data_dir / PORTS_FILE).write_text(
            json.dumps({"http": http, "mqtt": mqtt}) + "\n", encoding="utf-8"
        )
    return s


def self_command() -> str:
    """How to run ``iotvault`` again, as this process was started: a hint that runs as printed."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "__main__.py":  # python -m iotvault
        return f"{_short(Path(sys.executable))} -m iotvault"
    on_path = shutil.which("iotvault")
    if on_path is not None and Path(on_path).resolve() == argv0.resolve():
        return "iotvault"
    return _short(argv0)


def _short(path: Path) -> str:
    """A path relative to the working directory when it is below it, else absolute."""
    absolute = path.absolute()
    with contextlib.suppress(ValueError):
        return str(absolute.relative_to(Path.cwd()))
    return str(absolute)


def _demo_accounts(ctx: Context) -> list[tuple[str, str]]:
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


def _demo_api_key(ctx: Context) -> tuple[str, str] | None:
    """On first start: a read-only API key on the demo devices, for the README's curl lines."""
    from iotvault.accounts import create_api_key
    from iotvault.domain.accounts import Roles

    if any(k.created_by == "demo" for k in ctx.accounts.list_api_keys()):
        return None
    new = create_api_key(
        ctx,
        roles=Roles(reader=True),
        devices=[d for _, d in DEMO_DEVICES],
        description=API_KEY_DESCRIPTION,
        created_by="demo",
    )
    return new.key, new.password


def _demo_devices(ctx: Context) -> list[DeviceCredential]:
    from iotvault.devices import register_device, rotate_device_credential
    from iotvault.simulator import DeviceCredential

    creds = []
    for type_id, device_id in DEMO_DEVICES:
        if ctx.store.get_device(device_id) is None:
            new = register_device(ctx, type_id, device_id, {"demo": True})
            creds.append(DeviceCredential(device_id, type_id, new.credential))
        else:  # stored only as a hash: give the simulator a fresh one
            creds.append(DeviceCredential(device_id, type_id, rotate_device_credential(ctx, device_id)))
    return creds


def _on_stop_signals(callback: Callable[[], object]) -> None:
    """Run ``callback`` on SIGINT and SIGTERM, in place of what the running loop had."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, callback)


def demo(
    cli: typer.Context,
    rate: Annotated[float, typer.Option(help="Events per second per simulated device.")] = 1.0,
) -> None:
    """Serve with the embedded defaults, create demo devices, and run the device simulator."""
    from iotvault.cli.simulate import simulator_extras
    from iotvault.context import context

    st = state(cli)
    if not st.settings.broker.embedded:
        raise ConfigError("broker_url", "the demo runs the embedded broker; unset IOTVAULT_BROKER_URL")
    s = settle_ports(st)
    st.use(s)
    setup_logging(s.log_level, s.log_format)
    with context(s) as ctx:
        creds = _demo_devices(ctx)
        accounts_made = _demo_accounts(ctx)
        api_key = _demo_api_key(ctx)
    _print_welcome(st, s, accounts_made, api_key)
    commands, _ = simulator_extras(s)
    asyncio.run(_run(st, s, creds, commands, rate))


def _print_welcome(
    st: CliState, s: Settings, accounts_made: list[tuple[str, str]], api_key: tuple[str, str] | None
) -> None:
    err, me = st.err, self_command()
    for user, password in accounts_made:
        err.print(f"demo user {user!r} created; password (shown once): {password}", highlight=False)
    if not accounts_made:
        err.print(
            f"demo users 'demo' and 'admin' exist (passwords shown at first start); for a new one: "
            f"{me} users set-password demo",
            highlight=False,
        )
    if api_key is not None:
        key, password = api_key
        err.print("a read-only API key on the demo devices (shown once); try:", highlight=False)
        err.print(f"  curl -u {key}:{password} {s.public_url}/iotf/devices", highlight=False)
    err.print(f"demo devices: {', '.join(d for _, d in DEMO_DEVICES)} (credentials held by the simulator)")
    err.print(f"watch them arrive: {me} events tail {DEMO_DEVICES[0][1]} --follow", highlight=False)


async def _run(st: CliState, s: Settings, creds: list[DeviceCredential], commands: Any, rate: float) -> None:
    from iotvault.node import Node
    from iotvault.simulator import SimulationPlan, run_simulation

    node = Node(s)
    started = asyncio.Event()
    node_task = asyncio.create_task(run_recorded(s, node, lambda _n: started.set(), http=True))
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait({node_task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if node_task.done():
        waiter.cancel()
        node_task.result()
        return
    port = node.broker.port if node.broker is not None else s.mqtt_port
    st.err.print(f"iotvault demo ready: HTTP on {s.public_url}, MQTT on port {port}", highlight=False)
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


__all__ = ["DEMO_DEVICES", "demo"]
