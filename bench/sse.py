"""Live streams at scale: many SSE clients, memory per idle client, event latency under load.

``python -m bench.sse [--clients 1000] [--devices 100] [--rate 1000] [--seconds 10]``

One ``iotvault serve`` (SQLite, embedded broker, the rate limits raised), ``--devices``
devices registered with real credentials and an API key that may read them all. Then:

1. ``--clients`` Server-Sent Events streams, spread evenly over the devices, are opened and
   left idle; the server's resident memory before and after, divided by the clients, is the
   **memory per idle SSE client** (and the server's CPU meanwhile: what idle streams cost);
2. the publishers (:mod:`bench.publisher`) send ``--rate`` QoS 1 events/s over all devices for
   ``--seconds``; every client parses each event it receives and notes **latency** = its
   receipt - the event's ``timestamp`` (iotvault's receipt of the PUBLISH, in milliseconds:
   the broker hop before it, on loopback, is not counted). Printed: p50/p99/max, events
   delivered against those expected (each event goes to clients/devices streams), and the
   server's CPU seconds over the phase per delivery (ingest and fan-out together).

The clients are one asyncio process of raw sockets (``bench.loadgen``'s approach).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.services import Child, Server, base_env, free_port
from bench.stats import cpu_seconds, memory
from iotvault.config import load_settings

TYPE_ID = "ssebench"


def _register(env: dict[str, str], n: int) -> tuple[list[tuple[str, str, str]], str]:
    from iotvault.accounts import create_api_key  # noqa: PLC0415 - the harness imports lazily
    from iotvault.context import context  # noqa: PLC0415
    from iotvault.devices import register_device  # noqa: PLC0415
    from iotvault.domain.accounts import Roles  # noqa: PLC0415

    with context(load_settings(environ=env)) as ctx:
        creds = []
        for i in range(n):
            d = register_device(ctx, TYPE_ID, f"sse-{i:03d}")
            creds.append((d.device_id, d.type_id, d.credential))
        key = create_api_key(ctx, roles=Roles(reader=True), devices=[c[0] for c in creds], created_by="bench")
    return creds, base64.b64encode(f"{key.key}:{key.password}".encode()).decode()


class Client:
    def __init__(self, port: int, device_id: str, auth: str) -> None:
        self.port, self.device_id, self.auth = port, device_id, auth
        self.latencies: list[float] = []
        self.received = 0
        self.measuring = False
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(
            f"GET /iotf/devices/{self.device_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Basic {self.auth}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head[:200].decode(errors="replace"))
        await self.reader.readuntil(b": connected")

    async def run(self) -> None:
        assert self.reader is not None  # noqa: S101 - connect() came first
        while True:
            line = await self.reader.readline()
            if not line:
                return
            start = line.find(b"data: {")
            if start < 0:
                continue
            now = time.time()
            doc = json.loads(line[start + 6 : line.rfind(b"}") + 1])
            if self.measuring:
                stamp = datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00")).timestamp()
                self.latencies.append(now - stamp)
                self.received += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(p / 100 * len(values)) - 1))] * 1000


async def _measure(  # noqa: PLR0917 - one measurement, described by its arguments
    a: argparse.Namespace,
    port: int,
    mqtt_port: int,
    server_pid: int,
    workdir: Path,
    creds: list[tuple[str, str, str]],
    auth: str,
) -> dict[str, Any]:
    rss0, _ = memory(server_pid)
    clients = [Client(port, creds[i % len(creds)][0], auth) for i in range(a.clients)]
    for i in range(0, len(clients), 50):  # in steps, as browsers arrive
        await asyncio.gather(*(c.connect() for c in clients[i : i + 50]))
    tasks = [asyncio.create_task(c.run()) for c in clients]
    await asyncio.sleep(1.0)
    idle0, t0 = cpu_seconds(server_pid) or 0.0, time.monotonic()
    await asyncio.sleep(2.0)
    idle_cpu = ((cpu_seconds(server_pid) or 0.0) - idle0) / (time.monotonic() - t0)
    rss1, _ = memory(server_pid)
    per_device = max(1, math.ceil(a.rate * a.seconds / len(creds)))
    pub = Child("publisher", "bench.publisher", [], base_env(), workdir / "publisher.log")
    pub.send(
        json.dumps(
            {
                "host": "127.0.0.1",
                "port": mqtt_port,
                "window": 20,
                "rate": a.rate,
                "devices": creds,
                "per_device": per_device,
                "seed": 1,
                "timeout": 600,
            }
        )
    )
    pub.expect("ready", 60)
    for c in clients:
        c.measuring = True
    busy0 = cpu_seconds(server_pid) or 0.0
    pub.send("go")
    sent = await asyncio.to_thread(pub.expect, "sent", a.seconds * 4 + 60)
    await asyncio.sleep(2.0)  # the last events reach their streams
    busy = (cpu_seconds(server_pid) or 0.0) - busy0
    pub.stop()
    for c in clients:
        c.close()
    for t in tasks:
        t.cancel()
    lat = sorted(x for c in clients for x in c.latencies)
    expected = sent["acked"] * a.clients / len(creds)
    return {
        "rss_idle_before": rss0,
        "rss_idle_after": rss1,
        "per_client_kb": ((rss1 or 0) - (rss0 or 0)) / a.clients / 1024,
        "delivered": sum(c.received for c in clients),
        "expected": expected,
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
        "max_ms": lat[-1] * 1000 if lat else float("nan"),
        "published": sent["acked"],
        "idle_cpu": idle_cpu,
        "busy_cpu_s": busy,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sse", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--seconds", type=float, default=10.0)
    a = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="iotvault-sse-"))
    try:
        env = base_env()
        env.update(
            {
                "IOTVAULT_DATA_DIR": str(workdir / "data"),
                "IOTVAULT_HTTP_PORT": str(free_port()),
                "IOTVAULT_MQTT_PORT": str(free_port()),
                "IOTVAULT_LOG_LEVEL": "warning",
                "IOTVAULT_RATE_LIMIT_PER_IP": "1000000000/minute",
                "IOTVAULT_RATE_LIMIT_PER_PRINCIPAL": "1000000000/minute",
                "IOTVAULT_HTTP_MAX_CONNECTIONS": str(a.clients + 100),
            }
        )
        creds, auth = _register(env, a.devices)
        with Server(env, workdir / "iotvault.log") as server:
            r = asyncio.run(
                _measure(
                    a,
                    int(env["IOTVAULT_HTTP_PORT"]),
                    int(env["IOTVAULT_MQTT_PORT"]),
                    server.pid,
                    workdir,
                    creds,
                    auth,
                )
            )
        print(
            f"sse: {a.clients} idle clients over {a.devices} devices: server RSS "
            f"{(r['rss_idle_before'] or 0) / 2**20:.0f} -> {(r['rss_idle_after'] or 0) / 2**20:.0f} MiB, "
            f"{r['per_client_kb']:.1f} kB per idle client (target 50 kB)"
        )
        print(
            f"sse: {a.rate:,.0f} events/s for {a.seconds:g}s ({r['published']:,} published): delivered "
            f"{r['delivered']:,} of {r['expected']:,.0f} expected; latency (iotvault receipt -> client) "
            f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms "
            "(target p99 100 ms)"
        )
        per_delivery_us = r["busy_cpu_s"] / max(1, r["delivered"]) * 1e6
        print(
            f"sse: server CPU {r['idle_cpu']:.1%} of a core with the {a.clients} streams idle; "
            f"{r['busy_cpu_s']:.2f} s while publishing = {per_delivery_us:.1f} µs "
            "per delivery (ingest included: compare runs, not cases)"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
