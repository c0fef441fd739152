"""Several nodes (issue 19): ingest with one and with two ingest nodes, and live fan-out latency.

Part of ``python -m bench`` (``--no-cluster`` leaves it out); ``python -m bench.cluster`` runs it
alone. Both need PostgreSQL and Mosquitto; every node is a real ``iotvault serve --role …``
process on one shared database and one Mosquitto, as docs/design/cluster.md deploys them.

**Ingest**, on the same machine, each figure beside a same-run baseline:

1. the baseline: the ack-only subscriber (:mod:`bench.ackonly`, iotvault's own MQTT transport
   acknowledging at once) in the same shared-subscription group on a fresh Mosquitto, fed by
   the same publishers;
2. one ingest node (``--role ingest``, ``IOTVAULT_INGEST_SHARE_GROUP``) on a fresh database and
   broker; its rate is rows committed / (last row seen - first publish), rows must equal events;
3. the same with two ingest nodes sharing the load.

On one machine the two nodes share its cores with Mosquitto, PostgreSQL and the publishers, so
the figure says what a second node adds *here*, not on a second machine.

**Fan-out**: an SSE client on API node A (``--role api``) streams one device while ingest node B
(``--role ingest``) stores what the device publishes, one event every few milliseconds; each
event carries its publish time, and the latency is the time until its ``data:`` line reaches the
client: publish → Mosquitto → node B → commit → PostgreSQL ``NOTIFY`` (or Redis pub/sub when
Redis answers) → node A → stream. The baseline, in the same run: a plain MQTT subscriber on the
same broker, receiving the same publishes (publish → Mosquitto → subscriber).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gmqtt
import httpx
from gmqtt.mqtt.constants import MQTTv311

from bench.services import (
    BenchError,
    Issuer,
    Mosquitto,
    Server,
    free_port,
    mosquitto_binary,
    pg_available,
    tail,
    throwaway_pg_database,
)
from bench.stats import CpuWindow, fmt_cpu

SHARE_GROUP = "bench"
FANOUT_INTERVAL_S = 0.01  # 100 events/s from one device: latency, not throughput
REDIS_URL = os.environ.get("IOTVAULT_BENCH_REDIS", "redis://127.0.0.1:6379/0")


@dataclass
class Latency:
    """Milliseconds from a device's publish to arrival, sorted."""

    samples: list[float]

    def pct(self, p: float) -> float:
        if not self.samples:
            return float("nan")
        return self.samples[min(len(self.samples) - 1, max(0, round(p / 100 * len(self.samples)) - 1))]


@dataclass
class FanoutResult:
    channel: str  # "PostgreSQL NOTIFY" or "Redis pub/sub"
    events: int
    sse: Latency
    mqtt: Latency


@dataclass
class ClusterResult:
    baseline: dict[int, Any] = field(default_factory=dict)  # nodes -> the same run's ack-only Rate
    ingest: dict[int, Any] = field(default_factory=dict)  # nodes -> bench.run.Rate
    stored: dict[int, tuple[int, int]] = field(default_factory=dict)  # nodes -> (stored, published)
    fanout: list[FanoutResult] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None


def _say(line: str = "") -> None:
    print(line, flush=True)


def unavailable() -> str | None:
    if mosquitto_binary() is None:
        return "the mosquitto binary is not installed"
    return pg_available()


def _redis() -> str:
    try:
        import redis  # noqa: PLC0415 - optional

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception:  # noqa: BLE001 - no Redis: that channel is not measured
        return ""
    return REDIS_URL


def _cluster_env(cfg: Any, workdir: Path, url: str, issuer: Issuer) -> dict[str, str]:
    from bench.run import server_env  # noqa: PLC0415 - bench.run imports this module lazily too

    env = server_env(workdir, url, "embedded", issuer, cfg.server_settings)
    env["IOTVAULT_MASTER_KEY_FILE"] = str(workdir / "master.key")  # one key for every node
    env["IOTVAULT_INGEST_SHARE_GROUP"] = SHARE_GROUP
    env["IOTVAULT_INGEST_CLIENT_ID"] = f"bench-{workdir.name}"[:40]
    return env


def _node(env: dict[str, str], workdir: Path, name: str, role: str) -> Server:
    node_env = dict(env, IOTVAULT_DATA_DIR=str(workdir / name), IOTVAULT_HTTP_PORT=str(free_port()))
    return Server(node_env, workdir / f"{name}.log", role=role)


# ---- ingest ---------------------------------------------------------------------------------
def ingest_run(cfg: Any, root: Path, issuer: Issuer, nodes: int) -> tuple[Any, Any, int, int]:
    """(ack-only baseline, iotvault rate, stored, published) with ``nodes`` ingest nodes."""
    from bench import run  # noqa: PLC0415

    workdir = root / f"ingest-{nodes}"
    workdir.mkdir(parents=True)
    with throwaway_pg_database() as url, contextlib.ExitStack() as stack:
        env = _cluster_env(cfg, workdir, url, issuer)
        creds, probe_pw = run.register(env, cfg.devices)
        baseline = run.run_baseline(
            cfg, "cluster", workdir=workdir, env=env, broker="mosquitto", creds=creds, probe_pw=probe_pw
        )
        mosq = stack.enter_context(Mosquitto(workdir / "mosquitto"))
        env["IOTVAULT_BROKER_URL"] = f"mqtt://127.0.0.1:{mosq.port}"
        db = run.Db("postgres", url, workdir / "data")
        stack.callback(db.close)
        servers = [
            stack.enter_context(_node(env, workdir, f"ingest-{i + 1}", "ingest")) for i in range(nodes)
        ]
        run.probe(mosq.port, probe_pw, lambda: db.status(run.PROBE) == "online", "cluster ingest")
        pubs = run.start_publishers(
            cfg, workdir=workdir, port=mosq.port, creds=creds, per_device=cfg.per_device, rate=0
        )
        for pub in pubs:
            stack.callback(pub.stop, timeout=5)
        groups: dict[str, Callable[[], list[int]]] = {
            f"ingest-{i + 1}": (lambda s=s: [s.pid]) for i, s in enumerate(servers)
        }
        groups["mosquitto"] = lambda: [mosq.proc.pid] if mosq.proc else []
        groups["postgres"] = db.pg_pids
        groups["harness"] = lambda: [os.getpid()]
        cpu = CpuWindow(groups)
        n = cfg.total
        cpu.start()
        run.go(pubs)
        t_end = _wait_stored(db, servers, n, cpu, run.deadline_for(n))
        cpu.stop()
        results = run.collect(pubs, 60)
        cpu.add("publishers", sum(r["cpu_s"] for r in results), [p.pid for p in pubs])
        t_first = min(r["t_first"] for r in results)
        rate = run.Rate(n, t_end - t_first, cpu.percents(), cpu.others())
        published = sum(r["acked"] for r in results)
        time.sleep(1.0)  # anything stored twice would show up now
        stored = db.count()
        if stored != n or published != n:
            raise BenchError(f"{nodes} ingest node(s): published {published}, stored {stored}, expected {n}")
        return baseline, rate, stored, published


def _wait_stored(db: Any, servers: list[Server], n: int, cpu: CpuWindow, within_s: float) -> float:
    """``time.monotonic()`` just before the query that first saw ``n`` rows committed."""
    t_go = time.monotonic()
    last_sample = t_go
    seen = 0
    while time.monotonic() < t_go + within_s:
        for s in servers:
            if s.proc is None or s.proc.poll() is not None:
                raise BenchError(f"an ingest node exited during the run:\n{tail(s.log)}")
        t_query = time.monotonic()
        seen = db.count()
        if seen >= n:
            return t_query
        if time.monotonic() - last_sample > 1.0:
            cpu.sample()
            last_sample = time.monotonic()
        time.sleep(0.01)
    raise BenchError(f"{len(servers)} ingest node(s): only {seen} of {n} events stored")


# ---- fan-out --------------------------------------------------------------------------------
async def _measure_fanout(
    *,
    api_url: str,
    auth: httpx.BasicAuth,
    mqtt_port: int,
    device: str,
    type_id: str,
    n: int,
    interval_s: float,
) -> tuple[list[float], list[float]]:
    """Latencies (ms) of ``n`` events: to the SSE client on the API node, to a plain subscriber."""
    topic = f"iot-2/type/{type_id}/id/{device}/evt/reading/fmt/json"
    sse: dict[int, float] = {}
    mqtt: dict[int, float] = {}
    ready = asyncio.Event()

    async def listen() -> None:
        timeout = httpx.Timeout(10, read=60)
        async with (
            httpx.AsyncClient(base_url=api_url, timeout=timeout) as http,
            http.stream("GET", f"/iotf/devices/{device}/stream", auth=auth) as r,
        ):
            if r.status_code != 200:
                raise BenchError(f"the stream answered {r.status_code}")
            async for line in r.aiter_lines():
                if line.startswith(": connected"):
                    ready.set()
                elif line.startswith("data: "):
                    got = time.time()
                    payload = json.loads(line[6:])["payload"]
                    sse.setdefault(payload["seq"], (got - payload["t"]) * 1000)
                    if len(sse) == n:
                        return

    def on_message(_client: Any, _topic: str, body: bytes, _qos: int, _props: Any) -> int:
        got = time.time()
        payload = json.loads(body)
        mqtt.setdefault(payload["seq"], (got - payload["t"]) * 1000)
        return 0

    listener = asyncio.create_task(listen())
    await asyncio.wait_for(ready.wait(), 30)
    sub = gmqtt.Client(f"bench-baseline-{os.getpid()}")
    sub.on_message = on_message
    await sub.connect("127.0.0.1", mqtt_port, version=MQTTv311)
    sub.subscribe(topic, qos=1)
    pub = gmqtt.Client(device)
    await pub.connect("127.0.0.1", mqtt_port, version=MQTTv311)
    await asyncio.sleep(0.5)  # the subscription is in place
    for i in range(n):
        pub.publish(topic, json.dumps({"seq": i, "t": time.time()}), qos=1)
        await asyncio.sleep(interval_s)
    try:
        await asyncio.wait_for(listener, 60)
    finally:
        listener.cancel()
        await pub.disconnect()
        await sub.disconnect()
    if len(mqtt) != n:
        raise BenchError(f"the plain subscriber got {len(mqtt)} of {n} events")
    return sorted(sse.values()), sorted(mqtt.values())


def fanout_run(
    *, cfg: Any, root: Path, issuer: Issuer, redis_url: str, n: int, interval_s: float
) -> FanoutResult:
    from iotvault.accounts import create_api_key  # noqa: PLC0415
    from iotvault.config import load_settings  # noqa: PLC0415
    from iotvault.context import context  # noqa: PLC0415
    from iotvault.devices import register_device  # noqa: PLC0415
    from iotvault.domain.accounts import Roles  # noqa: PLC0415

    channel = "Redis pub/sub" if redis_url else "PostgreSQL NOTIFY"
    workdir = root / ("fanout-redis" if redis_url else "fanout-pg")
    workdir.mkdir(parents=True)
    with throwaway_pg_database() as url, Mosquitto(workdir / "mosquitto") as mosq:
        env = _cluster_env(cfg, workdir, url, issuer)
        env["IOTVAULT_BROKER_URL"] = f"mqtt://127.0.0.1:{mosq.port}"
        env["IOTVAULT_REDIS_URL"] = redis_url
        with context(load_settings(environ=env)) as ctx:
            device = register_device(ctx, "bench", "fanout-0")
            key = create_api_key(
                ctx, roles=Roles(reader=True), devices=[device.device_id], created_by="bench"
            )
        auth = httpx.BasicAuth(key.key, key.password)
        api = _node(env, workdir, "api-a", "api")
        with api, _node(env, workdir, "ingest-b", "ingest"):
            api_url = f"http://127.0.0.1:{api.env['IOTVAULT_HTTP_PORT']}"
            sse, mqtt = asyncio.run(
                _measure_fanout(
                    api_url=api_url,
                    auth=auth,
                    mqtt_port=mosq.port,
                    device=device.device_id,
                    type_id=device.type_id,
                    n=n,
                    interval_s=interval_s,
                )
            )
    if len(sse) != n:
        raise BenchError(f"{channel}: the SSE client got {len(sse)} of {n} events")
    return FanoutResult(channel, n, Latency(sse), Latency(mqtt))


# ---- the whole part -------------------------------------------------------------------------
def run_cluster(cfg: Any, root: Path, issuer: Issuer) -> ClusterResult:
    """Both parts, with ``cfg`` (a :class:`bench.run.Config`)'s devices, publishers and events."""
    _say("-- several nodes")
    fanout_events, interval_s = cfg.cluster_fanout_events, FANOUT_INTERVAL_S
    res = ClusterResult()
    why = unavailable()
    if why:
        res.skipped = why
        _say(f"  cluster: SKIPPED ({why})")
        return res
    try:
        for nodes in (1, 2):
            baseline, rate, stored, published = ingest_run(cfg, root, issuer, nodes)
            res.baseline[nodes] = baseline
            res.ingest[nodes] = rate
            res.stored[nodes] = (stored, published)
            _say(
                f"  cluster: {nodes} ingest node(s) {rate.per_s:,.0f} events/s durable "
                f"(ack-only baseline {baseline.per_s:,.0f} events/s)"
            )
        redis_url = _redis()
        for channel in ["", redis_url] if redis_url else [""]:  # NOTIFY always; Redis when it answers
            f = fanout_run(
                cfg=cfg, root=root, issuer=issuer, redis_url=channel, n=fanout_events, interval_s=interval_s
            )
            res.fanout.append(f)
            p50, p99 = f.sse.pct(50), f.sse.pct(99)
            _say(f"  cluster: fan-out via {f.channel}: SSE p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    except BenchError as exc:
        res.error = str(exc).splitlines()[0]
        _say(f"  cluster: FAILED: {exc}")
    return res


def report(r: ClusterResult | None) -> None:
    if r is None:  # --no-cluster
        return
    _say()
    _say("== several nodes: PostgreSQL + Mosquitto shared subscription, every node a process on this machine")
    if r.skipped:
        _say(f"cluster: SKIPPED ({r.skipped})")
        return
    if r.error:
        _say(f"cluster: FAILED ({r.error})")
    for nodes, rate in sorted(r.ingest.items()):
        stored, published = r.stored[nodes]
        base = r.baseline[nodes]
        _say(
            f"cluster ingest {nodes} node{'s' if nodes > 1 else ''}: {rate.per_s:,.0f} events/s durable | "
            f"ack-only baseline {base.per_s:,.0f} events/s | ratio {rate.per_s / base.per_s:.2f} | "
            f"stored {stored}/{published}"
        )
        _say(f"    cpu: {fmt_cpu(rate.cpu, rate.others)}")
    if 1 in r.ingest and 2 in r.ingest:
        _say(f"cluster ingest scaling: two nodes / one node {r.ingest[2].per_s / r.ingest[1].per_s:.2f}")
    for f in r.fanout:
        _say(
            f"cluster fan-out via {f.channel}: SSE on API node A, ingested by node B, {f.events} events: "
            f"p50 {f.sse.pct(50):.1f} ms | p99 {f.sse.pct(99):.1f} ms | max {f.sse.samples[-1]:.1f} ms "
            f"| plain MQTT subscriber baseline p50 {f.mqtt.pct(50):.1f} ms | p99 {f.mqtt.pct(99):.1f} ms"
        )


def main(argv: list[str] | None = None) -> int:
    from bench.run import SMOKE, Config  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny counts: checks the harness, not the speed")
    p.add_argument("--events", type=int, default=None, help="events per ingest run")
    p.add_argument("--fanout-events", type=int, default=None, help="events for the fan-out latency (≥ 1,000)")
    a = p.parse_args(argv)
    cfg = Config(**SMOKE) if a.smoke else Config()  # type: ignore[arg-type]
    if a.events is not None:
        cfg.events = a.events
    cfg.cluster_fanout_events = a.fanout_events or (50 if a.smoke else cfg.cluster_fanout_events)
    root = Path(tempfile.mkdtemp(prefix="iotvault-bench-cluster-"))
    try:
        with Issuer(audience="iotvault-bench", subject="bench-reader") as issuer:
            r = run_cluster(cfg, root, issuer)
        report(r)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if r.error else 0


if __name__ == "__main__":
    sys.exit(main())
