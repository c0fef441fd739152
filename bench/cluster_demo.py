"""``make cluster-demo``: two API and two ingest nodes on loopback, with simulated devices.

PostgreSQL (a throwaway database on the local server), Redis (``IOTVAULT_DEMO_REDIS``, default
``redis://127.0.0.1:6379/0``; without it the nodes fan out through LISTEN/NOTIFY) and a private
Mosquitto (its own port and persistence directory, configured like ``deploy/mosquitto``). The
ingest nodes share the broker through ``$share/ingest/…``; an API key that reads every demo
device is printed once, with the URLs of both API nodes. Ctrl-C (or ``--seconds``) stops
everything, and the database is dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.services import Mosquitto, Server, base_env, free_port, throwaway_pg_database
from iotvault.accounts import create_api_key
from iotvault.config import load_settings
from iotvault.context import context
from iotvault.devices import register_device
from iotvault.domain.accounts import Roles
from iotvault.simulator import DeviceCredential, SimulationPlan, run_simulation

DEVICES = 10


def _redis_url() -> str:
    url = os.environ.get("IOTVAULT_DEMO_REDIS", "redis://127.0.0.1:6379/0")
    try:
        import redis  # noqa: PLC0415 - optional

        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception:  # noqa: BLE001 - no Redis: the fan-out uses PostgreSQL instead
        print("Redis not reachable: rate limits per node, fan-out through LISTEN/NOTIFY", file=sys.stderr)
        return ""
    return url


@contextlib.contextmanager
def cluster(work: Path, seconds: float | None) -> Iterator[None]:
    with throwaway_pg_database() as pg_url, Mosquitto(work / "mosquitto") as mosq:
        api_ports = [free_port(), free_port()]
        env = base_env() | {
            "IOTVAULT_DATABASE_URL": pg_url,
            "IOTVAULT_BROKER_URL": f"mqtt://127.0.0.1:{mosq.port}",
            "IOTVAULT_MASTER_KEY_FILE": str(work / "master.key"),
            "IOTVAULT_PUBLIC_URL": f"http://127.0.0.1:{api_ports[0]}",
            "IOTVAULT_INGEST_SHARE_GROUP": "ingest",
            "IOTVAULT_INGEST_CLIENT_ID": "demo-ingest",
        }
        if redis_url := _redis_url():
            env["IOTVAULT_REDIS_URL"] = redis_url
        settings = load_settings(environ=env | {"IOTVAULT_DATA_DIR": str(work / "cli")})
        with context(settings) as ctx:
            creds = [register_device(ctx, "thermo", f"demo-{i}") for i in range(DEVICES)]
            key = create_api_key(
                ctx, roles=Roles(reader=True), devices=[c.device_id for c in creds], created_by="cluster-demo"
            )
        nodes = []
        for name, role, port in [
            ("api-a", "api", api_ports[0]),
            ("api-b", "api", api_ports[1]),
            ("ingest-1", "ingest", free_port()),
            ("ingest-2", "ingest", free_port()),
        ]:
            node_env = env | {"IOTVAULT_DATA_DIR": str(work / name), "IOTVAULT_HTTP_PORT": str(port)}
            nodes.append(Server(node_env, work / f"{name}.log", role=role))
        with contextlib.ExitStack() as stack:
            for n in nodes:
                stack.enter_context(n)
            print(f"API nodes: http://127.0.0.1:{api_ports[0]}  http://127.0.0.1:{api_ports[1]}")
            print(f"MQTT (Mosquitto): 127.0.0.1:{mosq.port}; logs in {work}")
            print(f"read-only API key (shown once): {key.key}:{key.password}")
            print(
                f"  curl -N -u '{key.key}:{key.password}' "
                f"http://127.0.0.1:{api_ports[1]}/iotf/devices/demo-0/stream"
            )
            plan = SimulationPlan(
                devices=[DeviceCredential(c.device_id, c.type_id, c.credential) for c in creds],
                rate=1.0,
                count=None if seconds is None else max(1, int(seconds)),
                event_type="reading",
            )
            with contextlib.suppress(KeyboardInterrupt):
                report = asyncio.run(run_simulation("127.0.0.1", mosq.port, plan))
                time.sleep(1.0)  # the last batch
                with context(settings) as ctx:
                    stored = ctx.store.count_events()
                print(f"acknowledged by the broker: {report.acknowledged}, stored: {stored}")
            yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long (default: Ctrl-C)")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="iotvault-cluster-") as tmp, cluster(Path(tmp), args.seconds):
        print(f"stopping after {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
